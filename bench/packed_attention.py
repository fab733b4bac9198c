"""Packed-document attention on CPU: peak memory and time of lm2's path against the dense mask, in one run.

For each length T (default 4k, 8k, 16k) one row of T tokens holds packed documents (seeded lengths,
~1k tokens on average). Three ways to compute its attention, forward + backward (training), GQA
as in InternLM2-7B (4 query heads per KV head; 4 over 1 here, head dim 64), fp32:

- `causal`:   one unpacked document of T tokens, SDPA is_causal — the cost floor of attention at T;
- `dense`:    the packed row through the old path, SDPA with the B×1×T×T boolean document mask;
- `segments`: the packed row through `attention.attend` on CPU (causal SDPA per document segment).

Each case runs in a fresh subprocess (one torch thread, the same inputs): its peak memory is the
process's peak resident set size (`VmHWM`, reset through /proc/self/clear_refs after the inputs are
built, so import-time peaks do not count) minus the resident size before the first call — torch's
CPU allocations are invisible to tracemalloc. Time is the best of `--repeats` calls, after a warm-up
call on 256 tokens (kernel selection, thread pools) that keeps a 16k case from running three times.

    python bench/packed_attention.py                    # 4k, 8k, 16k
    python bench/packed_attention.py --lengths 4096 --repeats 3

`--inference` times the forward alone under no_grad and adds `flex` (FlexAttention compiled for CPU,
which has no backward there; the compile, tens of seconds, happens in an untimed call at the full
length): whether CPU inference on packed rows would gain from it.

Targets: at 16k the dense path clearly worse than `segments` in memory and time; `segments` within 2×
of unpacked causal attention in both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# Scripts in bench/ may share a stdlib module's name (tokenize.py); keep this folder off the import path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

PATHS = ("causal", "dense", "segments")
HEADS, KV_HEADS, HEAD_DIM = 4, 1, 64  # 4 query heads per KV head, as InternLM2-7B (32 / 8)


def doc_positions(t: int, seed: int = 0):
    """position_ids of one packed row: documents of 64..3k tokens (mean ~1k), the last one cut at T."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pos, n = [], 0
    while n < t:
        length = min(int(torch.randint(64, 2048, (1,), generator=g)) * (1 + int(torch.rand(1, generator=g) < 0.3)), t - n)
        pos.append(torch.arange(length))
        n += length
    return torch.cat(pos)[None], len(pos)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(t: int, path: str, repeats: int, inference: bool = False) -> dict:
    import torch

    from lm2cli.attention import Documents, attend

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    pos, n_docs = doc_positions(t)

    def inputs(n: int):
        q = torch.randn(1, HEADS, n, HEAD_DIM, generator=g, requires_grad=not inference)
        k = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g, requires_grad=not inference)
        v = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g, requires_grad=not inference)
        return q, k, v, torch.randn(1, HEADS, n, HEAD_DIM, generator=g)

    def run(q, k, v, grad_out, pos):
        with torch.set_grad_enabled(not inference):
            if path == "causal":
                out = attend(q, k, v, causal=True)
            else:  # a fresh Documents per call, as each forward builds one (the dense mask included)
                out = attend(q, k, v, docs=Documents.from_positions(pos), backend=path)
        if not inference:
            out.backward(grad_out)
            q.grad = k.grad = v.grad = None

    case = inputs(t)
    if path == "flex":  # compiled for this exact shape: warm up at the full length
        run(*case, pos)
    else:
        run(*inputs(256), torch.cat([torch.arange(100), torch.arange(156)])[None])  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _rss_kib("VmRSS")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(*case, pos)
        best = min(best, time.perf_counter() - t0)
    peak = _rss_kib("VmHWM")
    return {"t": t, "path": path, "seconds": best, "peak_mib": (peak - before) / 1024, "docs": n_docs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per case (the best counts)")
    ap.add_argument("--inference", action="store_true", help="forward only, no_grad; adds FlexAttention")
    ap.add_argument("--child", nargs=2, metavar=("T", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(int(a.child[0]), a.child[1], a.repeats, a.inference)))
        return
    paths = PATHS + ("flex",) if a.inference else PATHS
    rows = {}
    for t in a.lengths:
        for path in paths:
            p = subprocess.run([sys.executable, __file__, "--child", str(t), path, "--repeats", str(a.repeats)]
                               + (["--inference"] if a.inference else []),
                               capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **_env()})
            if p.returncode != 0:
                sys.exit(f"{path} at T={t} failed:\n{p.stderr[-2000:]}")
            rows[t, path] = json.loads(p.stdout.strip().splitlines()[-1])
            r = rows[t, path]
            print(f"  T={t:>6} {path:<9} {r['seconds']:8.3f} s {r['peak_mib']:9.1f} MiB", file=sys.stderr, flush=True)
    print(f"packed attention, {'forward (no_grad)' if a.inference else 'fwd+bwd'}, fp32, 1 thread, "
          f"{HEADS} q / {KV_HEADS} kv heads × {HEAD_DIM}; "
          f"ratios against unpacked causal attention at the same T")
    print(f"{'T':>6}  {'docs':>4}  {'path':<9} {'time s':>8} {'× causal':>9} {'peak MiB':>9} {'× causal':>9}")
    for t in a.lengths:
        base = rows[t, "causal"]
        for path in paths:
            r = rows[t, path]
            print(f"{t:>6}  {r['docs']:>4}  {path:<9} {r['seconds']:8.3f} {r['seconds'] / base['seconds']:9.2f} "
                  f"{r['peak_mib']:9.1f} {r['peak_mib'] / max(base['peak_mib'], 1e-9):9.2f}")
    t = max(a.lengths)
    d, s, c = rows[t, "dense"], rows[t, "segments"], rows[t, "causal"]
    print(f"at T={t}: dense / segments = {d['seconds'] / s['seconds']:.2f}× time, "
          f"{d['peak_mib'] / max(s['peak_mib'], 1e-9):.2f}× memory; segments / causal = "
          f"{s['seconds'] / c['seconds']:.2f}× time, {s['peak_mib'] / max(c['peak_mib'], 1e-9):.2f}× memory "
          f"(target <= 2×)")


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


if __name__ == "__main__":
    main()
