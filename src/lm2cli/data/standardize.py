"""One record schema for every source (SPEC §4.2): `{"id", "text", "source", "content_type", "lang", "meta"}`.

Owns text normalisation (NFC, newlines, control characters) and the stable id: a content hash of the
normalised text, so the same text gets the same id wherever it comes from. lm2's own per-record facts
live under `meta["lm2"]`; everything else in `meta` is the source's metadata, kept as given.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from ..tokenizer import scrub_surrogates

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING = re.compile(r"[ \t\u3000]+\n")
_BLANKS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> tuple[str, int]:
    """(normalised text, number of control characters removed)."""
    # JSON can carry lone surrogates ("\ud800") that UTF-8 cannot hold; same policy as the tokenizer.
    text = scrub_surrogates(text)
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text, n_control = _CONTROL.subn("", text)
    text = _BLANKS.sub("\n\n", _TRAILING.sub("\n", text))
    return text.strip(), n_control


def content_id(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=10).hexdigest()


def standardize(item: dict) -> dict:
    """A reader item -> record; `text` may come out empty (the pipeline rejects it as `empty_text`)."""
    text, n_control = normalize_text(item["text"])
    meta = dict(item.get("meta") or {})
    lm2 = {"char_num": len(text), "line_num": text.count("\n") + 1 if text else 0}
    if n_control:
        lm2["control_removed"] = n_control
    meta["lm2"] = lm2
    return {
        "id": content_id(text),
        "text": text,
        "source": item["source"],
        "content_type": item.get("content_type") or "other",
        "lang": "",
        "meta": meta,
    }
