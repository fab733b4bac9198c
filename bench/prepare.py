"""lm2 prepare vs datatrove: documents/s and peak memory for comparable filters + MinHash dedup, one run.

    python bench/prepare.py [--extra 2000] [--datatrove-python PATH] [--repeats 1]

Both tools read the same flattened JSONL (the examples corpus plus `--extra` generated zh/en documents)
on one worker each, with MinHash 5-grams, 128 permutations, 16 bands x 8 rows:

  lm2        lm2 prepare (format, classify with pycld2, CJK-aware Gopher/C4/FineWeb rules, exact + MinHash-LSH
             dedup, safety blocklists), i.e. more work than datatrove is asked to do
  datatrove  JsonlReader -> per-language GopherRepetition, GopherQuality, C4Quality (en), FineWebQuality
             (FineWeb-2 cmn thresholds for zh) -> JsonlWriter; then MinhashDedupSignature/Buckets/Cluster/Filter
             (the FineWeb recipe), words from datatrove's own tokenizers (spaCy; jieba for zh)

Each tool runs in a child process that reports its wall time, CPU time and peak RSS (its own and its
pool's). Dedup recall is measured on the corpus's planted duplicate clusters (examples/planted.json):
a cluster counts when at least two members survived the tool's filters, and is recalled when exactly
one member is left after dedup; pairs below the threshold must both stay (`false merges`).

datatrove needs numpy>=2 while lm2 pins numpy<2, so it lives in its own venv: pass --datatrove-python, or
the script looks for /work/bench-venv, $DATATROVE_PYTHON, or `datatrove` importable here. Without it the
lm2 half still runs and the script says datatrove is unavailable.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lm2cli import synthetic as S  # noqa: E402
from lm2cli.config import examples_dir  # noqa: E402
from lm2cli.data import classify, readers  # noqa: E402
from lm2cli.data.standardize import standardize  # noqa: E402

OUT = ROOT / "bench" / "out" / "prepare"

CHILD_PREFIX = """
import json, resource, sys, time
t0, c0 = time.perf_counter(), time.process_time()
"""
CHILD_SUFFIX = """
ru_self = resource.getrusage(resource.RUSAGE_SELF)
ru_kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print("@@RESULT@@" + json.dumps({"wall": time.perf_counter() - t0,
      "cpu": ru_self.ru_utime + ru_self.ru_stime + ru_kids.ru_utime + ru_kids.ru_stime,
      "rss_mb": max(ru_self.ru_maxrss, ru_kids.ru_maxrss) / 1024}))
