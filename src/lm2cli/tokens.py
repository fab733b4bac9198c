"""Binary token shards: `lm2 tokenize` (prepared JSONL -> <workdir>/data/tokens/) and `TokenStore`, the
reader pretraining streams from. This docstring is the format's specification (version 1).

Layout::

    data/tokens/
      manifest.json            kind "tokens": per-split token/doc counts, dtype, tokenizer fingerprint
      tokenizer/               the tokenizer the ids belong to (`Tokenizer.load`), so the folder is self-contained
      train/<split>.bin        token ids of the training documents of one split
      train/<split>.idx        document start offsets into the .bin
      val/<split>.bin|.idx     held-out documents, same format
      rejected.jsonl           prepared lines that could not be tokenized: {"file", "offset", "reason"}

A split is `<lang>.<content_type>` of the prepared records (`zh.web`, `en.book`, `code.code`, ...;
lowercased, other characters as `_`, missing fields as `unk`), so a recipe can weight a mixture by name
or prefix. A document goes to `val/` when `blake2b("<seed>\\0<id>") / 2**64 < val_fraction`
(`tokenize.seed`, `tokenize.val_fraction`; the text's sha1 stands in for a missing id): held out by
document, deterministic, independent of worker count and order, and train/val are disjoint. `lm2
tokenize build-vocab` leaves the same documents out of its Chinese BPE, so no validation text shaped
the vocabulary.

Both files start with a 1024-byte header of 256 little-endian int32; unused slots are 0:

    slot 0     magic: 0x4C4D3254 ("LM2T") in .bin, 0x4C4D3249 ("LM2I") in .idx
    slot 1     version: 1
    slots 2-3  number of items that follow, as one int64 (tokens in .bin; num_docs + 1 in .idx)
    slot 4     bytes per item: 2 (uint16) or 4 (uint32) in .bin; 8 (int64) in .idx
    slot 5     the tokenizer's vocab_size
    slots 6-7  number of documents, as one int64

then the items, little-endian. Ids are uint16 when vocab_size <= 65,536, else uint32 (92,544 does not
fit: SPEC §3.3). `.idx` holds each document's start offset in tokens plus a final sentinel equal to the
token count, so document i is `tokens[starts[i]:starts[i+1]]`. Each document is `<s>` + ids + `</s>`
(`tokenize.prepend_bos`, `tokenize.append_eos`; InternEvo's tokenizer tool also wraps documents this
way): training packs documents back to back and resets positions at each start (SPEC §5.2), so the
BOS marks a boundary the model sees and the EOS teaches it to stop. Ids are the tokenizer's plain-text
ids: a document never contains a special token other than these two.

Writing is parallel over processes and resumable: prepared shards are cut into byte ranges (chunks,
whole lines), each worker writes a finished chunk under `data/.tokens.partial/chunks/<id>/` by rename,
and a rerun skips finished chunks as long as the tokenizer, input and settings are the same (`--force`
starts over). The final folder is assembled beside `data/tokens/` and moved into place with its
manifest, so `data/tokens/` is either the old complete set or the new one.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError, Lm2Error, WrongArtefact
from .data.prepared import prepared_files
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .config import Recipe, TokenizeConfig
    from .layout import Workspace

VERSION = 1
MAGIC_BIN = 0x4C4D3254
MAGIC_IDX = 0x4C4D3249
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
PARTS = ("train", "val")
TOKENIZER_DIR = "tokenizer"
REJECTED = "rejected.jsonl"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def split_name(record: dict) -> str:
    lang, ctype = record.get("lang"), record.get("content_type")
    return _split_name(lang if isinstance(lang, str) else str(lang or ""),
                       ctype if isinstance(ctype, str) else str(ctype or ""))


@functools.lru_cache(maxsize=4096)
def _split_name(lang, content_type) -> str:
    return f"{_clean(lang)}.{_clean(content_type)}"


def _clean(value) -> str:
    return re.sub(r"[^a-z0-9_-]+", "_", str(value or "").lower()).strip("_") or "unk"


def doc_key(record: dict) -> str:
    """What the held-out hash reads: the record's id, else its text's sha1."""
    doc_id = record.get("id")
    if doc_id is not None:
        return str(doc_id)
    return hashlib.sha1(str(record.get("text", "")).encode("utf-8", "surrogatepass")).hexdigest()


def held_out(record: dict, seed: int, fraction: float) -> bool:
    """Whether a prepared record belongs to `val/` (build-vocab also keeps these out of its BPE)."""
    return is_val(doc_key(record), seed, fraction)


def is_val(doc_key: str, seed: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}\0{doc_key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2.0**64


# ---------------------------------------------------------------------------------------------------
# Headers


def make_header(magic: int, count: int, itemsize: int, vocab_size: int, num_docs: int) -> bytes:
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1], h[4], h[5] = magic, VERSION, itemsize, vocab_size
    h[2:4] = np.array([count], dtype="<i8").view("<i4")
    h[6:8] = np.array([num_docs], dtype="<i8").view("<i4")
    return h.tobytes()


def read_header(path: Path, magic: int) -> dict:
    """Parse and check a .bin/.idx header against the file's size; WrongArtefact names the problem."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise WrongArtefact(f"{path} is too short for an lm2 token header")
    h = np.frombuffer(raw, dtype="<i4")
    if h[0] != magic:
        raise WrongArtefact(f"{path} is not an lm2 token file (magic {int(h[0]):#x}, expected {magic:#x})")
    if h[1] != VERSION:
        raise WrongArtefact(f"{path} is format version {int(h[1])}; this lm2 reads version {VERSION}")
    count = int(h[2:4].view("<i8")[0])
    itemsize = int(h[4])
    expected = HEADER_BYTES + count * itemsize
    if path.stat().st_size != expected:
        raise WrongArtefact(f"{path} has {path.stat().st_size} bytes; its header promises {expected} (truncated?)")
    return {"count": count, "itemsize": itemsize, "vocab_size": int(h[5]), "num_docs": int(h[6:8].view("<i8")[0])}


