"""Peak host memory per rank of building the model a run trains: ZeRO-3 (partitioned at construction)
against a dense build (ZeRO 0-2), and against lm2's former way, at 2 ranks, side by side in one run.

Each case starts 2 ranks (torch.distributed.run, gloo, DS_ACCELERATOR=cpu) that build an InternLM2 of
~200 M parameters (~800 MB in fp32, big enough that the model, not the ~0.3 GB of torch + DeepSpeed,
dominates; shaped like the 7B one, where no single tensor is more than a few % of the model) with
`train.engine.build_model`, fresh or from a saved checkpoint (`init_from`, streamed tensor by tensor),
and report their peak RSS (ru_maxrss, the process's high-water mark) and its rise over the RSS just
before the build, and the peak of their anonymous memory (RssAnon sampled every 2 ms: RSS also counts
the checkpoint's pages the process maps to read it, page cache that is shared and reclaimable). glibc
is told to return every block over 1 MiB to the system when it is freed (MALLOC_MMAP_THRESHOLD_),
the same for every case, so that RSS follows what is alive rather than what the allocator kept. Cases:

    zero3   sharding full: zero.Init partitions each module as it is built, one tensor whole at a time
    dense   sharding full-replica: built on the meta device, materialised once, filled in place
    former  what `lm2 pretrain` stage 2 did before: load the checkpoint as a model, build a second
            model, copy the state dict across (two full fp32 copies per rank)

On CPU the accelerator is the host, so a ZeRO-3 rank's partitions are host memory too: the expected
ratio zero3/dense is ~1/world plus a tensor or two (each parameter is gathered whole while it is
written). On GPUs the host holds only the one tensor being drawn or read.

    python bench/construct_memory.py                   # hidden 1024, 16 layers, vocab 8000, fp32
    python bench/construct_memory.py --hidden 512 --layers 4 --json
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py); never import from it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import resource
import subprocess
import tempfile
import threading
import time

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class AnonPeak(threading.Thread):
    """The highest RssAnon seen, sampled every 2 ms until `stop()`."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._done = _status("RssAnon"), threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, _status("RssAnon"))


