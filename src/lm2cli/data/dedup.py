"""Exact and MinHash-LSH near-duplicate removal (SPEC §4.5, P2, P3, P14), on datasketch 2.0.

Shingles: NFKC, lowercase, digits -> 0, punctuation (CJK too) -> space, then 5-grams of mixed tokens
(a CJK ideograph is a token, so Chinese gets character 5-grams and English word 5-grams). Signatures are
datasketch `MinHash` (scheme/seed/num_perm from the recipe, shingles hashed with xxh32 by default); the
index is `MinHashLSH(params=(bands, rows))` with 16x8 passed explicitly, so the S-curve's midpoint sits at
0.707 rather than where `optimal_param` would put it. Every document is inserted first and queried after
(query-then-insert is not transitive), candidate pairs are optionally confirmed by signature Jaccard,
and clusters come from union-find.

Keep rule, per cluster (exact or near): the newest copy by `cc_dump`, else `date` (compared as strings,
the larger is newer; missing counts as oldest), then the lowest id, then the earliest input position.
Exact duplicates (same content hash; whitespace-insensitive for code) are removed before the LSH runs.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from ..config import DedupConfig
from . import mixed
from .standardize import content_id

_DIGIT = re.compile(r"\d")
_WS = re.compile(r"\s+")


def normalize_for_shingles(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = _DIGIT.sub("0", text)
    text = mixed.NON_WORD.sub(" ", text)
    return _WS.sub(" ", text).strip()


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Mixed-token n-grams of the normalised text; empty when the text has fewer than n tokens."""
    toks = mixed.tokens(normalize_for_shingles(text))
    return {" ".join(toks[i:i + n]).encode("utf-8") for i in range(len(toks) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two texts on lm2's dedup shingles."""
    sa, sb = shingles(a, n), shingles(b, n)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def s_curve(bands: int, rows: int, points=(0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)) -> dict:
    """P(candidate | Jaccard s) = 1 - (1 - s^r)^b, logged in the manifest (SPEC P3)."""
    return {f"{s:g}": round(1 - (1 - s ** rows) ** bands, 4) for s in points}


def scheme_record(cfg: DedupConfig) -> dict:
    """Everything that makes two signatures comparable; a resume refuses to mix different ones (P2)."""
    import datasketch

    return {"library": f"datasketch {datasketch.__version__}", "scheme": cfg.scheme, "seed": cfg.seed,
            "num_perm": cfg.num_perm,
            "hashfunc": ("xxh32 per token, polynomial n-gram mix folded to 32 bits" if cfg.hashfunc == "xxh32"
                         else "datasketch sha1_hash32 of the joined n-gram"), "bands": cfg.bands, "rows": cfg.rows,
            "threshold": cfg.threshold,
            "shingle": {"ngram": cfg.ngram, "unit": "mixed tokens (CJK char, Latin/digit run)",
                        "normalize": "NFKC, lowercase, digits->0, punctuation->space"}}


_P = np.uint64(0x9E3779B97F4A7C15)
CHUNK = 8192  # shingles per update_batch call: bounds the (shingles x num_perm) matrix datasketch builds


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """The document's shingle set as distinct 32-bit hashes (uint32).

    Each token is hashed once with xxh32; an n-gram's hash is the polynomial combination of its tokens'
    hashes mod 2^64, folded to 32 bits. This equals hashing the joined n-gram string in what it
    identifies (up to 32-bit collisions) and costs one C-level hash per token instead of a joined string per shingle.
    """
    import xxhash

    toks = mixed.tokens(normalize_for_shingles(text))
    m = len(toks) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint32)
    th = np.fromiter(map(xxhash.xxh32_intdigest, map(str.encode, toks)), dtype=np.uint64, count=len(toks))
    h = th[:m].copy()
    for k in range(1, n):
        h = h * _P + th[k:k + m]
    return np.unique(((h >> np.uint64(32)) ^ h).astype(np.uint32))


class Signer:
    """MinHash signatures with one set of datasketch permutations, copied per document (its bulk path).

    hashfunc "xxh32": shingles are pre-hashed by `shingle_hashes` and datasketch applies its scheme
    (fmix + affine permutations) to those integers; "sha1": datasketch's default sha1_hash32 of each
    joined n-gram string (slower, for comparison with other datasketch users).
    """

    def __init__(self, cfg: DedupConfig):
        from datasketch.hashfunc import sha1_hash32

        self.cfg = cfg
        fn = int if cfg.hashfunc == "xxh32" else sha1_hash32
        self.base = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=cfg.scheme, hashfunc=fn)
        self.dtype = self.base.hashvalues.dtype

    def signature(self, text: str) -> Optional[np.ndarray]:
        """The document's hash values, or None when it has no shingles (such documents are kept)."""
        if self.cfg.hashfunc == "xxh32":
            items = shingle_hashes(text, self.cfg.ngram).tolist()
        else:
            items = sorted(shingles(text, self.cfg.ngram))
        if not items:
            return None
        m = self.base.copy()
        for i in range(0, len(items), CHUNK):
            m.update_batch(items[i:i + CHUNK])
        return m.hashvalues

    def lean(self, hashvalues: np.ndarray) -> LeanMinHash:
        return LeanMinHash(seed=self.cfg.seed, hashvalues=hashvalues, scheme=self.cfg.scheme)


