"""Heuristic rule filters, CJK-aware (SPEC §4.4, P4): Gopher quality and repetition, C4 lines, FineWeb,
FineWeb-2/ChineseWebText/YuLan for Chinese, and lm2's own character-class rules.

English rules count mixed tokens (one Latin/digit run = one word). Chinese (and mixed) documents are
measured in the unit FineWeb-2 set its cmn_Hani thresholds for: jieba words, split as datatrove splits
them (stripped, empties dropped; after NFKC so full-width digits group like ASCII ones), with datatrove's
definitions of the word-level measures. So English-centred rules neither reject all Chinese nor wave
through Chinese spam, and FineWeb-2's numbers mean what they meant there. `check(record, cfg)`
returns None to keep, or a named reason `family.rule` (e.g. `gopher_rep.dup_5gram`, `c4.lorem_ipsum`,
`cwt.too_short`). C4's line rules rewrite English web text in place, as C4 does; the count of removed
lines goes to `meta.lm2.c4_lines_removed`. Checks run cheapest first and stop at the first reason.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
from collections import Counter
from typing import Optional

import numpy as np

from ..config import CodeRules, CommonRules, EnRules, RulesConfig, ZhRules
from . import mixed

BULLETS = ("•", "-", "*", "·", "●", "▪", "‣", "⁃", "◦", "►", "■", "□", "○", "◆")
ELLIPSIS = ("...", "…")
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE = re.compile(r"[.!?。！？]+(?:\s|$)")
_WS = re.compile(r"\s+")
_CJK_BASIC = re.compile(r"[\u4e00-\u9fa5]")


_JIEBA = None
# jieba's own splitting of an ASCII run it has no dictionary word for (finalseg's re_skip): numbers keep one
# decimal part and a percent sign, everything else between alphanumeric runs stands alone.
_JIEBA_ASCII = re.compile(r"([a-zA-Z0-9]+(?:\.\d+)?%?)")
_ALNUM = re.compile(r"[a-zA-Z0-9]+")


def _jieba():
    """jieba-rs (the `rjieba` binding): jieba's dictionary and HMM in Rust, ~10x faster than Python jieba
    and initialised with no dictionary load per process. It joins ASCII runs like `www.people.com.cn` or
    `1.3nm` that jieba splits, so `zh_words` re-splits those the way jieba does; tests check the result
    equals Python jieba's word for word on real zh/en news and the examples."""
    global _JIEBA
    if _JIEBA is None:
        import rjieba

        _JIEBA = rjieba.Jieba()
    return _JIEBA


def zh_words(text: str) -> list[str]:
    """jieba words as FineWeb-2 counted them (datatrove's zh word tokenizer: jieba with HMM, each word
    stripped, empty ones dropped). NFKC first: jieba groups only ASCII digits and letters, so without it
    '１９９８年' becomes five one-character words and typeset news looks like number soup."""
    norm = unicodedata.normalize("NFKC", text).lower()
    seg = _jieba()
    words = []
    for w in seg.cut(norm, True):
        if len(w) > 1 and w.isascii() and not _ALNUM.fullmatch(w) and not w.isspace() and not seg.has_word(w):
            words.extend(_JIEBA_ASCII.split(w))
        else:
            words.append(w)
    return [w for w in (t.strip() for t in words) if w]


# Per-word measures are cached: jieba words follow Zipf's law, so a few thousand distinct words make up
# most of every document, and looking each character up in the Unicode database was a third of check_zh.
@functools.lru_cache(maxsize=1 << 17)
def _is_symbol_word(word: str) -> bool:
    return all(mixed.is_punct(ch) or mixed.is_symbol(ch) for ch in word)


@functools.lru_cache(maxsize=1 << 17)
def _has_alpha(word: str) -> bool:
    return any(ch.isalpha() for ch in word)


