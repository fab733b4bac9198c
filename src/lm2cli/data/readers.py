"""Input discovery and reading: files and folders of .jsonl/.json/.txt/.md/.html/code, plain or .gz/.zst.

Owns turning bytes into raw items. A raw item is either a document candidate
`{"text", "source", "meta", "content_type", "fmt", "path"}` or a reject
`{"reject": reason, "source", "error", "raw_b64", "raw_size", "raw_sha256"}`; nothing read is ever
silently dropped (blank JSONL lines are not records). Memory is bounded by `max_record_bytes`: a longer
line or file is rejected as `record_too_large` with its head, size and sha256, and never loaded whole.

Large uncompressed JSONL files are split into byte ranges so `--workers`/`--shard` can fan them out;
a range owns every line that *starts* inside it.
"""

from __future__ import annotations

import base64
import fnmatch
import gzip
import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path, PurePath
from typing import Iterator, Optional

COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
JSONL_EXT = {".jsonl", ".ndjson", ".json"}
TEXT_EXT = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_EXT = {".html", ".htm", ".xhtml"}
CODE_EXT = {
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".java", ".js", ".mjs", ".ts", ".tsx", ".go", ".rs",
    ".rb", ".php", ".sh", ".bash", ".cs", ".swift", ".kt", ".scala", ".lua", ".pl", ".r", ".sql", ".m", ".jl",
    ".hs", ".ml", ".css", ".scss", ".toml", ".yaml", ".yml", ".cmake", ".mk", ".proto", ".dart", ".zig",
}
DEFAULT_TYPE = {"jsonl": "web", "text": "book", "html": "web", "code": "code"}
RAW_HEAD = 4096  # bytes of an oversized record kept in its reject


@dataclass(frozen=True)
class Unit:
    """A whole file, or the byte range [start, end) of an uncompressed JSONL file."""

    path: str
    size: int
    start: int = 0
    end: int = -1
    lines_before: int = 0  # newlines in [0, start): a range reports true line numbers without rescanning

    @property
    def key(self) -> str:
        return self.path if self.end < 0 else f"{self.path}@{self.start}-{self.end}"


def split_name(path: str | Path) -> tuple[Optional[str], str]:
    """(compression or None, format: jsonl/text/html/code/unknown) from a file name."""
    p = PurePath(path)
    suffixes = [s.lower() for s in p.suffixes]
    comp = COMPRESSED.get(suffixes[-1]) if suffixes else None
    inner = (suffixes[-2] if comp and len(suffixes) >= 2 else (None if comp else (suffixes[-1] if suffixes else None)))
    if inner in JSONL_EXT:
        return comp, "jsonl"
    if inner in TEXT_EXT:
        return comp, "text"
    if inner in HTML_EXT:
        return comp, "html"
    if inner in CODE_EXT:
        return comp, "code"
    return comp, "unknown"


def discover(inputs: list[Path]) -> list[Path]:
    """Every file under `inputs`, sorted, skipping hidden names; a missing input is an InputError."""
    from ..errors import InputError

    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if not item.exists():
            raise InputError(f"input {item} does not exist")
        if item.is_file():
            files.append(item.resolve())
            continue
        for root, dirs, names in os.walk(item):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(Path(root, n).resolve() for n in sorted(names) if not n.startswith("."))
    out, seen = [], set()
    for f in files:
        if f not in seen:
            seen.add(f)
            out.append(f)
    return sorted(out)


def plan_units(files: list[Path], task_bytes: int) -> list[Unit]:
    units = []
    for f in files:
        size = f.stat().st_size
        comp, fmt = split_name(f)
        if fmt == "jsonl" and comp is None and size > task_bytes and not _is_json_array(f):
            starts = list(range(0, size, task_bytes))
            for start, lines in zip(starts, _newlines_at(f, starts)):
                units.append(Unit(str(f), size, start, min(size, start + task_bytes), lines))
        else:
            units.append(Unit(str(f), size))
    return units


def plan_tasks(units: list[Unit], task_bytes: int) -> list[list[Unit]]:
    """Pack units in order into tasks of about `task_bytes` input bytes (each task writes one part)."""
    tasks: list[list[Unit]] = []
    cur: list[Unit] = []
    cur_bytes = 0
    for u in units:
        n = (u.end - u.start) if u.end >= 0 else u.size
        if cur and cur_bytes + n > task_bytes:
            tasks.append(cur)
            cur, cur_bytes = [], 0
        cur.append(u)
        cur_bytes += n
    if cur:
        tasks.append(cur)
    return tasks


