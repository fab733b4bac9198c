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

import re
import unicodedata
import uuid
from dataclasses import dataclass
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