class Doc:
    """The measures several rules share, computed once per document.

    `words`: the document's words when the language has its own segmentation (jieba for Chinese);
    otherwise mixed tokens.
    """

    def __init__(self, text: str, words: Optional[list[str]] = None):
        self.text = text
        self.lines = [ln.strip() for ln in text.split("\n")]
        self.lines = [ln for ln in self.lines if ln]
        self.paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        # every rule here is case-insensitive
        self.tokens = words if words is not None else mixed.tokens(text.lower())
        self.n_tokens = len(self.tokens)
        self.nonspace = mixed.count_nonspace(text)
        self.token_chars = sum(map(len, self.tokens))
        self._ids: Optional[np.ndarray] = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(token ids as uint64, token lengths) for the n-gram rules."""
        if self._ids is None:
            # Python's str hash is salted per process, which is fine here: ids only compare within one document.
            self._ids = np.fromiter(map(hash, self.tokens), dtype=np.int64, count=self.n_tokens).view(np.uint64)
            self._lens = np.fromiter(map(len, self.tokens), dtype=np.int64, count=self.n_tokens)
        return self._ids, self._lens


# ---------------------------------------------------------------------------------------------------
# Shared measures


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of chars in them) — Gopher's definition."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup, dup_chars, total_chars = 0, 0, 0
    for it in items:
        total_chars += len(it)
        if it in seen:
            dup += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup / len(items), dup_chars / max(1, total_chars)


_P = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier: n-gram keys by polynomial hashing, in C


def _gram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    m = len(ids) - n + 1
    h = ids[:m].copy()
    for k in range(1, n):
        h = h * _P + ids[k:k + m]
    return h


def _first_of_most_frequent(first: np.ndarray, counts: np.ndarray, top: int) -> int:
    """Where the most frequent n-gram first occurs; among ties the earliest, as Counter.most_common picks.
    (n-gram keys come from per-process salted hashes, so `argmax` over them would pick a different tied
    n-gram, of a different length, in every process.)"""
    return int(first[counts == top].min())


def _top_ngram_frac(ids: np.ndarray, lens: np.ndarray, n: int, total: int) -> float:
    """Chars of the most frequent n-gram times its count, over all token chars (Gopher)."""
    if len(ids) < n or not total:
        return 0.0
    _, first, counts = np.unique(_gram_keys(ids, n), return_index=True, return_counts=True)
    top = int(counts.max())
    if top < 2:
        return 0.0
    start = _first_of_most_frequent(first, counts, top)
    return float(lens[start:start + n].sum()) * top / total


def _dup_ngram_frac(ids: np.ndarray, lens: np.ndarray, n: int, total: int) -> float:
    """Share of token chars covered by n-grams that occur more than once (overlaps counted once)."""
    if len(ids) < n or not total:
        return 0.0
    _, inverse, counts = np.unique(_gram_keys(ids, n), return_inverse=True, return_counts=True)
    starts = np.nonzero(counts[inverse] > 1)[0]
    if starts.size == 0:
        return 0.0
    edge = np.bincount(starts, minlength=len(ids) + n) - np.bincount(starts + n, minlength=len(ids) + n)
    covered = np.cumsum(edge)[: len(ids)] > 0
    return float(lens[covered].sum()) / total


def _dup_lines_paragraphs(doc: Doc, cfg) -> Optional[str]:
    """Gopher's duplicate line and paragraph fractions (by count and by characters)."""
    for name, limit, (frac, char_frac) in (
        ("lines", (cfg.max_dup_line_frac, cfg.max_dup_line_char_frac), _dup_fraction(doc.lines)),
        ("paragraphs", (cfg.max_dup_para_frac, cfg.max_dup_para_char_frac), _dup_fraction(doc.paragraphs)),
    ):
        if limit[0] is not None and frac > limit[0]:
            return f"gopher_rep.dup_{name}"
        if limit[1] is not None and char_frac > limit[1]:
            return f"gopher_rep.dup_{name}_chars"
    return None


def _repetition(doc: Doc, cfg) -> Optional[str]:
    reason = _dup_lines_paragraphs(doc, cfg)
    if reason:
        return reason
    ids, lens = doc.arrays()
    total = doc.token_chars
    for n, limit in zip((2, 3, 4), cfg.max_top_ngram_char_frac):
        if limit is not None and _top_ngram_frac(ids, lens, n, total) > limit:
            return f"gopher_rep.top_{n}gram"
    for n, limit in zip(range(5, 11), cfg.max_dup_ngram_char_frac):
        if limit is None:
            continue
        frac = _dup_ngram_frac(ids, lens, n, total)
        if frac > limit:
            return f"gopher_rep.dup_{n}gram"
        if frac == 0.0:  # no repeated n-gram means no repeated longer one either
            break
    return None