def exact_key(text: str, lang: str) -> str:
    # Code is compared whitespace-insensitively (InternLM2 §3.1.2); prose by its content hash.
    return content_id(_WS.sub("", text)) if lang == "code" else content_id(text)


@dataclass
class Entry:
    """One document entering dedup: its position, id, exact key, recency and signature row (or -1)."""

    pos: int
    id: str
    exact: str
    recency: str
    sig_row: int


def recency_of(meta: dict) -> str:
    for key in ("cc_dump", "date"):
        v = meta.get(key)
        if v not in (None, ""):
            return str(v)
    return ""


def _winner(members: list[Entry]) -> Entry:
    newest = max(m.recency for m in members)
    return min((m for m in members if m.recency == newest), key=lambda m: (m.id, m.pos))


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def storage_config(cfg: DedupConfig) -> tuple[Optional[dict], Optional[bytes]]:
    if cfg.storage != "redis":
        return None, None
    basename = f"lm2-lsh-{uuid.uuid4().hex[:12]}".encode()
    return ({"type": "redis", "basename": basename,
             "redis": {"host": cfg.redis_host, "port": cfg.redis_port, "db": cfg.redis_db}}, basename)


def _drop_redis_keys(cfg: DedupConfig, basename: bytes) -> None:
    import redis

    client = redis.Redis(host=cfg.redis_host, port=cfg.redis_port, db=cfg.redis_db)
    keys = list(client.scan_iter(match=basename + b"*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])


def find_duplicates(entries: list[Entry], sigs: np.ndarray, cfg: DedupConfig,
                    progress: Optional[Callable[[int], None]] = None) -> tuple[dict, dict]:
    """Decide dedup for every entry.

    Returns (drops, clusters): drops maps pos -> {"reason", "dup_of", "dup_cluster_id", "dup_cluster_size"}
    for removed documents; kept_info maps the kept pos of every multi-member cluster -> its
    {"dup_cluster_id", "dup_cluster_size"}.
    """
    drops: dict[int, dict] = {}
    kept_info: dict[int, dict] = {}
    survivors: list[Entry] = []
    if cfg.exact:
        groups: dict[str, list[Entry]] = {}
        for e in entries:
            groups.setdefault(e.exact, []).append(e)
        for members in groups.values():
            if len(members) == 1:
                survivors.append(members[0])
                continue
            win = _winner(members)
            survivors.append(win)
            cid = f"x-{win.exact[:12]}"
            kept_info[win.pos] = {"dup_cluster_id": cid, "dup_cluster_size": len(members)}
            for m in members:
                if m is not win:
                    drops[m.pos] = {"reason": "exact_duplicate", "dup_of": win.id, "dup_cluster_id": cid,
                                    "dup_cluster_size": len(members)}
    else:
        survivors = list(entries)
    signed = [e for e in survivors if e.sig_row >= 0]
    signer = Signer(cfg)
    config, basename = storage_config(cfg)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows),
                     storage_config=config)
    try:
        leans = [signer.lean(sigs[e.sig_row]) for e in signed]
        with lsh.insertion_session(buffer_size=10_000) as session:
            for i, m in enumerate(leans):
                session.insert(i, m, check_duplication=False)
        uf = _UnionFind(len(signed))
        for i, m in enumerate(leans):
            for j in lsh.query(m):
                if j == i or uf.find(i) == uf.find(j):
                    continue
                if cfg.confirm and m.jaccard(leans[j]) < cfg.threshold:
                    continue
                uf.union(i, j)
            if progress and (i + 1) % 1000 == 0:
                progress(1000)
        if progress:
            progress(len(leans) % 1000)
    finally:
        if basename is not None:
            _drop_redis_keys(cfg, basename)
    clusters: dict[int, list[int]] = {}
    for i in range(len(signed)):
        clusters.setdefault(uf.find(i), []).append(i)
    for root, idx in clusters.items():
        if len(idx) == 1:
            continue
        members = [signed[i] for i in idx]
        win = _winner(members)
        cid = f"n-{win.id[:12]}"
        kept_info[win.pos] = {"dup_cluster_id": cid, "dup_cluster_size": len(members)}
        for m in members:
            if m is not win:
                drops[m.pos] = {"reason": "near_duplicate", "dup_of": win.id, "dup_cluster_id": cid,
                                "dup_cluster_size": len(members)}
    return drops, kept_info


