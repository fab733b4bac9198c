"""Language and code classification, offline (SPEC §4.3, P6, P15).

Decision rule: code comes from the extension/content type and syntax signals, never from the LID.
Otherwise the CJK share decides with pycld2 (its model ships inside the wheel; InternLM2's choice):
`mixed` when CJK ideographs and Latin words both hold a large share of the mixed tokens, `zh` when
`cjk_ratio >= 0.3` and the LID agrees, `en` when the LID gives en >= 0.65, the LID's ISO code when it is
confident about another language, else `other`. Traditional Chinese is labelled zh (script noted in
meta); folding it to Simplified needs OpenCC, which lm2 does not depend on.
"""

from __future__ import annotations

import re

import pycld2

from . import mixed

_STRONG = re.compile(
    r"^\s*(def |class |import \w|from [\w.]+ import |#include|#define |return\b|public |private |protected |"
    r"function\b|const |let |var |package |fn |func |using |namespace |elif |except\b|try:|raise |yield )"
)
_SYNTAX = re.compile(r"([;{}(,\[]\s*$|^\s*[}\])]|^\s*@\w|^\s*[A-Za-z_][\w.\[\]'\"]*\s*[-+*/|&]?=\s*\S)")
_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")

MIXED_SHARE = (0.25, 0.75)  # CJK share of mixed tokens that makes a document bilingual
MIXED_MIN_TOKENS = 10
ZH_MIN_CJK_RATIO = 0.3
EN_MIN_LID = 0.65
LID_MAX_CHARS = 100_000


def code_score(text: str) -> float:
    """Share of non-empty lines with code syntax (keywords, assignments, brackets), 0 for short texts.

    Docstrings and comments dilute it, so a handful of keyword lines in an indented body also counts.
    """
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) < 3:
        return 0.0
    strong = sum(1 for ln in lines if _STRONG.match(ln))
    syntax = sum(1 for ln in lines if _SYNTAX.search(ln))
    indented = sum(1 for ln in lines if ln.startswith(("    ", "\t")))
    score = (strong + syntax) / len(lines)
    if strong >= 3 and strong / len(lines) >= 0.05 and indented / len(lines) >= 0.2:
        score = max(score, 0.6)
    return min(1.0, score)


def detect_lid(text: str) -> tuple[str, float, bool]:
    """(ISO code, share of text in that language 0-1, reliable) from pycld2; ('un', 0, False) on failure."""
    clean = _CTRL.sub(" ", text[:LID_MAX_CHARS])
    try:
        reliable, _, details = pycld2.detect(clean, isPlainText=True)
    except pycld2.error:
        try:
            reliable, _, details = pycld2.detect(clean.encode("utf-8", "ignore").decode("utf-8"), isPlainText=True)
        except pycld2.error:
            return "un", 0.0, False
    code, pct = details[0][1], details[0][2]
    return code, pct / 100.0, bool(reliable)


def classify(text: str, content_type: str) -> dict:
    """Return {"lang", "lang_score", "cjk_ratio", "mixed", "lid", "code_score"} for a standardized text."""
    nonspace = mixed.count_nonspace(text) or 1
    n_cjk = mixed.count_cjk(text)
    cjk_ratio = n_cjk / nonspace
    n_cjk_tok = n_cjk  # every CJK ideograph is a token of its own
    toks = mixed.tokens(text)
    n_word = len(toks) - n_cjk - sum(1 for t in toks if t.isdigit())
    share = n_cjk_tok / max(1, n_cjk_tok + n_word)
    info = {"cjk_ratio": round(cjk_ratio, 4), "mixed": False}
    if content_type == "code":
        info.update(lang="code", lang_score=1.0, code_score=round(code_score(text), 3))
        return info
    cscore = code_score(text)
    if cscore >= 0.6 and cjk_ratio < 0.1:
        info.update(lang="code", lang_score=round(cscore, 3), code_score=round(cscore, 3))
        return info
    lid, score, reliable = detect_lid(text)
    info.update(lid=lid, lang_score=round(score, 3))
    is_mixed = (MIXED_SHARE[0] <= share <= MIXED_SHARE[1] and n_cjk_tok >= MIXED_MIN_TOKENS
                and n_word >= MIXED_MIN_TOKENS)
    info["mixed"] = is_mixed or (n_cjk_tok >= MIXED_MIN_TOKENS and n_word >= MIXED_MIN_TOKENS and 0.1 <= share <= 0.9)
    if is_mixed:
        info["lang"] = "mixed"
    elif cjk_ratio >= ZH_MIN_CJK_RATIO and lid in ("zh", "zh-Hant", "un"):
        info["lang"] = "zh"
        if lid == "zh-Hant":
            info["script"] = "Hant"
        if lid == "un":  # pycld2 abstains on very short text; the CJK share alone then decides
            info["lang_score"] = round(cjk_ratio, 3)
    elif lid == "en" and score >= EN_MIN_LID:
        info["lang"] = "en"
    elif lid not in ("un", "xxx") and reliable:
        info["lang"] = lid
    else:
        info["lang"] = "other"
    return info
