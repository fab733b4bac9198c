"""Needle forced choice: one shared prefix (the prompt run once, its KV cache copied per candidate) against
the five-pass reference (one full prompt + candidate row per candidate), side by side in one run.

Both score the same passkey samples (1 key + 4 distractors each) on the same random model, with the same
threads, device and dtype; the timed calls alternate and the best of `--repeats` counts for each. The
script also reports the largest difference between the two scores (float rounding only).

    python bench/needle_choice.py                          # width 256, 4 layers, lengths 1024 and 2048, CPU
    python bench/needle_choice.py --device cuda --lengths 4096,16384 --hidden 1024 --layers 8

Target: five-pass / shared >= 3 at 1,024 tokens and above (the prefix dominates: ~5x fewer long forwards).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--samples", type=int, default=4, help="samples per length (one shared-prefix batch)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm2cli.config import ModelConfig, TokenizerConfig
    from lm2cli.evaluate import needle as N
    from lm2cli.model import InternLM2
    from lm2cli.tokenizer import build_vocab

    tok = build_vocab(TokenizerConfig(n_en=1000, n_zh=0, n_spare=17, pad_multiple=128), Counter())[0]
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 2),
                      num_key_value_heads=max(args.hidden // 128, 1), max_position_embeddings=max(lengths))
    model = InternLM2(cfg).eval().to(args.device)
    task, hay = N.TASKS["passkey"], N.filler_haystack("passkey")
    print(f"model: {model.num_params() / 1e6:.1f}M params, {args.device}, {torch.get_num_threads()} threads; "
          f"{args.samples} samples x 5 candidates per length")
    print(f"{'length':>7} {'five-pass s':>12} {'shared s':>9} {'ratio':>6} {'max |diff|':>11}")
    for n in lengths:
        samples = [N.build_sample(task, hay, tok, tok, n, d, 0, buffer=8, bos_id=tok.bos_id)
                   for d in torch.linspace(0, 100, args.samples).tolist()]
        conts = [[tok.encode(c) for c in s.choices] for s in samples]

        def five(samples=samples, conts=conts):
            return [N.choice_logprobs(model, s.ids, cs, pad_id=tok.pad_id) for s, cs in zip(samples, conts)]

        def shared(samples=samples, conts=conts):
            return N.shared_prefix_logprobs(model, [s.ids for s in samples], conts, pad_id=tok.pad_id)

        a, b = five(), shared()  # warm-up, and the scores to compare
        diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        best = {"five": float("inf"), "shared": float("inf")}
        for _ in range(args.repeats):
            for name, fn in (("five", five), ("shared", shared)):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - t)
        print(f"{n:>7} {best['five']:>12.3f} {best['shared']:>9.3f} {best['five'] / best['shared']:>6.2f} {diff:>11.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
