"""lm2 prepare (local pool, Ray) vs datatrove on one mixed zh/en/code corpus: docs/s, peak memory, dedup.

    python bench/prepare.py --size 1G [--workers 2] [--engines lm2-local,lm2-ray,datatrove]
                            [--scaling] [--datatrove-python PATH] [--cache ~/.cache/lm2-bench]

Corpus (generated once into --cache, outside the repo, reused by later runs): real text repeated with
perturbations, about 45 % Chinese, 35 % English and 20 % code by bytes, as JSONL files of ~64 MB:
  zh    People's Daily 1998 articles (lm2.data.realtext `zh_news`): each document strings together runs
        of consecutive sentences from 2-4 articles, with numbers redrawn
  en    ABC news stories (`en_news`) and the Python documentation of the examples corpus: sentence runs
        likewise, 8 % of words swapped for other words of the corpus
  code  windows of 30-150 lines of the Python standard library's own source, a few identifiers renamed
  plus planted duplicates: 4 % exact copies and 4 % near copies (1.5 % of characters, words or lines edited) of
  earlier documents, whose removal is the dedup recall reported.

Each tool runs on the same files with the same number of worker processes:
  lm2-local  lm2 prepare --engine local -j W: format, classify (pycld2), CJK-aware Gopher/C4/FineWeb-2 rules
             (jieba words for zh), exact + MinHash-LSH dedup on disk (5-grams, 128 perms, 16x8),
             safety blocklists; no model-based quality filters
  lm2-ray    the same on a Ray cluster of W one-CPU nodes on loopback (`ray start --head` + workers)
  datatrove  JsonlReader -> GopherRepetition, GopherQuality, C4Quality (en), FineWebQuality (FineWeb-2 cmn
             thresholds for zh; no filter for code) -> JsonlWriter, then MinhashDedupSignature / Buckets /
             Cluster / Filter (5-grams, 16 buckets x 8 hashes, 64-bit hashes), LocalPipelineExecutor
             with W workers; words from its own tokenizers (spaCy for en, jieba for zh)
What still differs: lm2 also identifies the language and runs safety; datatrove is handed the language;
datatrove tokenizes words separately in every filter, lm2 once per document; shingles are lm2's mixed
tokens (a CJK ideograph is a token) vs datatrove's words; signature hashing is xxh32 + datasketch's
affine permutations vs datatrove's sha1-based 64-bit hashes.

Memory is the peak of the summed RSS of every process of the run (the driver, its pool, and for Ray the
raylets, GCS and workers), sampled every 0.2 s. `--dedup-scaling` signs every document of the corpus
(lm2's MinHash, no filters) and then runs the dedup stages alone, in one process, on the first quarter
of the files and on all of them, on disk (`prepare.dedup.storage=disk`, the default: at most
`memory_budget_mb` per task) and with the in-memory datasketch index: peak RSS against corpus size.
Timings on a shared machine are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lm2cli.config import examples_dir  # noqa: E402
from lm2cli.data import realtext  # noqa: E402

FILE_BYTES = 64 << 20
CORPUS_VERSION = 2
SIZES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise SystemExit(f"--size: expected e.g. 50M or 1G, got {text!r}")
    return int(float(m.group(1)) * SIZES.get(m.group(2), 1))


# ---------------------------------------------------------------------------------------------------
# Corpus


_SENT = re.compile(r"(?<=[。！？!?])|(?<=\. )")
_DIGITS = re.compile(r"[0-9０-９]")
_FULL = "０１２３４５６７８９"


def _sentences(texts: list[str]) -> list[list[str]]:
    return [[s for s in _SENT.split(t.replace("\n", " ")) if s.strip()] for t in texts]


def _pools() -> dict:
    zh = _sentences(realtext.load("zh_news"))
    en_texts = realtext.load("en_news")
    docs = examples_dir() / "corpus" / "books" / "en_stdlib_docs.jsonl"
    with open(docs, encoding="utf-8") as f:
        en_texts += [json.loads(line).get("text", "") for line in f]
    en = _sentences([t for t in en_texts if t])
    words = sorted({w for doc in en for s in doc for w in s.split() if w.isalpha()})
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = []
    for p in sorted(lib.rglob("*.py")):
        if "site-packages" in p.parts or "test" in p.parts:
            continue
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        if len(lines) >= 60:
            code.append(lines)
    return {"zh": [d for d in zh if len(d) >= 3], "en": [d for d in en if len(d) >= 3], "words": words, "code": code}


def _runs(rng: random.Random, pool: list[list[str]], k: tuple[int, int], run: tuple[int, int], joiner: str) -> list[str]:
    """k paragraphs, each a run of consecutive sentences of a random source document."""
    paras = []
    for _ in range(rng.randint(*k)):
        doc = rng.choice(pool)
        n = rng.randint(*run)
        i = rng.randrange(max(1, len(doc) - n + 1))
        paras.append(joiner.join(s.strip() for s in doc[i:i + n]))
    return paras


def _zh(rng: random.Random, pools: dict) -> str:
    paras = _runs(rng, pools["zh"], (2, 5), (2, 6), "")
    return "\n".join(_DIGITS.sub(lambda m: _FULL[rng.randrange(10)] if m.group() in _FULL else str(rng.randrange(10)), p)
                     for p in paras)


def _en(rng: random.Random, pools: dict) -> str:
    words = pools["words"]
    out = []
    for p in _runs(rng, pools["en"], (3, 6), (2, 5), " "):
        ws = p.split()
        for i in range(len(ws)):
            if ws[i].isalpha() and rng.random() < 0.08:
                ws[i] = rng.choice(words)
        out.append(" ".join(ws))
    return "\n\n".join(out)


_IDENT = re.compile(r"\b(?:def|class)\s+([A-Za-z_]\w*)|\b([a-z_][a-z0-9_]{3,})\s*=")


def _code(rng: random.Random, pools: dict) -> str:
    lines = rng.choice(pools["code"])
    n = rng.randint(30, 150)
    i = rng.randrange(max(1, len(lines) - n + 1))
    text = "\n".join(lines[i:i + n]) + "\n"
    names = sorted({a or b for a, b in _IDENT.findall(text)})
    for name in rng.sample(names, min(len(names), 3)):
        text = re.sub(rf"\b{re.escape(name)}\b", f"{name}_{rng.randrange(1 << 16):x}", text)
    return text


def _near(rng: random.Random, text: str, lang: str) -> str:
    if lang == "code":
        lines = text.splitlines()
        for _ in range(max(1, len(lines) // 66)):
            j = rng.randrange(len(lines))
            lines[j] = lines[j] + f"  # {rng.randrange(1000)}"
        return "\n".join(lines) + "\n"
    if lang == "zh":
        chars = list(text)
        for _ in range(max(1, len(chars) // 66)):
            j = rng.randrange(len(chars))
            chars[j] = chr(0x4E00 + rng.randrange(0x5000))
        return "".join(chars)
    ws = text.split(" ")
    for _ in range(max(1, len(ws) // 66)):
        ws[rng.randrange(len(ws))] = rng.choice(["the", "a", "new", "report", "said"])
    return " ".join(ws)


def build_corpus(size: int, cache: Path, seed: int = 0) -> Path:
    """JSONL files under cache/corpus-v<version>-<bytes>/, written once (a DONE file marks a whole corpus)."""
    out = cache / f"corpus-v{CORPUS_VERSION}-{size}"
    if (out / "DONE").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    pools = _pools()
    rng = random.Random(seed)
    makers = {"zh": _zh, "en": _en, "code": _code}
    share = {"zh": 0.45, "en": 0.35, "code": 0.20}
    written = {k: 0 for k in share}
    recent: list[tuple[str, str, str]] = []  # (id, text, lang) of earlier documents, for planted copies
    planted = []
    total = n = part = 0
    file_bytes = min(FILE_BYTES, max(1 << 20, size // 8))  # at least 8 files: every tool gets parallel tasks
    f = open(out / f"docs-{part:04d}.jsonl", "w", encoding="utf-8")
    while total < size:
        r = rng.random()
        if recent and r < 0.08:
            src_id, src, lang = rng.choice(recent)
            kind = "exact" if r < 0.04 else "near"
            text = src if kind == "exact" else _near(rng, src, lang)
            ident = f"{kind}-{n:08d}"
            planted.append([src_id, ident, kind])
        else:
            lang = min(share, key=lambda k: written[k] / share[k])
            text = makers[lang](rng, pools)
            ident = f"{lang}-{n:08d}"
            if len(recent) < 20000:
                recent.append((ident, text, lang))
            else:
                recent[rng.randrange(len(recent))] = (ident, text, lang)
        line = json.dumps({"id": ident, "text": text, "content_type": "code" if lang == "code" else "web",
                           "lang": lang}, ensure_ascii=False) + "\n"
        nbytes = len(line.encode("utf-8"))
        written[lang] += nbytes
        total += nbytes
        n += 1
        f.write(line)
        if f.tell() >= file_bytes:
            f.close()
            part += 1
            f = open(out / f"docs-{part:04d}.jsonl", "w", encoding="utf-8")
    f.close()
    (out / "planted.json").write_text(json.dumps(planted))
    (out / "DONE").write_text(json.dumps({"docs": n, "bytes": total, "by_lang_bytes": written,
                                          "seconds": round(time.perf_counter() - t0, 1)}))
    return out


def corpus_files(corpus: Path, fraction: float = 1.0) -> list[Path]:
    files = sorted(corpus.glob("docs-*.jsonl"))
    return files[:max(1, round(len(files) * fraction))]


def count_docs(files: list[Path]) -> int:
    n = 0
    for p in files:
        with open(p, "rb") as f:
            n += sum(1 for _ in f)
    return n


# ---------------------------------------------------------------------------------------------------
# Measuring: wall time and the peak of the summed RSS of a set of processes


class MemorySampler:
    def __init__(self, roots, also=None, every: float = 0.2):
        self.roots, self.also, self.every = roots, also or (lambda: []), every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            procs = {}
            for root in list(self.roots()) + list(self.also()):
                try:
                    p = psutil.Process(root)
                    procs[p.pid] = p
                    for c in p.children(recursive=True):
                        procs[c.pid] = c
                except psutil.Error:
                    continue
            total = 0
            for p in procs.values():
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(cmd: list[str], env: dict, also=None, cwd=None) -> dict:
    import resource

    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with MemorySampler(lambda: [proc.pid], also) as mem:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{err[-4000:]}")
    # CPU of the child and every descendant it waited for (a Ray cluster's workers are not among them)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return {"wall": wall, "cpu_s": round(cpu, 1), "rss_mb": mem.peak / 2**20, "stdout": out}


def clean_env() -> dict:
    return dict(os.environ, PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")


# ---------------------------------------------------------------------------------------------------
# lm2


LM2_SETS = ["prepare.quality.ad_model=none", "prepare.quality.fluency_model=none", "prepare.safety.toxic_model=none"]


def run_lm2(files: list[Path], work: Path, workers: int, engine: str = "local", address: str = "",
            also=None) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    task_mb = max(1, sum(p.stat().st_size for p in files) / 1e6 / (4 * workers))
    sets = [f"--set={s}" for s in LM2_SETS + [f"prepare.task_mb={min(64, task_mb):.0f}"]]
    cmd = [str(Path(sys.executable).parent / "lm2"), "prepare", *map(str, files), "--workdir", str(work),
           "--recipe", "tiny", "--engine", engine, "-j", str(workers), *sets, "--json"]
    if address:
        cmd += ["--ray-address", address]
    r = timed(cmd, clean_env(), also)
    stats = json.loads((work / "data" / "prepared" / "manifest.json").read_text())["stats"]
    r.pop("stdout")
    r["stats"] = {"kept": stats["kept_records"], "dedup": stats["dedup"], "resources": stats["resources"]}
    r["dedup_rss_mb"] = max(v for k, v in stats["resources"]["peak_rss_mb"].items() if k.startswith("dedup"))
    return r


def lm2_ids(work: Path) -> tuple[set, set]:
    prepared = work / "data" / "prepared"
    before, after = set(), set()
    for p in sorted((prepared / "kept").glob("*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                key = json.loads(line)["meta"].get("orig_id")
                before.add(key)
                after.add(key)
    for stage in ("dedup", "safety", "quality"):
        for p in sorted((prepared / "rejected" / stage).glob("*.jsonl")):
            with open(p, encoding="utf-8") as f:
                for line in f:
                    key = json.loads(line)["meta"].get("orig_id")
                    before.add(key)
                    if stage != "dedup":
                        after.add(key)
    return before, after


class RayCluster:
    """`ray start --head` + workers-1 more nodes, one CPU each, on loopback, in a private temp dir."""

    def __init__(self, nodes: int, temp: Path):
        self.nodes, self.temp = nodes, temp
        self.ray = str(Path(sys.executable).parent / "ray")

    def __enter__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        shutil.rmtree(self.temp, ignore_errors=True)
        self.temp.mkdir(parents=True)
        common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]
        subprocess.run([self.ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                        "--include-dashboard=false", f"--temp-dir={self.temp}", *common],
                       env=clean_env(), check=True, capture_output=True, timeout=600)
        for _ in range(self.nodes - 1):
            subprocess.run([self.ray, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", *common],
                           env=clean_env(), check=True, capture_output=True, timeout=600)
        self.address = f"127.0.0.1:{port}"
        return self

    def pids(self) -> list[int]:
        """The cluster's daemons (their command lines name our temp dir); their workers are their children."""
        import psutil

        out = []
        for p in psutil.process_iter(["cmdline"]):
            if str(self.temp) in " ".join(p.info["cmdline"] or []):
                out.append(p.pid)
        return out

    def __exit__(self, *exc):
        subprocess.run([self.ray, "stop", "--force"], env=clean_env(), capture_output=True, timeout=300)


