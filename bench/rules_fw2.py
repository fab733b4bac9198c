"""lm2's Chinese rules beside datatrove's own FineWeb-2 filters (cmn_Hani config) on real news.

    python bench/rules_fw2.py [--python /path/to/python-with-datatrove]

Reads the People's Daily articles (`lm2cli.data.realtext`, zh_news), runs lm2's zh rule table and
datatrove's GopherRepetition + FineWebQuality + GopherQuality filters with FineWeb-2's cmn_Hani thresholds,
and prints keep rates, the reasons each side gives, and how often the two agree per document — on the
text as typeset and after NFKC (lm2 normalises before segmenting; datatrove does not, so jieba splits
full-width digits one by one there). datatrove needs spaCy and jieba: install them in a separate
environment (`python -m venv /tmp/dtv && /tmp/dtv/bin/pip install "datatrove[processing]" spacy jieba`)
and pass `--python /tmp/dtv/bin/python`; lm2's side runs in this interpreter.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# FineWeb-2's configs/cmn_Hani.yml, as datatrove's filters take them.
DATATROVE_SIDE = r'''
import json, sys, unicodedata
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, FineWebQualityFilter
cfg = json.loads(sys.argv[2])
filters = [
    GopherRepetitionFilter(language="cmn_Hani", dup_line_frac=cfg["dup_line_frac"], dup_para_frac=None,
                           dup_line_char_frac=None, dup_para_char_frac=None,
                           top_n_grams=tuple(zip((2, 3, 4), cfg["top"])), dup_n_grams=tuple(zip(range(5, 11), cfg["dup"]))),
    FineWebQualityFilter(language="cmn_Hani", line_punct_thr=cfg["line_punct"], new_line_ratio=cfg["newlines"],
                         char_duplicates_ratio=cfg["dup_line_chars"], short_line_thr=999),
    GopherQualityFilter(language="cmn_Hani", min_avg_word_length=cfg["min_avg"], max_avg_word_length=cfg["max_avg"],
                        stop_words=cfg["stop_words"], max_non_alpha_words_ratio=cfg["alpha"], min_stop_words=2),
]
for line in open(sys.argv[1], encoding="utf-8"):
    rec = json.loads(line)
    text = unicodedata.normalize("NFKC", rec["text"]) if rec["nfkc"] else rec["text"]
    reason = None
    for f in filters:
        r = f.filter(Document(text=text, id=rec["id"]))
        if r is not True:
            reason = r[1] if isinstance(r, tuple) else "dropped"
            break
    print(json.dumps({"id": rec["id"], "nfkc": rec["nfkc"], "reason": reason}))
'''


def lm2_side(docs: list[str]) -> list[str | None]:
    from lm2cli.config import RulesConfig
    from lm2cli.data import rules

    cfg = RulesConfig()
    out = []
    for text in docs:
        rec = {"text": text, "lang": "zh", "content_type": "web", "meta": {"lm2": {"lang_score": 1.0}}}
        out.append(rules.check(rec, cfg))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter with datatrove, spaCy and jieba")
    args = ap.parse_args()

    from lm2cli.config import RulesConfig
    from lm2cli.data import realtext

    docs = realtext.load("zh_news")
    zh = RulesConfig().zh
    cfg = {"dup_line_frac": zh.max_dup_line_frac, "top": zh.max_top_ngram_char_frac, "dup": zh.max_dup_ngram_char_frac,
           "line_punct": zh.fw_min_line_punct_ratio, "newlines": zh.fw_max_newlines_per_word,
           "dup_line_chars": zh.fw_max_dup_line_char_ratio, "min_avg": zh.min_avg_word_length,
           "max_avg": zh.max_avg_word_length, "stop_words": list(zh.stop_words), "alpha": zh.min_alpha_words_ratio}

    t = time.perf_counter()
    ours = lm2_side(docs)
    t_ours = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "docs.jsonl"
        with inp.open("w", encoding="utf-8") as f:
            for nfkc in (False, True):
                for i, text in enumerate(docs):
                    f.write(json.dumps({"id": str(i), "nfkc": nfkc, "text": text}, ensure_ascii=False) + "\n")
        t = time.perf_counter()
        done = subprocess.run([args.python, "-c", DATATROVE_SIDE, str(inp), json.dumps(cfg)], capture_output=True, text=True)
        t_theirs = time.perf_counter() - t
    if done.returncode != 0:
        print(f"datatrove side failed (is datatrove[processing] + spacy + jieba installed for {args.python}?):\n"
              + done.stderr[-2000:], file=sys.stderr)
        return 1
    theirs = {(r["id"], r["nfkc"]): r["reason"] for r in map(json.loads, done.stdout.splitlines())}

    n = len(docs)
    print(f"{n} People's Daily articles (Jan 1998), FineWeb-2 cmn_Hani thresholds")
    print(f"{'':28}{'kept':>8}{'share':>9}   top reasons")
    reasons = collections.Counter(ours)
    print(f"{'lm2 (jieba words, NFKC)':28}{reasons[None]:>8}{reasons[None] / n:>9.1%}   "
          + ", ".join(f"{r} {c}" for r, c in reasons.most_common() if r)[:120])
    for nfkc in (False, True):
        got = collections.Counter(theirs[(str(i), nfkc)] for i in range(n))
        label = "datatrove FW2" + (" on NFKC text" if nfkc else " as typeset")
        print(f"{label:28}{got[None]:>8}{got[None] / n:>9.1%}   "
              + ", ".join(f"{r} {c}" for r, c in got.most_common() if r)[:120])
    agree = sum((ours[i] is None) == (theirs[(str(i), True)] is None) for i in range(n))
    print(f"keep/drop agreement with datatrove on NFKC text: {agree}/{n} = {agree / n:.1%}")
    print(f"time: lm2 {t_ours:.1f} s (this interpreter), datatrove {t_theirs:.1f} s for both passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