def summarize(entries: Iterable[Entry], drops: dict) -> dict:
    entries = list(entries)
    reasons: dict[str, int] = {}
    for d in drops.values():
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    return {"documents": len(entries), "no_shingles": sum(1 for e in entries if e.sig_row < 0), **reasons}


# ---------------------------------------------------------------------------------------------------
# The same decisions as `find_duplicates`, as distributed stages over files, in bounded memory.
#
# `find_duplicates` holds every signature and the LSH index in one process. Here each step is a task
# over files (run by any executor, retried safely: every output is written under a temporary name and
# renamed, and that rename is the task's marker), and no task holds more than about `memory_budget_mb`:
#
#   exact_shuffle(t)    per input task: its dedup keys -> one file per exact-key partition
#   exact_reduce(q)     per partition: groups by content hash, picks each group's winner (same rule)
#   band_runs(t)        per input task: each band of every surviving signature, sorted (one run per band)
#   buckets(b, q)       per band and key range: the matching slice of every run, sorted; documents with
#                       equal band values are candidates; confirmed pairs become edges
#   clusters()          union-find over the edges only, winners by the keep rule, per-task decisions
#
# Candidates are exactly datasketch's (two documents share a band when its `rows` hash values are equal),
# confirmation is the same `matches / num_perm >= threshold`, and the clusters are the connected
# components of the confirmed pairs, which do not depend on the order pairs are found in; so the kept and
# dropped documents equal the in-memory path's.

KEY_BYTES_PER_DOC = 512  # one exact-dedup entry in a reducer's dict (a list, an Entry, two strings)
_NODE_SHIFT = np.uint64(32)