def _top_word_ngram_chars(keys: np.ndarray, lens: np.ndarray, n: int) -> int:
    """datatrove's `find_top_duplicate`: chars of the most frequent n-gram (words joined by one space) times
    its count."""
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    top = int(counts.max())
    start = _first_of_most_frequent(first, counts, top)
    return (int(lens[start:start + n].sum()) + n - 1) * top


def _dup_word_ngram_chars(keys: np.ndarray, lens: np.ndarray, n: int) -> int:
    """datatrove's `find_all_duplicate`: scan left to right; an n-gram seen before adds its chars and the scan
    jumps past it, so overlapping repeats are counted once and first occurrences not at all."""
    seen: set[int] = set()
    chars, i, m = 0, 0, len(keys)
    key_list = keys.tolist()
    while i < m:
        k = key_list[i]
        if k in seen:
            chars += int(lens[i:i + n].sum())
            i += n
        else:
            seen.add(k)
            i += 1
    return chars


def _word_repetition(doc: Doc, cfg) -> Optional[str]:
    """Gopher's repetition table as FineWeb-2 measured it for cmn_Hani: n-grams of jieba words, characters
    over the length of the text (datatrove's GopherRepetitionFilter)."""
    reason = _dup_lines_paragraphs(doc, cfg)
    if reason:
        return reason
    ids, lens = doc.arrays()
    total = max(1, len(doc.text))
    for n, limit in zip((2, 3, 4), cfg.max_top_ngram_char_frac):
        if limit is not None and len(ids) >= n and _top_word_ngram_chars(_gram_keys(ids, n), lens, n) / total > limit:
            return f"gopher_rep.top_{n}gram"
    for n, limit in zip(range(5, 11), cfg.max_dup_ngram_char_frac):
        if limit is None or len(ids) < n:
            continue
        chars = _dup_word_ngram_chars(_gram_keys(ids, n), lens, n)
        if chars / total > limit:
            return f"gopher_rep.dup_{n}gram"
        if chars == 0:  # no repeated n-gram means no repeated longer one either
            break
    return None


def _fineweb(doc: Doc, cfg, n_words: int) -> Optional[str]:
    lines = doc.lines
    if not lines:
        return "fineweb.empty"
    if cfg.fw_min_line_punct_ratio is not None:
        ratio = sum(1 for ln in lines if ln.endswith(mixed.TERMINAL)) / len(lines)
        if ratio < cfg.fw_min_line_punct_ratio:
            return "fineweb.line_punct"
    if cfg.fw_max_short_lines_ratio is not None:
        ratio = sum(1 for ln in lines if len(ln) <= cfg.fw_short_line_chars) / len(lines)
        if ratio > cfg.fw_max_short_lines_ratio:
            return "fineweb.short_lines"
    if cfg.fw_max_dup_line_char_ratio is not None:
        counts = Counter(lines)
        dup_chars = sum(len(ln) * (c - 1) for ln, c in counts.items() if c > 1)
        if dup_chars / max(1, doc.nonspace) > cfg.fw_max_dup_line_char_ratio:
            return "fineweb.dup_line_chars"
    if cfg.fw_max_newlines_per_word is not None:
        if doc.text.count("\n") / max(1, n_words) > cfg.fw_max_newlines_per_word:
            return "fineweb.newlines_per_word"
    return None


def _common(doc: Doc, cfg: CommonRules, control_removed: int) -> Optional[str]:
    n = max(1, doc.nonspace)
    punct, sym = mixed.punct_symbol_counts(doc.text)
    bad = doc.text.count("\ufffd") + control_removed
    if cfg.max_control_ratio is not None and bad / n > cfg.max_control_ratio:
        return "lm2.control_chars"
    if cfg.max_symbol_ratio is not None and sym / n > cfg.max_symbol_ratio:
        return "lm2.symbols"
    if cfg.max_punct_ratio is not None and punct / n > cfg.max_punct_ratio:
        return "lm2.punct_high"
    if cfg.min_punct_ratio is not None and punct / n < cfg.min_punct_ratio:
        return "lm2.punct_low"
    if cfg.max_single_token_lines_ratio is not None and doc.lines:
        single = sum(1 for ln in doc.lines if mixed.count_tokens_upto(ln, 2) <= 1)
        if single / len(doc.lines) > cfg.max_single_token_lines_ratio:
            return "lm2.single_token_lines"
    return None


