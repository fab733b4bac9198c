"""Mixed-token counting for Chinese/English text (SPEC §4.4 [S]): one CJK ideograph is one token, one run
of Latin letters or digits is one word. Rules, dedup shingles and classification all count this way, so
a Chinese document is never one 2k-character "word" (SPEC P4).
"""

from __future__ import annotations

import re
import unicodedata

# CJK Unified Ideographs + Ext-A + compatibility + Ext-B and later (SPEC §4.3).
CJK_CLASS = "\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0003134f"
_CJK = re.compile(f"[{CJK_CLASS}]")
_TOKEN = re.compile(f"[{CJK_CLASS}]|[^\\W_{CJK_CLASS}]+")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")

# Terminal punctuation: ASCII plus CJK full stops, and ；… (SPEC §4.4 [S]).
TERMINAL = (".", "!", "?", '"', "'", "。", "！", "？", "．", "｡", "；", "…", "”", "」", "』", "」", ")", "）")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


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
