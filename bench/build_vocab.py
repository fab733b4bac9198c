"""Memory of build-vocab's Chinese pre-token counting: bounded counters against one unbounded Counter.

A corpus whose distinct pre-tokens keep growing with its size (random 2-6 character "words" over 3,000
common ideographs, Zipf-distributed so a head of frequent words stands out from a long tail) is counted
twice in one run, on the same text: `count_pretokens` with lm2's pruning at `--max-keys` distinct
pre-tokens, and with no cap (what build-vocab did before: every pre-token of the corpus in one Counter).
Printed per corpus size: peak Python heap (tracemalloc) and distinct keys of each, the time, and for
the pre-tokens the unbounded count saw at least `--min-count` times (the ones BPE merges come from):
how many the bounded count kept and their mean relative undercount (lossy counting loses what a
pre-token gathered before a pruning dropped it, so only rare ones lose much).

    python bench/build_vocab.py                       # 8, 16, 32 MB of text, cap 200,000 keys
    python bench/build_vocab.py --mb 16 64 --max-keys 500000

Expect: the bounded peak stays flat as the corpus grows while the unbounded one grows with it, and the
frequent pre-tokens are all kept with small undercounts.
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc


def corpus(mb: float, seed: int = 0) -> list[str]:
    """Lines of space-separated Chinese words; the vocabulary of words grows with the text."""
    rng = random.Random(seed)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    head = ["".join(rng.choice(chars) for _ in range(rng.randint(2, 4))) for _ in range(5000)]
    lines, size = [], 0
    while size < mb * 1e6:
        words = []
        for _ in range(40):
            if rng.random() < 0.6:  # the frequent head, Zipf-like
                words.append(head[min(int(rng.paretovariate(1.1)) - 1, len(head) - 1)])
            else:  # the long tail: mostly new words
                words.append("".join(rng.choice(chars) for _ in range(rng.randint(2, 6))))
        line = " ".join(words)
        lines.append(line)
        size += len(line.encode("utf-8"))
    return lines


def measure(texts: list[str], pat: str, max_keys: int):
    from lm2cli.tokenizer import count_pretokens

    tracemalloc.start()
    t0 = time.perf_counter()
    counts = count_pretokens(texts, pat, max_keys=max_keys)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return counts, peak, seconds


def main() -> None:
    from lm2cli.config import TokenizerConfig
    from lm2cli.tokenizer import pretokenizer_pattern

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, nargs="+", default=[8, 16, 32])
    ap.add_argument("--max-keys", type=int, default=200_000)
    ap.add_argument("--min-count", type=int, default=50)
    args = ap.parse_args()
    pat = pretokenizer_pattern(TokenizerConfig())
    print(f"{'MB':>5} {'bounded peak':>13} {'keys':>9} {'s':>6} {'unbounded peak':>15} {'keys':>9} {'s':>6} "
          f"{'frequent kept':>14} {'undercount':>10}")
    for mb in args.mb:
        texts = corpus(mb)
        bounded, b_peak, b_s = measure(texts, pat, args.max_keys)
        full, f_peak, f_s = measure(texts, pat, 1 << 62)
        top = [k for k, c in full.items() if c >= args.min_count]
        shared = sum(k in bounded for k in top)
        under = sum((full[k] - bounded.get(k, 0)) / full[k] for k in top) / max(len(top), 1)
        print(f"{mb:>5g} {b_peak / 2**20:>10.1f} MB {len(bounded):>9,} {b_s:>6.1f} {f_peak / 2**20:>12.1f} MB "
              f"{len(full):>9,} {f_s:>6.1f} {shared:>8,}/{len(top):,} {under:>10.2%}")


if __name__ == "__main__":
    main()