# ---------------------------------------------------------------------------------------------------
# English


def c4_lines(text: str, cfg: EnRules) -> tuple[str, int]:
    """C4's line rules: drop javascript/policy lines, lines with a giant word, lines under N words."""
    kept, removed = [], 0
    for line in text.split("\n"):
        low = line.lower()
        words = line.split()
        if not line.strip():
            kept.append(line)
            continue
        if ("javascript" in low or any(p in low for p in C4_POLICY)
                or (cfg.c4_max_word_length is not None and any(len(w) > cfg.c4_max_word_length for w in words))
                or (cfg.c4_min_words_per_line is not None and len(words) < cfg.c4_min_words_per_line)):
            removed += 1
            continue
        kept.append(line)
    return "\n".join(kept).strip(), removed


def check_en(record: dict, cfg: EnRules, common: CommonRules) -> Optional[str]:
    text = record["text"]
    if cfg.c4 and record["content_type"] in cfg.c4_content_types:
        low = text.lower()
        if "lorem ipsum" in low:
            return "c4.lorem_ipsum"
        if cfg.c4_curly_bracket and "{" in text:
            return "c4.curly_bracket"
        text, removed = c4_lines(text, cfg)
        if removed:
            record["text"] = text
            record["meta"]["lm2"]["c4_lines_removed"] = removed
        if not text:
            return "c4.no_lines_left"
        if cfg.c4_min_sentences is not None and len(_SENTENCE.findall(text)) < cfg.c4_min_sentences:
            return "c4.too_few_sentences"
    doc = Doc(text)
    words = [t for t in doc.tokens]
    n = len(words)
    if cfg.min_words is not None and n < cfg.min_words:
        return "gopher.too_few_words"
    if cfg.max_words is not None and n > cfg.max_words:
        return "gopher.too_many_words"
    mean = doc.token_chars / max(1, n)
    if cfg.min_avg_word_length is not None and mean < cfg.min_avg_word_length:
        return "gopher.avg_word_length"
    if cfg.max_avg_word_length is not None and mean > cfg.max_avg_word_length:
        return "gopher.avg_word_length"
    if cfg.max_symbol_word_ratio is not None:
        if text.count("#") / n > cfg.max_symbol_word_ratio:
            return "gopher.hash_ratio"
        if (text.count("...") + text.count("…")) / n > cfg.max_symbol_word_ratio:
            return "gopher.ellipsis_ratio"
    if doc.lines:
        if (cfg.max_bullet_lines_ratio is not None
                and sum(ln.startswith(BULLETS) for ln in doc.lines) / len(doc.lines) > cfg.max_bullet_lines_ratio):
            return "gopher.bullet_lines"
        if (cfg.max_ellipsis_lines_ratio is not None
                and sum(ln.endswith(ELLIPSIS) for ln in doc.lines) / len(doc.lines) > cfg.max_ellipsis_lines_ratio):
            return "gopher.ellipsis_lines"
    if cfg.min_alpha_words_ratio is not None:
        n_ws = len(text.split())
        if (n_ws - mixed.count_words_without_letters(text)) / max(1, n_ws) < cfg.min_alpha_words_ratio:
            return "gopher.alpha_words"
    if cfg.min_stop_words is not None:
        stops = set(cfg.stop_words)
        if len(stops.intersection(words)) < cfg.min_stop_words:
            return "gopher.stop_words"
    reason = _common(doc, common, record["meta"]["lm2"].get("control_removed", 0))
    if reason:
        return reason
    reason = _fineweb(doc, cfg, n)
    if reason:
        return reason
    if cfg.min_lid_score is not None and record["meta"]["lm2"].get("lang_score", 1.0) < cfg.min_lid_score:
        return "lid.low_score"
    return _repetition(doc, cfg)


# ---------------------------------------------------------------------------------------------------
# Chinese (and mixed: CJK-aware table, minus the rules that assume a monolingual document)