def _model_config(a: dict):
    from lm2cli.config import ModelConfig

    return ModelConfig(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                       num_hidden_layers=a["layers"], num_attention_heads=a["hidden"] // 64,
                       num_key_value_heads=a["hidden"] // 128, max_position_embeddings=2048)


def _worker() -> None:
    """One rank of one case: build, measure, print a RESULT line."""
    import torch

    from lm2cli.config import TrainConfig
    from lm2cli.train.engine import build_model, init_distributed, is_partitioned

    a = json.loads(os.environ["LM2_CONSTRUCT_BENCH"])
    torch.set_num_threads(1)
    dist = init_distributed()
    mc = _model_config(a)
    cfg = TrainConfig(sharding="full" if a["case"] == "zero3" else "full-replica", precision="fp32")
    source = Path(a["checkpoint"]) if a["from_checkpoint"] else None
    # Warm-up: a first init on the meta device imports torch's Python decompositions (~5 s, ~80 MB once
    # per process), which is not the model's memory.
    build_model(_model_config({**a, "hidden": 128, "intermediate": 256, "layers": 1, "vocab": 256}), cfg, dist)
    torch.distributed.barrier()
    before, anon_before = _status("VmRSS"), _status("RssAnon")
    sampler = AnonPeak()
    t0 = time.perf_counter()
    if a["case"] == "former":
        model = _former_build(mc, source)
    else:
        model = build_model(mc, cfg, dist, init_from=source)
    seconds = time.perf_counter() - t0
    anon_peak = sampler.stop()
    local = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print("RESULT " + json.dumps({"case": a["case"], "from_checkpoint": a["from_checkpoint"], "rank": dist.rank,
                                  "peak_rss": peak, "rss_before": before, "local_param_bytes": local,
                                  "anon_rise": anon_peak - anon_before,
                                  "partitioned": is_partitioned(model), "seconds": round(seconds, 2)}), flush=True)
    torch.distributed.barrier()
    # A model left partitioned by zero.Init with no engine around it can abort the interpreter's teardown
    # ("terminate called without an active exception"); the measurement is out, skip the teardown.
    sys.stdout.flush()
    os._exit(0)


def _former_build(mc, source: Path):
    """pretrain.build_model as it was: every rank loads the whole source, then copies it into a second model."""
    import torch

    from lm2cli.convert import load_model
    from lm2cli.model import InternLM2

    if source is None:
        torch.manual_seed(0)
        return InternLM2(mc)
    src = load_model(source)
    with torch.device("meta"):
        model = InternLM2(mc)
    model = model.to_empty(device="cpu")
    model.load_state_dict(src.state_dict())
    return model


def _save_checkpoint(a: dict, folder: Path) -> None:
    """The source checkpoint, written by a separate process so its memory is not counted anywhere."""
    code = ("import json, sys, torch; from lm2cli.config import ModelConfig; from lm2cli.model import InternLM2;"
            "from lm2cli.convert import save_model; torch.manual_seed(0);"
            "save_model(InternLM2(ModelConfig(**json.loads(sys.argv[1]))), sys.argv[2])")
    mc = _model_config(a)
    fields = {k: getattr(mc, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code, json.dumps(fields), str(folder)], env=env, check=True)


def launch(a: dict, case: str, from_checkpoint: bool, timeout: float = 900.0) -> list[dict]:
    from lm2cli.train.engine import clean_env

    args = {**a, "case": case, "from_checkpoint": from_checkpoint}
    env = {**clean_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LM2_CONSTRUCT_BENCH": json.dumps(args),
           "MALLOC_MMAP_THRESHOLD_": str(2**20),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           __file__, "--worker"]
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: a blocked rank would stall its peer
        p = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        out.seek(0)
        text = out.read()
    rows = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
    if p.returncode or len(rows) != WORLD:
        raise RuntimeError(f"{case} (from checkpoint: {from_checkpoint}) failed:\n{text[-3000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def _mib(x: float) -> str:
    return f"{x / 2**20:8.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.worker:
        _worker()
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    params = {"hidden": a.hidden, "intermediate": a.intermediate, "layers": a.layers, "vocab": a.vocab}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        params["checkpoint"] = str(Path(tmp) / "source")
        _save_checkpoint(params, Path(params["checkpoint"]))
        size = (Path(params["checkpoint"]) / "model.safetensors").stat().st_size
        for from_checkpoint in (False, True):
            for case in ("zero3", "dense", "former"):
                rows += launch(params, case, from_checkpoint)
    if a.json:
        print(json.dumps({"model_bytes": size, "world": WORLD, "rows": rows}, indent=2))
        return 0
    print(f"InternLM2 hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}: {size / 2**20:.0f} MiB of fp32 "
          f"weights; {WORLD} ranks, deepspeed on CPU (gloo). MiB per rank, the worse of the ranks.")
    head = (f"{'build':>22} | {'peak RSS':>8} {'rise':>8} {'anon':>8} {'params':>8} | {'rise/dense':>10} "
            f"{'anon/dense':>10} {'seconds':>8}")
    print(head + "\n" + "-" * len(head))
    for from_checkpoint in (False, True):
        worst = {}
        for case in ("zero3", "dense", "former"):
            rs = [r for r in rows if r["case"] == case and r["from_checkpoint"] == from_checkpoint]
            worst[case] = max(rs, key=lambda r: r["peak_rss"] - r["rss_before"])
        dense = worst["dense"]
        dense_rise, dense_anon = dense["peak_rss"] - dense["rss_before"], max(r["anon_rise"] for r in rows
                                                                              if r["case"] == "dense" and
                                                                              r["from_checkpoint"] == from_checkpoint)
        for case, r in worst.items():
            rise = r["peak_rss"] - r["rss_before"]
            anon = max(x["anon_rise"] for x in rows if x["case"] == case and x["from_checkpoint"] == from_checkpoint)
            label = f"{case} {'from checkpoint' if from_checkpoint else 'fresh'}"
            print(f"{label:>22} | {_mib(r['peak_rss'])} {_mib(rise)} {_mib(anon)} {_mib(r['local_param_bytes'])} | "
                  f"{rise / dense_rise:10.2f} {anon / dense_anon:10.2f} {r['seconds']:8.1f}")
    print("peak RSS: ru_maxrss at the end of the build; rise: over the RSS just before it; anon: peak rise of "
          "anonymous memory (sampled); params: this rank's parameter bytes. The worse rank of each case (under "
          "ZeRO-3 rank 0 reads the checkpoint and maps all of it). Timings: a shared machine, indicative only.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