# ---------------------------------------------------------------------------------------------------
# Reader


@dataclass
class Split:
    """One split of one part: a flat token array and its document starts (memory-mapped)."""

    name: str
    part: str
    bin_path: Path
    idx_path: Path

    @functools.cached_property
    def _bin_header(self) -> dict:
        return read_header(self.bin_path, MAGIC_BIN)

    @functools.cached_property
    def tokens(self) -> np.memmap:
        h = self._bin_header
        dtype = {2: "<u2", 4: "<u4"}.get(h["itemsize"])
        if dtype is None:
            raise WrongArtefact(f"{self.bin_path}: unsupported item size {h['itemsize']}")
        return np.memmap(self.bin_path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(h["count"],))

    @functools.cached_property
    def starts(self) -> np.ndarray:
        """Document start offsets (int64), with a final sentinel equal to the token count."""
        h = read_header(self.idx_path, MAGIC_IDX)
        starts = np.memmap(self.idx_path, dtype="<i8", mode="r", offset=HEADER_BYTES, shape=(h["count"],))
        if h["count"] != h["num_docs"] + 1 or starts[-1] != self._bin_header["count"] or starts[0] != 0:
            raise WrongArtefact(f"{self.idx_path} does not index {self.bin_path}")
        return starts

    @property
    def num_docs(self) -> int:
        return len(self.starts) - 1

    @property
    def num_tokens(self) -> int:
        return self._bin_header["count"]

    @property
    def vocab_size(self) -> int:
        return self._bin_header["vocab_size"]

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i] : self.starts[i + 1]]

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.starts)


class TokenStore:
    """`data/tokens/` as written by `lm2 tokenize`: `TokenStore(dir).splits("train")["zh.web"].doc(0)`."""

    def __init__(self, path: str | os.PathLike):
        from .layout import read_manifest

        self.path = Path(path)
        self.manifest = read_manifest(self.path, kinds=("tokens",), what="token shards")
        fmt = self.manifest.get("format", {})
        if fmt.get("version") != VERSION:
            raise WrongArtefact(f"{self.path} holds token format {fmt.get('version')}; this lm2 reads {VERSION}")

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["format"]["dtype"])

    def tokenizer(self) -> Tokenizer:
        """The tokenizer these ids belong to (the copy kept beside the shards)."""
        tok = Tokenizer.load(self.path / TOKENIZER_DIR)
        self.require_tokenizer(tok)
        return tok

    def require_tokenizer(self, tok: Tokenizer) -> None:
        """Refuse a tokenizer other than the one the shards were written with."""
        if tok.fingerprint != self.tokenizer_fingerprint:
            raise InputError(f"{self.path} was tokenized with {self.tokenizer_fingerprint}, not {tok.fingerprint} "
                             "(rerun `lm2 tokenize` or use the matching tokenizer)")

    def splits(self, part: str = "train") -> dict[str, Split]:
        if part not in PARTS:
            raise InputError(f"unknown part {part!r}; expected train or val")
        names = sorted(self.manifest["stats"]["splits"].get(part, {}))
        return {n: Split(n, part, self.path / part / f"{n}.bin", self.path / part / f"{n}.idx") for n in names}