# ---------------------------------------------------------------------------------------------------
# datatrove (its own venv: it needs numpy>=2, lm2 pins numpy<2)


DATATROVE = """
import os, subprocess, sys
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

SRC, W, WORKERS, N_FILES = (sys.argv[1:5] + ["", "", "1", "1"][len(sys.argv[1:5]):])
WORKERS, N_FILES = int(WORKERS), int(N_FILES)
ZH_STOP = ["的", "年", "在", "月", "是", "和", "日", "了", "於", "·", "為", "有", "被", "人", "中", "为", "他", "與",
           "後", "也", "而", "由"]
FILTERS = {
    "en": [GopherRepetitionFilter(language=Languages.english), GopherQualityFilter(language=Languages.english),
           C4QualityFilter(filter_no_terminal_punct=False, language=Languages.english),
           FineWebQualityFilter(language=Languages.english)],
    # FineWeb-2 cmn_Hani thresholds
    "zh": [GopherRepetitionFilter(dup_line_frac=0.287, dup_para_frac=None, dup_line_char_frac=None,
                                  dup_para_char_frac=None, top_n_grams=((2, 0.256), (3, 0.201), (4, 0.171)),
                                  dup_n_grams=((5, 0.198), (6, 0.182), (7, 0.167), (8, 0.154), (9, 0.14),
                                               (10, 0.127)), language=Languages.mandarin_chinese),
           GopherQualityFilter(min_avg_word_length=1, max_avg_word_length=5, max_non_alpha_words_ratio=0.735,
                               stop_words=ZH_STOP, language=Languages.mandarin_chinese),
           FineWebQualityFilter(line_punct_thr=0.106, short_line_thr=1.0, char_duplicates_ratio=0.1,
                                new_line_ratio=0.178, stop_chars=(".", "!", "?", "。", "！", "？", "；", "…"),
                                language=Languages.mandarin_chinese)],
}


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


config = MinhashConfig(n_grams=5, num_buckets=16, hashes_per_bucket=8, seed=1, hash_config=HashConfig(precision=64))
kw = dict(workers=WORKERS, skip_completed=False)
STAGES = {
    "filter": lambda: LocalPipelineExecutor([JsonlReader(SRC), ByLanguage(), JsonlWriter(W + "/filtered")],
                                            tasks=N_FILES, logging_dir=W + "/logs/f", **kw),
    "signature": lambda: LocalPipelineExecutor(
        [JsonlReader(W + "/filtered"), MinhashDedupSignature(output_folder=W + "/sigs", config=config,
                                                             language=Languages.mandarin_chinese)],
        tasks=N_FILES, logging_dir=W + "/logs/1", **kw),
    "buckets": lambda: LocalPipelineExecutor(
        [MinhashDedupBuckets(input_folder=W + "/sigs", output_folder=W + "/buckets", config=config)],
        tasks=config.num_buckets, logging_dir=W + "/logs/2", **kw),
    "cluster": lambda: LocalPipelineExecutor(
        [MinhashDedupCluster(input_folder=W + "/buckets", output_folder=W + "/clusters", config=config)],
        tasks=1, logging_dir=W + "/logs/3", **kw),
    "dedup": lambda: LocalPipelineExecutor(
        [JsonlReader(W + "/filtered"), MinhashDedupFilter(input_folder=W + "/clusters"), JsonlWriter(W + "/out")],
        tasks=N_FILES, logging_dir=W + "/logs/4", **kw),
}
# One process per stage, as datatrove's own examples run them (its executors deep-copy the pipeline,
# which fails once a shared spaCy tokenizer was loaded in the same process). The guard keeps its spawned
# pool workers, which import this file, from running stages themselves.
if __name__ == "__main__":
    if len(sys.argv) > 5:
        STAGES[sys.argv[5]]().run()
    else:
        for stage in STAGES:
            r = subprocess.run([sys.executable, __file__, *sys.argv[1:5], stage], capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stderr[-4000:])
"""