def check_zh(record: dict, cfg: ZhRules, common: CommonRules, monolingual: bool = True,
             en_stop_words: tuple = ()) -> Optional[str]:
    text = record["text"]
    if cfg.max_short_chars is not None and mixed.count_nonspace(text) <= cfg.max_short_chars:
        return "cwt.too_short"  # before segmenting: the cheapest rule needs no words
    doc = Doc(text, words=zh_words(text))
    words = doc.tokens
    n = max(1, doc.n_tokens)
    content = [w for w in words if not _is_symbol_word(w)]
    mean = sum(map(len, content)) / max(1, len(content))
    if cfg.min_avg_word_length is not None and mean < cfg.min_avg_word_length:
        return "fw2.avg_word_length"
    if cfg.max_avg_word_length is not None and mean > cfg.max_avg_word_length:
        return "fw2.avg_word_length"
    if cfg.min_alpha_words_ratio is not None:
        if sum(map(_has_alpha, words)) / n < cfg.min_alpha_words_ratio:
            return "fw2.alpha_words"
    if cfg.min_stop_words is not None:
        stops = set(cfg.stop_words) if monolingual else set(cfg.stop_words) | set(en_stop_words)
        if sum(1 for w in words if w in stops) < cfg.min_stop_words:
            return "fw2.stop_words"
    if doc.lines:
        if cfg.cwt_min_avg_line_length is not None and doc.nonspace / len(doc.lines) < cfg.cwt_min_avg_line_length:
            return "cwt.avg_line_length"
        if (cfg.yl_max_tiny_lines_ratio is not None
                and sum(1 for ln in doc.lines if len(ln) < 3) / len(doc.lines) > cfg.yl_max_tiny_lines_ratio):
            return "yl.tiny_lines"
    if monolingual:
        if cfg.cwt_min_cjk_ratio is not None and len(_CJK_BASIC.findall(text)) / max(1, len(text)) < cfg.cwt_min_cjk_ratio:
            return "cwt.cjk_ratio"
        if cfg.yl_max_non_chinese_ratio is not None:
            alnum = sum(1 for ch in text if ch.isalnum())
            cjk = mixed.count_cjk(text)
            if (alnum - cjk) / max(1, alnum) > cfg.yl_max_non_chinese_ratio:
                return "yl.non_chinese"
        if cfg.min_lid_score is not None and record["meta"]["lm2"].get("lang_score", 1.0) < cfg.min_lid_score:
            return "lid.low_score"
    reason = _common(doc, common, record["meta"]["lm2"].get("control_removed", 0))
    if reason:
        return reason
    reason = _fineweb(doc, cfg, n)
    if reason:
        return reason
    if cfg.cwt_max_13gram_rep is not None:
        flat = _WS.sub("", text.lower())
        grams = [flat[i:i + 13] for i in range(0, max(0, len(flat) - 12))]
        if grams and (len(grams) - len(set(grams))) / len(grams) > cfg.cwt_max_13gram_rep:
            return "cwt.13gram_rep"
    return _word_repetition(doc, cfg)


# ---------------------------------------------------------------------------------------------------


def check_code(record: dict, cfg: CodeRules) -> Optional[str]:
    text = record["text"]
    if cfg.min_chars is not None and len(text) < cfg.min_chars:
        return "code.too_short"
    if cfg.max_line_length is not None and max((len(ln) for ln in text.split("\n")), default=0) > cfg.max_line_length:
        return "code.long_lines"
    if cfg.min_alpha_ratio is not None and mixed.count_alpha(text) / max(1, len(text)) < cfg.min_alpha_ratio:
        return "code.low_alpha"
    bad = text.count("\ufffd") + record["meta"]["lm2"].get("control_removed", 0)
    if cfg.max_control_ratio is not None and bad / max(1, len(text)) > cfg.max_control_ratio:
        return "code.control_chars"
    return None


def check(record: dict, cfg: RulesConfig) -> Optional[str]:
    lang = record["lang"]
    if lang == "code":
        return check_code(record, cfg.code)
    if lang == "zh":
        return check_zh(record, cfg.zh, cfg.common)
    if lang == "mixed":
        return check_zh(record, cfg.zh, cfg.common, monolingual=False, en_stop_words=tuple(cfg.en.stop_words))
    if lang == "en":
        return check_en(record, cfg.en, cfg.common)
    # Any other selected language: the English table without its English-only rules.
    return check_en(record, dataclasses.replace(cfg.en, min_stop_words=None, min_lid_score=None), cfg.common)
