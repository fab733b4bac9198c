"""Tokens/s of lm2's training path (the real `fit`: DeepSpeed engine, metrics, async checkpoints) against a
minimal hand-written torch loop, on the identical model, data, thread count and precision, in one run.

Both sides train the same InternLM2 (same seed) on the same packed batches (`PackedStream` over a
synthetic corpus), with AdamW (0.9, 0.95, 1e-8, wd 0.1), warmup + cosine, clip 1.0 and the loss read
back every step, as any loop logging its loss does. Timing is wall clock per optimizer step, after
`--warmup` steps: for lm2 it comes from metrics.jsonl's `elapsed` (everything the loop does between
steps counts: metrics, progress, the checkpoint snapshot at the end is outside the window); for the
hand loop from perf_counter around its steps. Sides alternate for `--rounds` rounds and each side's
best round counts, so load from other processes hits both alike. MFU is against the matmul peak
measured once, in the run's precision, on the same threads (train.engine.measure_peak_flops).

    python bench/pretrain.py                        # nano preset (the tiny recipe's model), fp32, CPU
    python bench/pretrain.py --preset micro --seq 512 --threads 2

Target: ratio lm2 / hand-written >= 0.95.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Scripts in bench/ may share a stdlib module's name (tokenize.py); keep this folder off the import path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lm2cli.config import ModelConfig, TrainConfig  # noqa: E402
from lm2cli.model import InternLM2  # noqa: E402
from lm2cli.train.data import IGNORE_INDEX, PackedStream  # noqa: E402
from lm2cli.train.engine import init_distributed, measure_peak_flops, param_groups  # noqa: E402
from lm2cli.train.loop import fit, read_metrics  # noqa: E402
from lm2cli.train.schedule import lr_scheduler, schedule  # noqa: E402

PRESETS = {  # SPEC §10 sizes
    "nano": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "micro": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2),
    "mini": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2),
}


@dataclasses.dataclass
class MemSplit:
    tokens: np.ndarray
    starts: np.ndarray


def corpus(vocab: int, n_docs: int = 4000, seed: int = 0) -> dict:
    """Zipf-ish ids in documents of 20-600 tokens: packing cuts and restarts positions as on real data."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 600, n_docs)
    starts = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    ids = np.minimum(rng.zipf(1.2, int(starts[-1])), vocab - 1).astype(np.int64)
    return {"en.web": MemSplit(ids, starts)}


def model(cfg: ModelConfig) -> InternLM2:
    torch.manual_seed(0)
    return InternLM2(cfg)


def run_lm2(mcfg, tcfg, splits, warmup: int) -> float:
    """Seconds per step of `fit` (DeepSpeed engine) over steps warmup+1 .. max_steps-1."""
    with tempfile.TemporaryDirectory() as tmp:
        stream = PackedStream(splits, tcfg.seq_len, tcfg.micro_batch_size, seed=tcfg.seed)
        fit(model(mcfg), tcfg, stream, Path(tmp) / "pretrain-stage1", kind="pretrain-stage1", resume="never")
        rows = read_metrics(Path(tmp) / "pretrain-stage1" / "metrics.jsonl")
    last, first = rows[-2], rows[warmup - 1]  # the last step's checkpoint and final/ fall outside the window
    return (last["elapsed"] - first["elapsed"]) / (last["step"] - first["step"])


def run_hand(mcfg, tcfg, splits, warmup: int, device) -> float:
    """Seconds per step of a plain torch loop doing the same work."""
    m = model(mcfg).to(device).train()
    opt = torch.optim.AdamW(param_groups(m, tcfg.weight_decay), lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                            eps=tcfg.adam_eps)
    sched = lr_scheduler(opt, schedule(tcfg.max_steps, tcfg.warmup_ratio, tcfg.min_lr_ratio))
    stream = PackedStream(splits, tcfg.seq_len, tcfg.micro_batch_size, seed=tcfg.seed)
    times = []
    for _ in range(tcfg.max_steps - 1):
        t0 = time.perf_counter()
        for _ in range(tcfg.grad_accum):
            b = {k: v.to(device) for k, v in next(stream).items()}
            logits = m(b["input_ids"], position_ids=b["position_ids"])
            loss = F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX)
            (loss / tcfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), tcfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return sum(times[warmup:]) / len(times[warmup:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="nano")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dist = init_distributed()
    mcfg = ModelConfig(vocab_size=args.vocab, max_position_embeddings=args.seq, **PRESETS[args.preset])
    tcfg = TrainConfig(seq_len=args.seq, micro_batch_size=args.batch, max_steps=args.steps, save_every=10**9,
                       eval_every=10**9, keep_last=1, lr=1e-3, seed=0)
    splits = corpus(args.vocab)
    peak = measure_peak_flops(dist.device, torch.float32)
    flops = model(mcfg).flops_per_token(args.seq)
    tokens = args.batch * args.seq
    lm2_s, hand_s = [], []
    for r in range(args.rounds):
        hand_s.append(run_hand(mcfg, tcfg, splits, args.warmup, dist.device))
        lm2_s.append(run_lm2(mcfg, tcfg, splits, args.warmup))
        print(f"round {r + 1}: hand-written {tokens / hand_s[-1]:,.0f} tok/s, lm2 {tokens / lm2_s[-1]:,.0f} tok/s",
              file=sys.stderr)
    hand_tps, lm2_tps = tokens / min(hand_s), tokens / min(lm2_s)
    result = {
        "preset": args.preset, "vocab": args.vocab, "seq": args.seq, "batch": args.batch, "threads": args.threads,
        "device": dist.device.type, "precision": "fp32", "params": model(mcfg).num_params(),
        "hand_tokens_per_s": round(hand_tps, 1), "lm2_tokens_per_s": round(lm2_tps, 1),
        "ratio": round(lm2_tps / hand_tps, 3), "matmul_peak_gflops": round(peak / 1e9, 1),
        "mfu_lm2": round(lm2_tps * flops / peak, 4), "mfu_hand": round(hand_tps * flops / peak, 4),
    }
    print(json.dumps(result))
    print(f"lm2 fit {lm2_tps:,.0f} tok/s vs hand-written {hand_tps:,.0f} tok/s: ratio {result['ratio']:.3f} "
          f"(target >= 0.95); MFU {result['mfu_lm2']:.1%} of the measured {result['matmul_peak_gflops']} GFLOP/s "
          f"fp32 matmul peak ({args.threads} threads)")


if __name__ == "__main__":
    main()