NO_INTERNET = """
import socket
_connect = socket.socket.connect
def _local_only(self, address, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
        raise OSError(f"no internet in this benchmark: {address}")
    return _connect(self, address, *args)
socket.socket.connect = _local_only
"""


def find_datatrove(given: str | None, cache: Path) -> str | None:
    for py in (given, os.environ.get("DATATROVE_PYTHON"), str(cache / "dt-venv" / "bin" / "python"),
               "/work/bench-venv/bin/python", sys.executable):
        if py and Path(py).exists():
            if subprocess.run([py, "-c", "import datatrove, spacy, jieba"], capture_output=True).returncode == 0:
                return py
    return None


def run_datatrove(python: str, files: list[Path], work: Path, workers: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "input"
    src.mkdir()
    for p in files:  # datatrove reads a folder
        os.symlink(p, src / p.name)
    script = work / "pipeline.py"
    script.write_text(DATATROVE)
    # This machine has no internet: a library reaching for it would wait on a dead connection, so such
    # connects fail at once (local sockets, which its process pool uses, still work).
    (work / "sitecustomize.py").write_text(NO_INTERNET)
    env = dict(clean_env(), PYTHONPATH=str(work))
    r = timed([python, str(script), str(src), str(work), str(workers), str(len(files))], env, cwd=work)
    r.pop("stdout")
    return r


def dt_ids(work: Path) -> tuple[set, set]:
    import gzip

    def ids(folder: Path) -> set:
        out = set()
        for p in sorted(folder.glob("*.jsonl*")):
            opener = gzip.open if str(p).endswith(".gz") else open
            with opener(p, "rt", encoding="utf-8") as f:
                for line in f:
                    out.add(json.loads(line)["id"])
        return out

    return ids(work / "filtered"), ids(work / "out")


def recall(planted: list, before: set, after: set) -> dict:
    """Planted copies whose pair both passed the filters: removed when exactly one of the pair is left."""
    counted = removed = 0
    for src, copy, _ in planted:
        if src in before and copy in before:
            counted += 1
            removed += (src in after) + (copy in after) == 1
    return {"planted_pairs": counted, "recall": round(removed / max(1, counted), 4)}


# ---------------------------------------------------------------------------------------------------
# Dedup memory against corpus size: the dedup stages alone, on signatures of a quarter and of all the corpus


def sign_file(t: int, path: str, out: str) -> dict:
    """What phase A hands dedup for one input file (every document, no filters): keys and signatures."""
    import numpy as np

    from lm2cli.config import DedupConfig
    from lm2cli.data import dedup
    from lm2cli.data.standardize import content_id

    signer, sigs, lines = dedup.Signer(DedupConfig()), [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            sig = signer.signature(rec["text"])
            row = -1
            if sig is not None:
                row = len(sigs)
                sigs.append(sig)
            key = [rec["id"], dedup.exact_key(rec["text"], rec["lang"]), "", row]
            lines.append(json.dumps({"k": key}) + "\n")
    a = Path(out)
    np.save(a / f"sig-{t:05d}.npy", np.stack(sigs) if sigs else np.zeros((0, 128), np.uint32))
    (a / f"dedup-{t:05d}.jsonl").write_text("".join(lines))
    (a / f"done-{t:05d}.json").write_text(json.dumps({"passed": len(lines)}))
    return {"task": t}


DEDUP_CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, {src!r})
from lm2cli.config import DedupConfig, PrepareConfig
from lm2cli.data import pipeline
from lm2cli.data.executors import LocalExecutor, peak_rss_mb
out, n, storage = Path({out!r}), {n}, {storage!r}
cfg = PrepareConfig(dedup=DedupConfig(storage=storage, memory_budget_mb={budget}))
if storage == "disk":
    summary = pipeline.run_phase_b_disk(out, n, cfg, LocalExecutor(1), {{}})
else:
    summary = pipeline.run_phase_b(out, n, cfg)
print(json.dumps({{"rss_mb": peak_rss_mb(), **summary}}))
"""


def dedup_scaling(files: list[Path], work: Path, workers: int, budget_mb: float = 512.0) -> dict:
    from lm2cli.data.executors import LocalExecutor

    a = work / "signed"
    if not (a / "DONE").exists():
        shutil.rmtree(a, ignore_errors=True)
        a.mkdir(parents=True)
        t0 = time.perf_counter()
        list(LocalExecutor(workers).map(sign_file, [(t, str(p), str(a)) for t, p in enumerate(files)]))
        (a / "DONE").write_text(str(round(time.perf_counter() - t0, 1)))
    quarter = max(1, round(len(files) / 4))
    rows = []
    for n in (quarter, len(files)):
        for storage in ("disk", "memory"):
            out = work / f"{storage}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            (out / ".work" / "a").mkdir(parents=True)
            for t in range(n):
                for name in (f"sig-{t:05d}.npy", f"dedup-{t:05d}.jsonl", f"done-{t:05d}.json"):
                    os.symlink(a / name, out / ".work" / "a" / name)
            code = DEDUP_CHILD.format(src=str(ROOT / "src"), out=str(out), n=n, storage=storage, budget=budget_mb)
            r = timed([sys.executable, "-c", code], clean_env())
            summary = json.loads(r["stdout"].strip().splitlines()[-1])
            gib = sum(files[t].stat().st_size for t in range(n)) / 2**30
            rows.append({"gib": round(gib, 3), "storage": storage, "documents": summary["documents"],
                         "peak_rss_mb": round(r["rss_mb"]), "seconds": round(r["wall"], 1),
                         "dropped": summary.get("exact_duplicate", 0) + summary.get("near_duplicate", 0)})
            shutil.rmtree(out, ignore_errors=True)
            print(f"dedup {storage:<6} {rows[-1]['gib']:>6.3f} GiB {rows[-1]['documents']:>8} docs  peak RSS "
                  f"{rows[-1]['peak_rss_mb']:>6} MB  {rows[-1]['seconds']:>7.1f} s  dropped {rows[-1]['dropped']}",
                  flush=True)
    return {"rows": rows, "budget_mb": budget_mb}


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="corpus size (e.g. 50M for a quick look; the report uses >= 1G)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes / Ray nodes per tool")
    ap.add_argument("--engines", default="lm2-local,lm2-ray,datatrove", help="comma-separated; '' for none")
    ap.add_argument("--dedup-scaling", action="store_true", help="dedup stages alone (disk and in-memory) on "
                    "the signatures of the first quarter of the corpus and of all of it: peak RSS against size")
    ap.add_argument("--dedup-budget-mb", type=float, default=512.0, help="prepare.dedup.memory_budget_mb for "
                    "--dedup-scaling's disk runs")
    ap.add_argument("--datatrove-python", default=None, help="python of a venv with datatrove[processing], spacy, jieba")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lm2-bench")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: <cache>/results-<size>.json)")
    args = ap.parse_args()

    size = parse_size(args.size)
    corpus = build_corpus(size, args.cache)
    info = json.loads((corpus / "DONE").read_text())
    files = corpus_files(corpus)
    planted = json.loads((corpus / "planted.json").read_text())
    n_docs = info["docs"]
    print(f"corpus: {n_docs} documents, {info['bytes'] / 2**30:.3f} GiB in {len(files)} files ({corpus}); "
          f"bytes by language {info['by_lang_bytes']}", flush=True)
    runs = args.cache / "runs"
    out_path = args.out or args.cache / f"results-{size}.json"
    results: dict = {"corpus": {**info, "path": str(corpus)}, "workers": args.workers, "tools": {}}

    def save(name: str, r: dict) -> None:
        r["docs_per_s"] = round(n_docs / r["wall"], 1)
        results["tools"][name] = r
        out_path.write_text(json.dumps(results, indent=2))
        print(f"{name:<10} {r['docs_per_s']:>10.0f} docs/s  {r['wall']:>8.1f} s wall  {r.get('cpu_s', 0):>8.1f} s cpu  "
              f"peak RSS {r['rss_mb']:>7.0f} MB  recall {r.get('recall')}", flush=True)

    engines = [e for e in args.engines.split(",") if e]
    if "lm2-local" in engines:
        r = run_lm2(files, runs / "lm2-local", args.workers)
        r.update(recall(planted, *lm2_ids(runs / "lm2-local")))
        save("lm2-local", r)
    if "lm2-ray" in engines:
        with RayCluster(args.workers, Path("/tmp") / f"lm2-bench-ray-{os.getpid()}") as cluster:
            r = run_lm2(files, runs / "lm2-ray", args.workers, "ray", cluster.address, also=cluster.pids)
        r.update(recall(planted, *lm2_ids(runs / "lm2-ray")))
        save("lm2-ray", r)
    if "datatrove" in engines:
        py = find_datatrove(args.datatrove_python, args.cache)
        if py is None:
            print("datatrove: UNAVAILABLE (no python with datatrove, spacy and jieba; pass --datatrove-python)")
        else:
            r = run_datatrove(py, files, runs / "datatrove", args.workers)
            r.update(recall(planted, *dt_ids(runs / "datatrove")))
            save("datatrove", r)
    if args.dedup_scaling:
        results["dedup_scaling"] = dedup_scaling(files, runs / f"dedup-scaling-{size}", args.workers, args.dedup_budget_mb)
        out_path.write_text(json.dumps(results, indent=2))
    tools = results["tools"]
    if "lm2-local" in tools and "datatrove" in tools:
        a, b = tools["lm2-local"], tools["datatrove"]
        print(f"ratio lm2-local/datatrove: {b['wall'] / a['wall']:.2f}x docs/s, {a['rss_mb'] / b['rss_mb']:.2f}x peak "
              f"memory (target >= 3x docs/s, < 1x memory)")
    print(f"results -> {out_path}")


if __name__ == "__main__":
    main()