def content_type_for(path: str, fmt: str, types: dict[str, str]) -> str:
    for glob, kind in types.items():
        if PurePath(path).match(glob) or fnmatch.fnmatch(path, glob):
            return kind
    return DEFAULT_TYPE.get(fmt, "other")


# ---------------------------------------------------------------------------------------------------


def read_unit(unit: Unit, types: dict[str, str], max_record_bytes: int) -> Iterator[dict]:
    comp, fmt = split_name(unit.path)
    ctype = content_type_for(unit.path, fmt, types)
    if fmt == "unknown":
        yield _reject("unsupported_format", unit.path, f"no reader for {PurePath(unit.path).name!r}")
        return
    if unit.size == 0:
        yield _reject("empty_file", unit.path, "file is empty")
        return
    try:
        with _open(unit.path, comp) as fh:
            if fmt == "jsonl":
                yield from _read_jsonl(fh, unit, ctype, max_record_bytes)
            else:
                yield from _read_whole(fh, unit, fmt, ctype, max_record_bytes)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        # zstandard raises ZstdError (a subclass of Exception only); caught below.
        yield _reject("corrupt_compression" if comp else "read_error", unit.path, f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - a decoder error must become a reject, never a crash
        if type(e).__name__ != "ZstdError":
            raise
        yield _reject("corrupt_compression", unit.path, f"{type(e).__name__}: {e}")


def _open(path: str, comp: Optional[str]):
    if comp == "gzip":
        return gzip.open(path, "rb")
    if comp == "zstd":
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def _is_json_array(path: Path) -> bool:
    if PurePath(path).suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _newlines_at(path: Path, offsets: list[int]) -> list[int]:
    """Newline counts in [0, offset) for each sorted offset, in one pass over the file."""
    out, n, pos = [], 0, 0
    with open(path, "rb") as f:
        for off in offsets:
            while pos < off:
                block = f.read(min(1 << 22, off - pos))
                if not block:
                    break
                n += block.count(b"\n")
                pos += len(block)
            out.append(n)
    return out


def _skip_partial_line(fh, unit: Unit) -> tuple[int, int]:
    """Move to the first line that starts inside the range; return (position, lines before it).

    Reads at most to the end of the range: a line that starts before it belongs to the previous range.
    """
    fh.seek(unit.start - 1)
    if fh.read(1) == b"\n":
        return unit.start, unit.lines_before
    pos = unit.start
    while pos < unit.end:
        chunk = fh.readline(1 << 20)
        if not chunk:
            break
        pos += len(chunk)
        if chunk.endswith(b"\n"):
            return pos, unit.lines_before + 1
    return pos, unit.lines_before


def _read_jsonl(fh, unit: Unit, ctype: str, max_bytes: int) -> Iterator[dict]:
    if unit.end < 0 and PurePath(unit.path).suffix.lower() == ".json":
        first = fh.peek(64)[:64].lstrip() if hasattr(fh, "peek") else b""
        if first.startswith(b"["):
            yield from _read_json_array(fh, unit, ctype, max_bytes)
            return
    lineno = 0
    pos = 0
    if unit.end >= 0 and unit.start > 0:
        pos, lineno = _skip_partial_line(fh, unit)
    seen_any = False
    while unit.end < 0 or pos < unit.end:
        line = fh.readline(max_bytes + 1)
        if not line:
            break
        lineno += 1
        source = f"{unit.path}:{lineno}"
        if len(line) > max_bytes and not line.endswith(b"\n"):
            size, digest, head = _drain_line(fh, line)
            pos += size
            seen_any = True
            yield _reject("record_too_large", source, f"line of {size} bytes exceeds max_record_mb",
                          raw=head, raw_size=size, raw_sha256=digest)
            continue
        pos += len(line)
        if not line.strip():
            continue
        seen_any = True
        yield _parse_json_line(line, source, ctype)
    if not seen_any and unit.start == 0:
        yield _reject("empty_file", unit.path, "no records in file")


def _drain_line(fh, first: bytes) -> tuple[int, str, bytes]:
    h = hashlib.sha256(first)
    size = len(first)
    while True:
        chunk = fh.readline(1 << 20)
        if not chunk:
            break
        h.update(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return size, h.hexdigest(), first[:RAW_HEAD]


def _parse_json_line(line: bytes, source: str, ctype: str) -> dict:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return _reject("invalid_utf8", source, str(e), raw=line)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return _reject("invalid_json", source, str(e), raw=line)
    return _from_object(obj, source, ctype, raw=line)


def _from_object(obj, source: str, ctype: str, raw: bytes) -> dict:
    if not isinstance(obj, dict):
        return _reject("not_an_object", source, f"JSON {type(obj).__name__}, expected an object", raw=raw)
    key = "text" if "text" in obj else ("content" if "content" in obj else None)
    if key is None:
        return _reject("missing_text", source, "no 'text' or 'content' field", raw=raw)
    text = obj[key]
    if not isinstance(text, str):
        return _reject("text_not_string", source, f"'{key}' is {type(text).__name__}", raw=raw)
    meta = {k: v for k, v in obj.items() if k != key}
    if "id" in meta:
        meta["orig_id"] = meta.pop("id")
    ct = meta.pop("content_type", None)
    return {"text": text, "source": source, "meta": meta,
            "content_type": ct if isinstance(ct, str) and ct else ctype, "fmt": "jsonl"}


def _read_json_array(fh, unit: Unit, ctype: str, max_bytes: int) -> Iterator[dict]:
    data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        yield _reject("record_too_large", unit.path, "JSON array file exceeds max_record_mb", raw=data[:RAW_HEAD],
                      raw_size=unit.size)
        return
    try:
        items = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        yield _reject("invalid_json", unit.path, str(e), raw=data)
        return
    if not items:
        yield _reject("empty_file", unit.path, "empty JSON array")
    for i, obj in enumerate(items):
        yield _from_object(obj, f"{unit.path}:[{i}]", ctype, raw=json.dumps(obj, ensure_ascii=False).encode())


def _read_whole(fh, unit: Unit, fmt: str, ctype: str, max_bytes: int) -> Iterator[dict]:
    data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        h = hashlib.sha256(data)
        size = len(data)
        while chunk := fh.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
        yield _reject("record_too_large", unit.path, f"file of {size} bytes exceeds max_record_mb",
                      raw=data[:RAW_HEAD], raw_size=size, raw_sha256=h.hexdigest())
        return
    if not data.strip():
        yield _reject("empty_file", unit.path, "file is empty or blank", raw=data)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield _reject("invalid_utf8", unit.path, str(e), raw=data)
        return
    meta: dict = {}
    if fmt == "html":
        text, title = html_to_text(text)
        if title:
            meta["title"] = title
    if fmt == "code":
        meta["path"] = PurePath(unit.path).name
    yield {"text": text, "source": unit.path, "meta": meta, "content_type": ctype, "fmt": fmt}


def _reject(reason: str, source: str, error: str, raw: Optional[bytes] = None, raw_size: Optional[int] = None,
            raw_sha256: Optional[str] = None) -> dict:
    rec = {"reject": reason, "source": source, "error": error}
    if raw is not None:
        rec["raw_b64"] = base64.b64encode(raw).decode("ascii")
        rec["raw_size"] = raw_size if raw_size is not None else len(raw)
        rec["raw_sha256"] = raw_sha256 or hashlib.sha256(raw).hexdigest()
    return rec


# ---------------------------------------------------------------------------------------------------
# HTML: visible main text with the standard library's parser (Trafilatura-like, no boilerplate blocks).

_SKIP = {"script", "style", "noscript", "template", "svg", "head", "nav", "footer", "aside", "form", "iframe"}
_BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section",
          "article", "main", "blockquote", "pre", "header", "dd", "dt", "hr", "figcaption"}
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class _Visible(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.in_title = False
        self.title = ""
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in _SKIP and tag not in _VOID:
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in _SKIP and tag not in _VOID and self.skip:
            self.skip -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        if self.skip:
            return
        self.parts.append(data if self.pre else " ".join(data.split()) + (" " if data[-1:].isspace() else ""))


def html_to_text(html: str) -> tuple[str, str]:
    """(visible text with one block per line, <title>)."""
    p = _Visible()
    try:
        p.feed(html)
        p.close()
    except Exception:  # noqa: BLE001 - html.parser is lenient; keep what was parsed
        pass
    lines = [" ".join(line.split()) for line in "".join(p.parts).split("\n")]
    return "\n".join(line for line in lines if line), " ".join(p.title.split())
