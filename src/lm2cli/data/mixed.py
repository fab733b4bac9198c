"""Mixed-token counting for Chinese/English text (SPEC §4.4 [S]): one CJK ideograph is one token, one run
of Latin letters or digits is one word. Rules, dedup shingles and classification all count this way, so
a Chinese document is never one 2k-character "word" (SPEC P4).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# CJK Unified Ideographs + Ext-A + compatibility + Ext-B and later (SPEC §4.3).
CJK_CLASS = "\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0003134f"
_CJK = re.compile(f"[{CJK_CLASS}]")
_TOKEN = re.compile(f"[{CJK_CLASS}]|[^\\W_{CJK_CLASS}]+")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")

# Terminal punctuation: ASCII plus CJK full stops, and ；… (SPEC §4.4 [S]).
TERMINAL = (".", "!", "?", '"', "'", "。", "！", "？", "．", "｡", "；", "…", "”", "」", "』", "」", ")", "）")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def count_tokens_upto(text: str, limit: int) -> int:
    """min(number of mixed tokens, limit), without tokenizing the whole text."""
    n = 0
    for _ in _TOKEN.finditer(text):
        n += 1
        if n >= limit:
            break
    return n


def count_cjk(text: str) -> int:
    return len(_CJK.findall(text))


def count_latin(text: str) -> int:
    return len(_LATIN.findall(text))


def is_cjk_token(tok: str) -> bool:
    return len(tok) == 1 and bool(_CJK.match(tok))


def is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def is_symbol(ch: str) -> bool:
    return unicodedata.category(ch).startswith("S")


# Characters that are neither word characters nor whitespace: punctuation, symbols, marks, controls.
# Only these few are looked up in the Unicode database, so counting stays in C for the bulk of the text.
NON_WORD = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s")
_ALPHA_TOKEN = re.compile(r"[^\W\d_]")


def punct_symbol_counts(text: str) -> tuple[int, int]:
    """(punctuation, symbols) by Unicode category P* / S*."""
    p = s = 0
    for ch, n in Counter(NON_WORD.findall(text)).items():
        c = unicodedata.category(ch)[0]
        if c == "P":
            p += n
        elif c == "S":
            s += n
    return p, s


def count_nonspace(text: str) -> int:
    return len(text) - len(_SPACE.findall(text))


_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")


def count_words_without_letters(text: str) -> int:
    """Whitespace-delimited words that contain no letter (Gopher's alpha-words rule)."""
    return len(_NO_LETTER_WORD.findall(text))


def count_alpha(text: str) -> int:
    return len(_ALPHA_TOKEN.findall(text))


def has_alpha(token: str) -> bool:
    return _ALPHA_TOKEN.search(token) is not None