# ---------------------------------------------------------------------------------------------------
# Writer: chunks


@dataclass(frozen=True)
class Chunk:
    id: str
    path: str
    start: int
    end: int


def plan_chunks(files: list[Path], chunk_bytes: int) -> list[Chunk]:
    chunks = []
    for fi, path in enumerate(files):
        size = path.stat().st_size
        n = max(1, -(-size // chunk_bytes))
        for ci in range(n):
            chunks.append(Chunk(f"{fi:05d}-{ci:05d}", str(path), ci * chunk_bytes, min((ci + 1) * chunk_bytes, size)))
    return chunks


def default_chunk_bytes(total: int, workers: int) -> int:
    """~16 chunks per worker, so the last ones finish close together; not so small that per-chunk
    overhead shows, not so large that a chunk's arrays crowd memory."""
    return int(min(64 << 20, max(256 << 10, total // (16 * max(workers, 1)))))


def _lines(chunk: Chunk) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for the lines that start inside [start, end)."""
    with open(chunk.path, "rb") as f:
        pos = chunk.start
        if pos > 0:
            f.seek(pos - 1)
            pos += len(f.readline()) - 1
        while pos < chunk.end:
            line = f.readline()
            if not line:
                break
            yield pos, line
            pos += len(line)


_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, settings: dict) -> None:
    _WORKER["tok"] = Tokenizer.load(tokenizer_dir)
    _WORKER["settings"] = settings


def _chunk_file(work: str | Path, chunk_id: str, ext: str) -> Path:
    return Path(work) / "chunks" / f"{chunk_id}.{ext}"


def _done_file(work: str | Path, chunk_id: str) -> Path:
    return Path(work) / "chunks" / f"{chunk_id}.done.json"


def _tokenize_chunk(chunk: Chunk, work: str) -> dict:
    """Tokenize one chunk into `<work>/chunks/<id>.tok` (ids) and `<id>.len` (document lengths), each
    holding every (part, split) back to back; returns where each one is and its counts, also saved as
    `<id>.done.json`, written last (a chunk without it is redone, overwriting its files)."""
    # Records are acyclic, so reference counting frees them; the cyclic collector would only walk the
    # heap (a forked worker's inherited one too) over and over.
    with _gc_paused():
        return _tokenize_chunk_records(chunk, work)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _tokenize_chunk_records(chunk: Chunk, work: str) -> dict:
    tok: Tokenizer = _WORKER["tok"]
    s = _WORKER["settings"]
    dtype = dtype_for(tok.vocab_size)
    bos = np.array([tok.bos_id], dtype=np.uint32) if s["prepend_bos"] else None
    eos = np.array([tok.eos_id], dtype=np.uint32) if s["append_eos"] else None
    pieces: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    lengths: dict[tuple[str, str], list[int]] = defaultdict(list)
    text_bytes: Counter = Counter()
    rejected = []
    name = Path(chunk.path).name
    for offset, line in _lines(chunk):
        if not line.strip():
            continue
        rec, reason = _parse(line)
        if reason:
            rejected.append({"file": name, "offset": offset, "reason": reason})
            continue
        text = rec["text"]
        key = ("val" if held_out(rec, s["seed"], s["val_fraction"]) else "train", split_name(rec))
        ids = tok.encode_to_numpy(text)
        n = len(ids)
        if bos is not None:
            pieces[key].append(bos)
            n += 1
        pieces[key].append(ids)
        if eos is not None:
            pieces[key].append(eos)
            n += 1
        lengths[key].append(n)
        text_bytes[key] += len(text.encode("utf-8", "replace"))
    splits: dict[str, dict] = defaultdict(dict)
    keys = sorted(pieces)
    ids = np.concatenate([a for k in keys for a in pieces[k]]) if keys else np.zeros(0, dtype=np.uint32)
    if ids.size and int(ids.max()) >= tok.vocab_size:  # cheap next to BPE; guards the dtype cast
        raise Lm2Error(f"chunk {chunk.id}: id {int(ids.max())} outside the vocabulary ({tok.vocab_size})")
    ids.astype(dtype).tofile(_chunk_file(work, chunk.id, "tok"))
    np.asarray([n for k in keys for n in lengths[k]], dtype="<i8").tofile(_chunk_file(work, chunk.id, "len"))
    tok_at = doc_at = 0
    for part, split in keys:
        n_tok, n_doc = sum(lengths[(part, split)]), len(lengths[(part, split)])
        splits[part][split] = {"tokens": n_tok, "docs": n_doc, "text_bytes": int(text_bytes[(part, split)]),
                               "token_offset": tok_at, "doc_offset": doc_at}
        tok_at, doc_at = tok_at + n_tok, doc_at + n_doc
    result = {"id": chunk.id, "bytes": chunk.end - chunk.start, "splits": splits, "rejected": rejected}
    # Written last, by rename; no fsync: resuming guards against a killed process, whose written pages
    # the kernel still holds (an fsync per chunk stalls every worker on a busy disk).
    marker = _done_file(work, chunk.id)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, marker)
    return result


def _parse(line: bytes) -> tuple[dict | None, str]:
    try:
        rec = json.loads(line)
    except UnicodeDecodeError:
        return None, "invalid utf-8"
    except ValueError as e:
        return None, f"invalid json: {e.msg if hasattr(e, 'msg') else e}"
    if not isinstance(rec, dict):
        return None, "not a json object"
    if not isinstance(rec.get("text"), str):
        return None, "no text field"
    if not rec["text"]:
        return None, "empty text"
    return rec, ""


# ---------------------------------------------------------------------------------------------------
# Writer: the command


def tokenize_dir(
    prepared: Path,
    out: Path,
    tok: Tokenizer,
    cfg: TokenizeConfig,
    *,
    workers: int = 1,
    force: bool = False,
    chunk_bytes: int | None = None,
    tokenizer_source: str = "",
    tokenizer_dir: Path | None = None,
    engine: str = "local",
    ray_address: str | None = None,
) -> dict:
    """Tokenize a prepared folder into `out`; returns the manifest. Resumes unfinished work.

    `engine` "ray" tokenizes the chunks as Ray tasks (each worker loads the job's saved tokenizer) on the
    cluster at `ray_address`; the chunks, their order and so the shards are the same as locally.
    """
    from .layout import artefact_lock

    with artefact_lock(out):
        return _tokenize_dir(prepared, out, tok, cfg, workers=workers, force=force, chunk_bytes=chunk_bytes,
                             tokenizer_source=tokenizer_source, tokenizer_dir=tokenizer_dir, engine=engine,
                             ray_address=ray_address)


def _tokenize_dir(prepared: Path, out: Path, tok: Tokenizer, cfg: TokenizeConfig, *, workers: int, force: bool,
                  chunk_bytes: int | None, tokenizer_source: str, tokenizer_dir: Path | None, engine: str,
                  ray_address: str | None) -> dict:
    from .console import log, progress
    from .layout import describe_input, staging_dir, write_manifest

    files = prepared_files(prepared)
    dtype = dtype_for(tok.vocab_size)
    if tok.vocab_size > np.iinfo(dtype).max + 1:
        raise InputError(f"vocabulary of {tok.vocab_size} does not fit {dtype.name}")
    settings = {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "prepend_bos": cfg.prepend_bos,
                "append_eos": cfg.append_eos}
    total = sum(f.stat().st_size for f in files)
    job = {
        "format": VERSION,
        "tokenizer": tok.fingerprint,
        "input": describe_input(prepared).get("fingerprint"),
        "files": [[f.name, f.stat().st_size] for f in files],
        "settings": settings,
    }
    job_key = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
    if not force and (out / "manifest.json").exists():
        old = json.loads((out / "manifest.json").read_text())
        if old.get("kind") == "tokens" and old.get("job_key") == job_key:
            log(f"tokens {out} are up to date (--force redoes them)")
            return old
    work = out.parent / f".{out.name}.partial"
    chunk_bytes = _open_work(work, job_key, job, tok, force, chunk_bytes or default_chunk_bytes(total, workers))
    chunks = plan_chunks(files, chunk_bytes)
    done = {c.id: json.loads(_done_file(work, c.id).read_text()) for c in chunks if _done_file(work, c.id).exists()}
    todo = [c for c in chunks if c.id not in done]
    workers = max(1, min(workers, len(todo) or 1))
    if done:
        log(f"tokenize: resuming, {len(done)}/{len(chunks)} chunks already done")
    log(f"tokenize: {len(files)} shards ({total / 1e6:.1f} MB) -> {out} with {tok.name} (vocab {tok.vocab_size}, "
        f"{dtype.name}), {workers} worker{'s' if workers > 1 else ''}")
    t0 = time.perf_counter()
    n_tokens = sum(_count(r) for r in done.values())
    mb = round(sum(c.end - c.start for c in todo) / 1e6, 1)
    # workers first: they fork before the progress bar starts its thread
    if engine == "ray":
        chunk_results = _ray_chunk_results(todo, work, settings, ray_address)
    else:
        chunk_results = _chunk_results(todo, work, settings, workers, tok)
    with chunk_results as results, progress("tokenize MB", total=mb) as task:
        for result in results:
            done[result["id"]] = result
            n_tokens += _count(result)
            task.advance(result["bytes"] / 1e6, info=f"{n_tokens:,} tokens")
    seconds_tok = time.perf_counter() - t0
    with staging_dir(out) as tmp:
        splits = _assemble([done[c.id] for c in chunks], work, tmp, tok.vocab_size, dtype)
        shutil.copytree(work / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        rejected = [r for c in chunks for r in done[c.id]["rejected"]]
        if rejected:
            (tmp / REJECTED).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
        stats = _stats(splits, rejected, total, seconds_tok, workers)
        manifest = write_manifest(
            tmp, "tokens", config=cfg, stats=stats, job_key=job_key,
            inputs=[prepared] + ([tokenizer_dir] if tokenizer_dir and (tokenizer_dir / "manifest.json").exists() else []),
            format={"version": VERSION, "dtype": dtype.name, "header_bytes": HEADER_BYTES,
                    "prepend_bos": cfg.prepend_bos, "append_eos": cfg.append_eos},
            tokenizer={"fingerprint": tok.fingerprint, "name": tok.name, "vocab_size": tok.vocab_size,
                       "source": tokenizer_source or tok.name, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                       # id 0 is <unk> in built vocabularies (never emitted) but cl100k's "!" in the default (P10)
                       "id0_occurs": tok.unk_id != 0},
        )
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _open_work(work: Path, job_key: str, job: dict, tok: Tokenizer, force: bool, chunk_bytes: int) -> int:
    """The partial-work folder for this job: reused when it belongs to the same job (same tokenizer,
    input and settings), else started afresh. Returns the job's chunk size (a resumed job keeps its own)."""
    from .layout import atomic_write_text

    job_file = work / "job.json"
    if force or not job_file.exists() or json.loads(job_file.read_text()).get("key") != job_key:
        shutil.rmtree(work, ignore_errors=True)
        (work / "chunks").mkdir(parents=True)
        tok.save(work / TOKENIZER_DIR, hf=False)  # the ids only: HF files belong in model folders
        atomic_write_text(job_file, json.dumps({"key": job_key, "chunk_bytes": chunk_bytes, **job}))
    return json.loads(job_file.read_text())["chunk_bytes"]


def _count(result: dict) -> int:
    return sum(v["tokens"] for part in result["splits"].values() for v in part.values())


@contextlib.contextmanager
def _chunk_results(todo: list[Chunk], work: Path, settings: dict, workers: int, tok: Tokenizer
                   ) -> Iterator[Iterator[dict]]:
    """Start the workers and yield an iterator over finished chunks' results, in completion order.

    A `multiprocessing.Pool` queues every chunk up front, so a worker never waits for the parent to
    hand it the next one (the parent may get little CPU on a busy machine). Workers start before any
    progress thread exists: forked children must not inherit a thread's locks.
    """
    _WORKER.update(tok=tok, settings=settings)
    if workers == 1 or not todo:
        yield (_tokenize_chunk(c, str(work)) for c in todo)
        return
    import multiprocessing as mp

    if sys.platform.startswith("linux"):  # fork: children inherit the loaded tokenizer, no start-up cost
        gc.freeze()  # inherited objects stay out of the children's collections (and their pages shared)
        pool = mp.get_context("fork").Pool(workers)
        gc.unfreeze()
    else:  # fork is unsafe on macOS: spawn and load the saved tokenizer in each worker
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                             initargs=(str(work / TOKENIZER_DIR), settings))
    try:
        yield pool.imap_unordered(_tokenize_chunk_args, [(c, str(work)) for c in todo])
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _tokenize_chunk_args(args: tuple[Chunk, str]) -> dict:
    return _tokenize_chunk(*args)


@contextlib.contextmanager
def _ray_chunk_results(todo: list[Chunk], work: Path, settings: dict, address: str | None) -> Iterator[Iterator[dict]]:
    """The chunks as Ray tasks (retried when a worker dies; a chunk's files are rewritten whole and its marker
    comes last, so a retry is harmless); results in completion order."""
    from .data.executors import RayExecutor

    executor = RayExecutor(address or "auto")
    try:
        yield executor.map(_tokenize_chunk_task, [(c, str(work), str(work / TOKENIZER_DIR), settings) for c in todo])
    finally:
        executor.close()


def _tokenize_chunk_task(chunk: Chunk, work: str, tokenizer_dir: str, settings: dict) -> dict:
    """One chunk on an executor's worker (Ray): load the job's tokenizer once per worker process."""
    if _WORKER.get("dir") != tokenizer_dir or _WORKER.get("settings") != settings:
        _init_worker(tokenizer_dir, settings)
        _WORKER["dir"] = tokenizer_dir
    return _tokenize_chunk(chunk, work)


def _assemble(results: list[dict], work: Path, out: Path, vocab_size: int, dtype: np.dtype) -> dict:
    """Concatenate chunk outputs (in chunk order) into one .bin/.idx per part and split."""
    splits: dict[str, dict[str, dict]] = {p: {} for p in PARTS}
    for part in PARTS:
        names = sorted({n for r in results for n in r["splits"].get(part, {})})
        for name in names:
            have = [r for r in results if name in r["splits"].get(part, {})]
            n_tok = sum(r["splits"][part][name]["tokens"] for r in have)
            lens = np.concatenate([_read_lengths(work, r["id"], r["splits"][part][name]) for r in have])
            starts = np.zeros(len(lens) + 1, dtype="<i8")
            np.cumsum(lens, out=starts[1:])
            assert starts[-1] == n_tok
            (out / part).mkdir(parents=True, exist_ok=True)
            with open(out / part / f"{name}.bin", "wb") as f:
                f.write(make_header(MAGIC_BIN, n_tok, dtype.itemsize, vocab_size, len(lens)))
                for r in have:
                    at = r["splits"][part][name]
                    _append_range(_chunk_file(work, r["id"], "tok"), at["token_offset"] * dtype.itemsize,
                                  at["tokens"] * dtype.itemsize, f)
            with open(out / part / f"{name}.idx", "wb") as f:
                f.write(make_header(MAGIC_IDX, len(starts), 8, vocab_size, len(lens)))
                f.write(starts.tobytes())
            splits[part][name] = {"tokens": int(n_tok), "docs": len(lens),
                                  "text_bytes": sum(r["splits"][part][name]["text_bytes"] for r in have)}
    return splits


def _read_lengths(work: Path, chunk_id: str, at: dict) -> np.ndarray:
    return np.fromfile(_chunk_file(work, chunk_id, "len"), dtype="<i8", count=at["docs"], offset=at["doc_offset"] * 8)


def _append_range(src: Path, offset: int, size: int, dst) -> None:
    """Append `size` bytes of `src` from `offset` to the open file `dst`, in the kernel where it can
    (copy_file_range, Linux), else through user space."""
    dst.flush()
    start = dst.seek(0, os.SEEK_END)
    with open(src, "rb") as f:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < size:
                    n = os.copy_file_range(f.fileno(), dst.fileno(), size - done, offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError:  # e.g. across file systems on older kernels
                pass
            if done == size:
                dst.seek(0, os.SEEK_END)
                return
            dst.seek(start)  # drop a partial kernel copy, then copy in user space
            dst.truncate()
        f.seek(offset)
        left = size
        while left:
            block = f.read(min(left, 16 << 20))
            if not block:
                raise Lm2Error(f"{src} is shorter than its chunk record says; rerun with --force")
            dst.write(block)
            left -= len(block)


def _stats(splits: dict, rejected: list[dict], total_bytes: int, seconds: float, workers: int) -> dict:
    tokens = {p: sum(v["tokens"] for v in splits[p].values()) for p in PARTS}
    docs = {p: sum(v["docs"] for v in splits[p].values()) for p in PARTS}
    n = tokens["train"] + tokens["val"]
    return {
        "splits": splits,
        "tokens": tokens,
        "docs": docs,
        "rejected": {"count": len(rejected), "by_reason": dict(Counter(r["reason"].split(":")[0] for r in rejected))},
        "input_bytes": total_bytes,
        "text_bytes_per_token": round(sum(v["text_bytes"] for p in PARTS for v in splits[p].values()) / max(n, 1), 3),
        "workers": workers,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(n / max(seconds, 1e-9)),
    }


def run_tokenize(ws: Workspace, recipe: Recipe, *, prepared: Path | None = None, tokenizer: str | None = None,
                 workers: int | None = None, force: bool = False, json_out: bool = False, engine: str | None = None,
                 ray_address: str | None = None) -> Path:
    """`lm2 tokenize`: <workdir>/data/prepared/ -> <workdir>/data/tokens/ (manifest kind `tokens`).

    `tokenizer`: a saved tokenizer folder, `cl100k` for the default one, or None for the workspace's
    built `tokenizer/` when present, else the default.
    """
    from .console import log, print_json
    from .layout import require_input
    from .data.prepared import resolve_workers

    prepared, _ = require_input(prepared or (ws.prepared if ws.prepared.exists() else None), ("prepared",),
                                "prepared data", "run `lm2 prepare` first or pass --input")
    tok, source, tok_dir = resolve_tokenizer(ws, tokenizer)
    n = resolve_workers(workers if workers is not None else recipe.tokenize.workers)
    manifest = tokenize_dir(prepared, ws.tokens, tok, recipe.tokenize, workers=n, force=force, tokenizer_source=source,
                            tokenizer_dir=tok_dir, engine=engine or recipe.tokenize.engine,
                            ray_address=ray_address or recipe.tokenize.ray_address)
    stats = manifest["stats"]
    if json_out:
        print_json({"tokens": str(ws.tokens), "tokenizer": manifest["tokenizer"], **stats})
    else:
        _print_report(manifest)
        log(f"tokens -> {ws.tokens} ({stats['tokens']['train']:,} train / {stats['tokens']['val']:,} val tokens, "
            f"{stats['seconds']}s)")
    return ws.tokens


def resolve_tokenizer(ws: Workspace, spec: str | None) -> tuple[Tokenizer, str, Path | None]:
    """(tokenizer, where it came from, its folder if any) for `--tokenizer`."""
    if spec in ("cl100k", "default"):
        return Tokenizer.default(), "default (cl100k)", None
    if spec:  # a built tokenizer/ or any folder carrying tokenizer files (a checkpoint, an export)
        path = Path(spec).resolve()
        return Tokenizer.load(path), str(path), path
    if ws.tokenizer.exists():
        return Tokenizer.from_workspace(ws), str(ws.tokenizer), ws.tokenizer
    return Tokenizer.default(), "default (cl100k; no built tokenizer/ in the workspace)", None


def _print_report(manifest: dict) -> None:
    from rich.table import Table

    from .console import err

    stats = manifest["stats"]
    table = Table(title=f"token shards ({manifest['format']['dtype']}, tokenizer {manifest['tokenizer']['source']})",
                  title_justify="left")
    for col in ("split", "train docs", "train tokens", "val docs", "val tokens", "bytes/token"):
        table.add_column(col, justify="left" if col == "split" else "right")
    names = sorted(set(stats["splits"]["train"]) | set(stats["splits"]["val"]))
    for name in names:
        tr = stats["splits"]["train"].get(name, {"docs": 0, "tokens": 0, "text_bytes": 0})
        va = stats["splits"]["val"].get(name, {"docs": 0, "tokens": 0, "text_bytes": 0})
        bpt = (tr["text_bytes"] + va["text_bytes"]) / max(tr["tokens"] + va["tokens"], 1)
        table.add_row(name, f"{tr['docs']:,}", f"{tr['tokens']:,}", f"{va['docs']:,}", f"{va['tokens']:,}", f"{bpt:.2f}")
    err.print(table)
    if stats["rejected"]["count"]:
        from .console import warn

        warn(f"{stats['rejected']['count']} prepared lines could not be tokenized ({stats['rejected']['by_reason']}); "
             f"see {REJECTED}")
