"""Reading the prepared artefact (`data/prepared/`): its kept shards, their records, and how many worker
processes read them.

Shared by the readers of prepared text (`lm2 tokenize`, `lm2 tokenize build-vocab`), so neither
has to import the other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import InputError


def prepared_files(prepared: Path) -> list[Path]:
    files = sorted((Path(prepared) / "kept").glob("*.jsonl"))
    if not files:
        raise InputError(f"{prepared}/kept/ holds no .jsonl shards; run `lm2 prepare` first")
    return files


def iter_prepared(files: Iterable[Path]) -> Iterator[dict]:
    """Records of prepared shards; lines that are not JSON objects with a text are skipped here
    (`lm2 tokenize` reports them; the vocabulary only needs the text)."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    yield rec


def kept_bytes(prepared: Path, langs: Iterable[str]) -> int | None:
    """UTF-8 bytes of kept text in `langs`, from the prepared manifest (None where it does not say)."""
    try:
        stats = json.loads((Path(prepared) / "manifest.json").read_text(encoding="utf-8")).get("stats", {})
        by_lang = stats["kept"]["by_lang"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return sum(int(by_lang.get(lang, {}).get("bytes", 0)) for lang in langs)


def resolve_workers(n: int | None) -> int:
    """`--workers` / `tokenize.workers`: a positive count as given, 0 or None for one per usable core."""
    if n:
        return max(1, int(n))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
