"""PPO iteration time and peak memory at several micro-batch sizes, side by side in one run.

One PPO iteration (align/ppo.py: rollouts → RM scores → actor/reference/critic passes → critic and
actor updates) on the shared engines, with `micro_batch_size` = `generate_batch_size` = m for each m of
`--micro` (default 1, 4, 16). Each m runs in its own fresh process (so one size's allocations never
serve another's peak) with the same seeded models, prompts and sampling; sizes alternate over
`--repeats` rounds and the best time counts. Memory: the process's peak resident set during the timed
iterations above its resident set just before them (after a warm-up iteration has created the Adam
state), read from /proc (Linux), plus torch's own peak on CUDA. Beside wall time the table shows the
process's CPU time (all threads), the steadier figure on a shared machine.

    python bench/ppo.py                              # CPU, 1 thread, 16 prompts x 48 new tokens, micro 1/4/16
    python bench/ppo.py --device cuda --prompts 64 --micro 1 4 16 64

Prints one JSON line per run and a table with each size's time and memory relative to the first size.
A micro-batch of m prompts decodes m sequences together (fewer, larger steps) and holds m sequences'
activations in an update (more memory per step, fewer steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402

MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def worker(m: int, args) -> dict:
    """Build the four models and the engines, run one warm-up and `args.iterations` timed iterations."""
    from collections import Counter

    from lm2cli.align.frozen import frozen
    from lm2cli.align.models import frozen_config
    from lm2cli.align.ppo import PPOTrainer, encode_prompts, engine_config
    from lm2cli.align.records import Prompt
    from lm2cli.align.reward_model import RewardModel
    from lm2cli.align.rollout import Lm2Rollout
    from lm2cli.config import ModelConfig, PPOConfig, TokenizerConfig
    from lm2cli.model import InternLM2
    from lm2cli.tokenizer import build_vocab
    from lm2cli.train.engine import Engine, init_distributed

    dist = init_distributed()
    tok = build_vocab(TokenizerConfig(n_en=400, n_zh=0, n_spare=17), Counter())[0]
    mc = ModelConfig(vocab_size=tok.vocab_size, max_position_embeddings=256, bos_token_id=tok.bos_id,
                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **MODEL)

    def model(seed: int) -> InternLM2:
        torch.manual_seed(seed)
        return InternLM2(mc)

    cfg = PPOConfig(prompts_per_iteration=args.prompts, max_prompt_len=64, max_new_tokens=args.new, critic_warmup=0,
                    micro_batch_size=m, generate_batch_size=m, minibatches=1, ptx_coef=0.0, seed=0, top_p=1.0)
    prompts = [Prompt("default", [{"role": "user", "content": f"What is {a} + {b}? Explain it at length."}], None, i)
               for i, (a, b) in enumerate((a, b) for a in range(1, 10) for b in range(1, 10))]
    encoded, _ = encode_prompts(tok, prompts, {"default": ""}, True, cfg.max_prompt_len)
    rm = RewardModel(model(1))
    with torch.no_grad():
        rm.head.weight.normal_(0.0, 0.1)
    device = dist.device
    actor_cfg, critic_cfg = engine_config(cfg, 1e-5, 100), engine_config(cfg, 1e-5, 100)
    actor = Engine(model(0), actor_cfg, 100, dist)
    critic = Engine(RewardModel(model(1)), critic_cfg, 100, dist)
    _, frozen_ds = frozen_config(cfg.precision, dist.world, zero3=False)
    trainer = PPOTrainer(actor, frozen(model(0), dist, frozen_ds), critic, frozen(rm, dist, frozen_ds), tok, encoded,
                         cfg, None, dist, Lm2Rollout(cfg, tok.stop_ids, tok.pad_id))
    trainer.iteration()  # warm-up: thread pools, Adam state
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _status("VmRSS")
    _reset_peak()
    times, cpu, rows = [], [], []
    for _ in range(args.iterations):
        t0, c0 = time.perf_counter(), time.process_time()
        row, _ = trainer.iteration()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        rows.append(row)
    out = {"micro": m, "seconds": min(times), "cpu_seconds": min(cpu), "peak_rss_mib": (_status("VmHWM") - base) / 2**20,
           "response_len": sum(r["response_len"] for r in rows) / len(rows),
           "reward_mean": rows[0]["reward_mean"]}
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    ap.add_argument("--new", type=int, default=48, help="max new tokens per response")
    ap.add_argument("--iterations", type=int, default=2, help="timed iterations per run")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the sizes (best time counts)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (1: steady on a shared "
                    "machine, where spare OpenMP threads spin on busy cores)")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return

    from lm2cli.train.engine import clean_env

    env = {**clean_env(), "DS_ACCELERATOR": "cpu" if args.device == "cpu" else os.environ.get("DS_ACCELERATOR", "cuda"),
           "OMP_NUM_THREADS": str(args.threads)}
    best: dict[int, dict] = {}
    for _ in range(args.repeats):
        for m in args.micro:
            cmd = [sys.executable, __file__, "--worker", str(m), "--prompts", str(args.prompts), "--new", str(args.new),
                   "--iterations", str(args.iterations), "--device", args.device]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"worker {m} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            print(json.dumps(r), flush=True)
            prev = best.get(m, r)  # best time and CPU time over the rounds; the largest peak
            best[m] = {**r, "seconds": min(r["seconds"], prev["seconds"]),
                       "cpu_seconds": min(r["cpu_seconds"], prev["cpu_seconds"]),
                       "peak_rss_mib": max(r["peak_rss_mib"], prev["peak_rss_mib"])}
    first = best[args.micro[0]]
    print(f"\nPPO iteration: {args.prompts} prompts x <= {args.new} new tokens, model {MODEL}, device {args.device}, "
          f"{args.threads} thread(s)")
    print(f"{'micro':>6} {'seconds':>8} {'x time':>7} {'CPU s':>7} {'x CPU':>6} {'peak MiB':>9} {'x memory':>9} "
          f"{'resp len':>9}")
    for m in args.micro:
        r = best[m]
        print(f"{m:>6} {r['seconds']:>8.2f} {r['seconds'] / first['seconds']:>7.2f} {r['cpu_seconds']:>7.2f} "
              f"{r['cpu_seconds'] / first['cpu_seconds']:>6.2f} {r['peak_rss_mib']:>9.1f} "
              f"{r['peak_rss_mib'] / max(first['peak_rss_mib'], 1e-9):>9.2f} {r['response_len']:>9.1f}")


if __name__ == "__main__":
    main()