def dedup_plan(n_docs: int, cfg: DedupConfig) -> dict:
    """How many partitions keep each reducer within the budget (one when the corpus fits)."""
    budget = max(1e-3, cfg.memory_budget_mb) * 1e6
    band_entry = (cfg.rows + 2) * 4 * 3  # key + row + task as uint32, about three copies while sorting
    return {"exact_parts": max(1, -(-n_docs * KEY_BYTES_PER_DOC // int(budget))),
            "band_parts": max(1, -(-n_docs * band_entry // int(budget))),
            "bands": cfg.bands, "rows": cfg.rows}


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _atomic_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
    os.replace(tmp, path)


def _keys(keys_path: Path) -> Iterable[tuple[int, list]]:
    """(position in the task, [id, exact, recency, sig_row]) for each document the task sent to dedup."""
    if not keys_path.exists():
        return
    with open(keys_path, encoding="utf-8") as f:
        for pos, line in enumerate(f):
            yield pos, json.loads(line)["k"]


def _part_of(exact: str, parts: int) -> int:
    return int(exact[:12], 16) % parts


def exact_shuffle(t: int, a_dir: str, b_dir: str, parts: int) -> dict:
    """Route task t's dedup keys to their exact-key partitions: x/<q>/<t>.jsonl."""
    from .executors import peak_rss_mb

    a_dir, b_dir = Path(a_dir), Path(b_dir)
    buffers: dict[int, list[str]] = {q: [] for q in range(parts)}
    for pos, (ident, exact, recency, row) in _keys(a_dir / f"dedup-{t:05d}.jsonl"):
        buffers[_part_of(exact, parts)].append(json.dumps([t, pos, ident, exact, recency, row]) + "\n")
    for q, lines in buffers.items():
        _atomic_lines(b_dir / "x" / f"{q:04d}" / f"{t:05d}.jsonl", lines)
    _atomic_lines(b_dir / "x" / f"done-{t:05d}", [])
    return {"task": t, "rss_mb": peak_rss_mb()}


def exact_reduce(q: int, b_dir: str, offsets: list[int], n_tasks: int) -> dict:
    """Exact-duplicate groups of partition q -> xo/<q>.jsonl: [task, pos, sig_row, is_drop, info] per member."""
    from .executors import peak_rss_mb

    b_dir = Path(b_dir)
    groups: dict[str, list[tuple[int, int, Entry]]] = {}
    for t in range(n_tasks):
        with open(b_dir / "x" / f"{q:04d}" / f"{t:05d}.jsonl", encoding="utf-8") as f:
            for line in f:
                task, pos, ident, exact, recency, row = json.loads(line)
                groups.setdefault(exact, []).append((task, pos, Entry(offsets[task] + pos, ident, exact, recency, row)))
    out = []
    for members in groups.values():
        if len(members) == 1:
            continue
        win = _winner([e for _, _, e in members])
        cid = f"x-{win.exact[:12]}"
        for task, pos, e in members:
            if e is win:
                out.append([task, pos, e.sig_row, False, {"dup_cluster_id": cid, "dup_cluster_size": len(members)}])
            else:
                out.append([task, pos, e.sig_row, True, {"reason": "exact_duplicate", "dup_of": win.id,
                                                          "dup_cluster_id": cid, "dup_cluster_size": len(members)}])
    out.sort(key=lambda r: (r[0], r[1]))
    _atomic_lines(b_dir / "xo" / f"{q:04d}.jsonl", (json.dumps(r) + "\n" for r in out))
    return {"part": q, "rss_mb": peak_rss_mb()}


def _exact_outcomes(b_dir: Path, task: Optional[int] = None) -> Iterable[list]:
    for p in sorted((b_dir / "xo").glob("*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if task is None or r[0] == task:
                    yield r


def band_runs(t: int, a_dir: str, b_dir: str, bands: int, rows: int, exact: bool) -> dict:
    """Task t's surviving signatures cut into bands, each band sorted by its values: bands/<b>/<t>.npy,
    uint32 columns = the band's `rows` hash values then the signature row."""
    from .executors import peak_rss_mb

    a_dir, b_dir = Path(a_dir), Path(b_dir)
    sig = np.load(a_dir / f"sig-{t:05d}.npy", mmap_mode="r")
    keep = np.ones(len(sig), dtype=bool)
    if exact:
        for r in _exact_outcomes(b_dir, t):
            if r[3] and r[2] >= 0:
                keep[r[2]] = False
    idx = np.flatnonzero(keep).astype(np.uint32)
    for b in range(bands):
        run = np.empty((len(idx), rows + 1), dtype=np.uint32)
        run[:, :rows] = sig[idx, b * rows:(b + 1) * rows]
        run[:, rows] = idx
        order = np.lexsort(run[:, :rows].T[::-1]) if len(run) else np.zeros(0, dtype=np.int64)
        _atomic_save(b_dir / "bands" / f"{b:03d}" / f"{t:05d}.npy", run[order])
    _atomic_lines(b_dir / "bands" / f"done-{t:05d}", [])
    return {"task": t, "rss_mb": peak_rss_mb()}


class _Sigs:
    """Signature rows by (task, row), read one by one from the .npy files. Not memory-mapped: mapped pages
    a bucket touches across every task's file would stay in its resident set, which would then grow with
    the corpus (they are reclaimable page cache, but they count)."""

    def __init__(self, a_dir: Path):
        self.a_dir, self.files = a_dir, {}

    def get(self, task: int, row: int) -> np.ndarray:
        entry = self.files.get(task)
        if entry is None:
            f = open(self.a_dir / f"sig-{task:05d}.npy", "rb")
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            assert not fortran and len(shape) == 2
            entry = self.files[task] = (f, f.tell(), shape[1] * dtype.itemsize, dtype)
        f, offset, width, dtype = entry
        f.seek(offset + row * width)
        return np.frombuffer(f.read(width), dtype=dtype)

    def close(self) -> None:
        for f, *_ in self.files.values():
            f.close()


def buckets(b: int, q: int, a_dir: str, b_dir: str, n_tasks: int, parts: int, rows: int,
            confirm: bool, threshold: float, num_perm: int) -> dict:
    """Candidate pairs of band b among documents whose band starts in key range q -> edges/<b>-<q>.npy
    (pairs of node ids task << 32 | row). Within a bucket, pairs already joined through confirmed pairs of
    the same bucket are not checked again; the edges kept span the same components."""
    from .executors import peak_rss_mb

    a_dir, b_dir = Path(a_dir), Path(b_dir)
    lo, hi = (q << 32) // parts, ((q + 1) << 32) // parts
    slices = []
    for t in range(n_tasks):
        run = np.load(b_dir / "bands" / f"{b:03d}" / f"{t:05d}.npy", mmap_mode="r")
        col = run[:, 0]
        i = int(np.searchsorted(col, lo)) if lo else 0
        j = int(np.searchsorted(col, hi)) if q < parts - 1 else len(run)  # 2**32 does not fit uint32
        if j > i:
            part = np.empty((j - i, rows + 2), dtype=np.uint32)
            part[:, :rows + 1] = run[i:j]
            part[:, rows + 1] = t
            slices.append(part)
    edges: list[tuple[int, int]] = []
    if slices:
        allr = np.concatenate(slices)
        del slices
        allr = allr[np.lexsort(allr[:, :rows].T[::-1])]
        change = np.any(allr[1:, :rows] != allr[:-1, :rows], axis=1)
        starts = np.flatnonzero(np.concatenate([[True], change]))
        ends = np.append(starts[1:], len(allr))
        sigs = _Sigs(a_dir)
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            nodes = [(int(t) << 32) | int(r) for r, t in allr[s:e, rows:rows + 2]]
            nodes.sort()
            if not confirm:
                edges.extend((nodes[0], n) for n in nodes[1:])
                continue
            vals = [sigs.get(n >> 32, n & 0xFFFFFFFF) for n in nodes]
            uf = _UnionFind(len(nodes))
            for i in range(len(nodes)):
                for j in range(i + 1, len(nodes)):
                    if uf.find(i) == uf.find(j):
                        continue
                    if int(np.count_nonzero(vals[i] == vals[j])) / num_perm < threshold:
                        continue
                    uf.union(i, j)
                    edges.append((nodes[i], nodes[j]))
        sigs.close()
    _atomic_save(b_dir / "edges" / f"{b:03d}-{q:04d}.npy", np.array(edges, dtype=np.uint64).reshape(-1, 2))
    return {"band": b, "part": q, "rss_mb": peak_rss_mb()}


def clusters(a_dir: str, b_dir: str, n_tasks: int, offsets: list[int]) -> dict:
    """Union-find over every edge; the keep rule per cluster; decisions-<t>.json per task (as phase B
    writes them in memory) and the dedup summary."""
    from .executors import peak_rss_mb

    a_dir, b_dir = Path(a_dir), Path(b_dir)
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for p in sorted((b_dir / "edges").glob("*.npy")):
        for u, v in np.load(p).tolist():
            parent.setdefault(u, u)
            parent.setdefault(v, v)
            ru, rv = find(u), find(v)
            if ru != rv:
                parent[max(ru, rv)] = min(ru, rv)
    members_of: dict[int, set[int]] = {}
    for node in parent:
        members_of.setdefault(node >> 32, set()).add(node & 0xFFFFFFFF)
    per_task: dict[int, dict] = {t: {"drops": {}, "kept": {}} for t in range(n_tasks)}
    for r in _exact_outcomes(b_dir):
        task, pos, _, is_drop, info = r
        per_task[task]["drops" if is_drop else "kept"][pos] = info
    comps: dict[int, list[tuple[int, Entry]]] = {}
    documents = no_shingles = 0
    for t in range(n_tasks):
        want = members_of.get(t, set())
        for pos, (ident, exact, recency, row) in _keys(a_dir / f"dedup-{t:05d}.jsonl"):
            documents += 1
            no_shingles += row < 0
            if row >= 0 and row in want:
                node = (t << 32) | row
                comps.setdefault(find(node), []).append((t, Entry(offsets[t] + pos, ident, exact, recency, row)))
    reasons: dict[str, int] = {}
    for d in per_task.values():
        for info in d["drops"].values():
            reasons[info["reason"]] = reasons.get(info["reason"], 0) + 1
    for members in comps.values():
        win = _winner([e for _, e in members])
        cid = f"n-{win.id[:12]}"
        for t, e in members:
            local = e.pos - offsets[t]
            if e is win:
                per_task[t]["kept"][local] = {"dup_cluster_id": cid, "dup_cluster_size": len(members)}
            else:
                per_task[t]["drops"][local] = {"reason": "near_duplicate", "dup_of": win.id, "dup_cluster_id": cid,
                                               "dup_cluster_size": len(members)}
                reasons["near_duplicate"] = reasons.get("near_duplicate", 0) + 1
    for t, d in per_task.items():
        _atomic_lines(b_dir / f"decisions-{t:05d}.json", [json.dumps(d)])
    n_clusters = sum(len(d["kept"]) for d in per_task.values())
    return {"documents": documents, "no_shingles": no_shingles, **reasons, "clusters": n_clusters,
            "rss_mb": peak_rss_mb()}