"""


def build_input(extra: int, seed: int = 0) -> Path:
    """Flatten the examples corpus (valid records only) plus generated documents into one JSONL."""
    src = OUT / "input"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    rows = []
    for f in readers.discover([examples_dir() / "corpus"]):
        for item in readers.read_unit(readers.Unit(str(f), f.stat().st_size), {"*/papers/*": "paper"}, 16_000_000):
            if "reject" in item:
                continue
            rec = standardize(item)
            if not rec["text"]:
                continue
            meta = rec["meta"]
            rows.append({"id": meta.get("doc_key") or f"ex-{len(rows):06d}", "text": rec["text"],
                         "content_type": rec["content_type"], **{k: meta[k] for k in ("cc_dump", "date") if k in meta}})
    rng = random.Random(seed)
    for i in range(extra):
        text = S.zh_document(rng) if i % 2 else S.en_document(rng)
        rows.append({"id": f"gen-{i:06d}", "text": text, "content_type": "web"})
    for r in rows:  # datatrove needs a language per document to pick its tokenizer; not timed
        r["lang"] = classify.classify(r["text"], r["content_type"])["lang"]
    with open(src / "docs.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return src


def run_child(python: str, body: str, cwd: Path) -> dict:
    script = cwd / f"child-{abs(hash(body)) % 10**8}.py"
    script.write_text(CHILD_PREFIX + textwrap.dedent(body) + CHILD_SUFFIX, encoding="utf-8")
    env = dict(os.environ, PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([python, str(script)], cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@"))
    return json.loads(line[len("@@RESULT@@"):])


def lm2_body(src: Path, work: Path) -> str:
    return f"""
    sys.path.insert(0, {str(ROOT / 'src')!r})
    from lm2cli.config import load_recipe
    from lm2cli.data.pipeline import run_prepare
    from lm2cli.layout import Workspace
    cfg = load_recipe("tiny", ["prepare.workers=1", "prepare.task_mb=64", "prepare.quality.ad_model=none",
                               "prepare.quality.fluency_model=none", "prepare.safety.toxic_model=none"]).prepare
    run_prepare([{str(src)!r}], Workspace.at({str(work)!r}), cfg, force=True)
    """


def datatrove_body(src: Path, work: Path) -> str:
    return f"""
    import logging, os
    os.environ["DATATROVE_COLORIZE_LOGS"] = "0"
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.typeshelper import Languages
    from datatrove.utils.hashing import HashConfig

    W = {str(work)!r}
    ZH_STOP = ["的", "年", "在", "月", "是", "和", "日", "了", "於", "·", "為", "有", "被", "人", "中", "为", "他", "與",
               "後", "也", "而", "由"]
    FILTERS = {{
        "en": [GopherRepetitionFilter(language=Languages.english), GopherQualityFilter(language=Languages.english),
               C4QualityFilter(filter_no_terminal_punct=False, language=Languages.english),
               FineWebQualityFilter(language=Languages.english)],
        # FineWeb-2 cmn_Hani thresholds (SPEC 4.4)
        "zh": [GopherRepetitionFilter(dup_line_frac=0.287, dup_para_frac=None, dup_line_char_frac=None,
                                      dup_para_char_frac=None, top_n_grams=((2, 0.256), (3, 0.201), (4, 0.171)),
                                      dup_n_grams=((5, 0.198), (6, 0.182), (7, 0.167), (8, 0.154), (9, 0.14),
                                                   (10, 0.127)), language=Languages.mandarin_chinese),
               GopherQualityFilter(min_avg_word_length=1, max_avg_word_length=5, max_non_alpha_words_ratio=0.265,
                                   stop_words=ZH_STOP, language=Languages.mandarin_chinese),
               FineWebQualityFilter(line_punct_thr=0.106, short_line_thr=1.0, char_duplicates_ratio=0.1,
                                    new_line_ratio=0.178, stop_chars=(".", "!", "?", "。", "！", "？", "；", "…"),
                                    language=Languages.mandarin_chinese)],
    }}
    FILTERS["mixed"] = FILTERS["zh"]

    class ByLanguage(PipelineStep):
        name = "filters by language"
        def run(self, data, rank=0, world_size=1):
            for doc in data:
                ok = True
                for f in FILTERS.get(doc.metadata.get("lang"), []):
                    res = f.filter(doc)
                    if not (res[0] if isinstance(res, tuple) else res):
                        ok = False
                        break
                if ok:
                    yield doc

    config = MinhashConfig(n_grams=5, num_buckets=16, hashes_per_bucket=8, seed=1,
                           hash_config=HashConfig(precision=64))
    kw = dict(tasks=1, workers=1, skip_completed=False)
    STAGES = {{
        "filter": lambda: LocalPipelineExecutor([JsonlReader({str(src)!r}), ByLanguage(), JsonlWriter(W + "/filtered")],
                                                logging_dir=W + "/logs/f", **kw),
        "signature": lambda: LocalPipelineExecutor(
            [JsonlReader(W + "/filtered"), MinhashDedupSignature(output_folder=W + "/sigs", config=config,
                                                                 language=Languages.mandarin_chinese)],
            logging_dir=W + "/logs/1", **kw),
        "buckets": lambda: LocalPipelineExecutor(
            [MinhashDedupBuckets(input_folder=W + "/sigs", output_folder=W + "/buckets", config=config)],
            logging_dir=W + "/logs/2", **dict(kw, tasks=config.num_buckets)),
        "cluster": lambda: LocalPipelineExecutor(
            [MinhashDedupCluster(input_folder=W + "/buckets", output_folder=W + "/clusters", config=config)],
            logging_dir=W + "/logs/3", **kw),
        "dedup": lambda: LocalPipelineExecutor(
            [JsonlReader(W + "/filtered"), MinhashDedupFilter(input_folder=W + "/clusters"), JsonlWriter(W + "/out")],
            logging_dir=W + "/logs/4", **kw),
    }}
    # One process per stage, as datatrove runs them (its executors deep-copy the pipeline, which fails once a
    # shared spaCy tokenizer has been loaded in the same process).
    import subprocess
    if len(sys.argv) > 1:
        STAGES[sys.argv[1]]().run()
    else:
        for stage in STAGES:
            r = subprocess.run([sys.executable, __file__, stage], capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stderr[-4000:])
    """


def _components(groups: list[dict]) -> list[set]:
    comps: list[set] = []
    for g in groups:
        keys = set(g["keys"])
        touching = [c for c in comps if c & keys]
        comps = [c for c in comps if not (c & keys)] + [keys.union(*touching)]
    return comps


def recall(before: set, after: set) -> dict:
    planted = json.loads((examples_dir() / "planted.json").read_text(encoding="utf-8"))["groups"]
    counted = recalled = 0
    for comp in _components([g for g in planted if g["kind"] != "below"]):
        members = comp & before
        if len(members) >= 2:
            counted += 1
            recalled += len(members & after) == 1
    in_clusters = set().union(*(set(g["keys"]) for g in planted if g["kind"] != "below"))
    # A below-threshold member that is also a planted copy's source may rightly go as a copy of *that*.
    below = [g for g in planted if g["kind"] == "below" and set(g["keys"]) <= before
             and not set(g["keys"]) & in_clusters]
    merged = sum(1 for g in below if not set(g["keys"]) <= after)
    return {"clusters": counted, "recall": recalled / max(1, counted), "below_pairs": len(below),
            "false_merges": merged}


def _ids(paths) -> set:
    import gzip

    out = set()
    for p in paths:
        opener = gzip.open if str(p).endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as f:
            for line in f:
                out.add(json.loads(line)["id"])
    return out


def lm2_sets(work: Path) -> tuple[set, set]:
    prepared = work / "data" / "prepared"
    before, after = set(), set()
    for p in sorted((prepared / "kept").glob("*.jsonl")):
        for line in open(p, encoding="utf-8"):
            key = json.loads(line)["meta"].get("orig_id")
            before.add(key)
            after.add(key)
    for stage in ("dedup", "safety", "quality"):
        for p in sorted((prepared / "rejected" / stage).glob("*.jsonl")):
            for line in open(p, encoding="utf-8"):
                r = json.loads(line)
                before.add(r["meta"].get("orig_id"))
                if stage != "dedup":
                    after.add(r["meta"].get("orig_id"))
    return before, after


def find_datatrove(given: str | None) -> str | None:
    candidates = [given, os.environ.get("DATATROVE_PYTHON"), "/work/bench-venv/bin/python", sys.executable]
    for py in candidates:
        if py and Path(py).exists():
            ok = subprocess.run([py, "-c", "import datatrove, spacy, jieba"], capture_output=True).returncode == 0
            if ok:
                return py
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extra", type=int, default=2000, help="generated zh/en documents added to the examples corpus")
    ap.add_argument("--datatrove-python", default=None, help="python of a venv with datatrove[processing], spacy, jieba")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool; the fastest is reported")
    args = ap.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    src = build_input(args.extra)
    n_docs = sum(1 for _ in open(src / "docs.jsonl", encoding="utf-8"))
    print(f"input: {n_docs} documents, {(src / 'docs.jsonl').stat().st_size / 1e6:.1f} MB ({src / 'docs.jsonl'})")

    results = {}
    work = OUT / "lm2"
    runs = []
    for _ in range(args.repeats):
        shutil.rmtree(work, ignore_errors=True)
        runs.append(run_child(sys.executable, lm2_body(src, work), OUT))
    results["lm2"] = min(runs, key=lambda r: r["wall"])
    results["lm2"].update(recall(*lm2_sets(work)))

    dt_python = find_datatrove(args.datatrove_python)
    if dt_python is None:
        print("datatrove: UNAVAILABLE (no python with datatrove, spacy and jieba; pass --datatrove-python)")
    else:
        work_dt = OUT / "datatrove"
        runs = []
        for _ in range(args.repeats):
            shutil.rmtree(work_dt, ignore_errors=True)
            runs.append(run_child(dt_python, datatrove_body(src, work_dt), OUT))
        results["datatrove"] = min(runs, key=lambda r: r["wall"])
        before = _ids(sorted((work_dt / "filtered").glob("*.jsonl*")))
        after = _ids(sorted((work_dt / "out").glob("*.jsonl*")))
        results["datatrove"].update(recall(before, after))

    print(f"{'tool':<10} {'docs/s (wall)':>14} {'docs/s (cpu)':>13} {'wall s':>8} {'cpu s':>7} {'peak MB':>8} "
          f"{'recall':>7} {'clusters':>9} {'false merges':>13}")
    for name, r in results.items():
        print(f"{name:<10} {n_docs / r['wall']:>14.0f} {n_docs / r['cpu']:>13.0f} {r['wall']:>8.1f} {r['cpu']:>7.1f} "
              f"{r['rss_mb']:>8.0f} {r['recall']:>7.3f} {r['clusters']:>9} {r['false_merges']:>6}/{r['below_pairs']}")
    if "datatrove" in results:
        a, b = results["lm2"], results["datatrove"]
        print(f"ratio lm2/datatrove: {b['wall'] / a['wall']:.2f}x docs/s (wall), {b['cpu'] / a['cpu']:.2f}x docs/s "
              f"(cpu), {a['rss_mb'] / b['rss_mb']:.2f}x peak memory; recall {a['recall']:.3f} vs {b['recall']:.3f}")
    (OUT / "results.json").write_text(json.dumps({"docs": n_docs, **results}, indent=2))


if __name__ == "__main__":
    main()
