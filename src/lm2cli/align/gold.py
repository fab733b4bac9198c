"""Programmatic gold rewards: what the reward model is only a proxy for (SPEC §10, RLHF demo).

A PPO prompt may carry `"gold"`, a set of verifiable checks on the response text; the gold reward is
1.0 when every check holds, else 0.0. PPO logs it beside the RM score, so reward hacking shows up as
the RM score rising while the gold reward falls.

    {"answer": "57"}          the last number in the response is 57
    {"style": "brief"}        the response is the answer alone (at most `brief_words` words)
    {"style": "detailed"}     the response shows working: an "=" before the final answer
    {"keyword": "please"}     the response contains the keyword (case-insensitive)
    {"max_words": 30}         the response has at most 30 words (a length budget)
"""

from __future__ import annotations

import re

from ..chat import Rejected

KEYS = ("answer", "style", "keyword", "max_words")
STYLES = ("brief", "detailed")
BRIEF_WORDS = 3
_NUMBER = re.compile(r"-?\d+")


def check_gold(gold) -> None:
    if not isinstance(gold, dict) or not gold:
        raise Rejected("bad-gold", "`gold` must be a non-empty object")
    unknown = [k for k in gold if k not in KEYS]
    if unknown:
        raise Rejected("bad-gold", f"unknown gold check {unknown[0]!r}; known: {', '.join(KEYS)}")
    if "style" in gold and gold["style"] not in STYLES:
        raise Rejected("bad-gold", f"gold style must be one of {', '.join(STYLES)}, got {gold['style']!r}")
    if "max_words" in gold and not (isinstance(gold["max_words"], int) and gold["max_words"] > 0):
        raise Rejected("bad-gold", "gold max_words must be a positive integer")


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def gold_checks(gold: dict, text: str) -> dict[str, bool]:
    """Each check's outcome, by name."""
    words = text.split()
    out = {}
    if "answer" in gold:
        out["answer"] = last_number(text) == str(gold["answer"]).strip()
    if "style" in gold:
        if gold["style"] == "brief":
            out["style"] = 0 < len(words) <= BRIEF_WORDS
        else:
            out["style"] = "=" in text and len(words) > BRIEF_WORDS
    if "keyword" in gold:
        out["keyword"] = str(gold["keyword"]).lower() in text.lower()
    if "max_words" in gold:
        out["max_words"] = len(words) <= int(gold["max_words"])
    return out


def gold_reward(gold: dict | None, text: str) -> float | None:
    """1.0 if every check holds, 0.0 if one fails, None when the prompt has no gold."""
    if not gold:
        return None
    return float(all(gold_checks(gold, text).values()))
