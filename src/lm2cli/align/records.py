"""RLHF input records and their token sequences: preference pairs, PPO prompts, reward-model inputs.

Pairs (`lm2 rlhf reward --data`), one JSON object per line:

    {"condition": "helpful", "prompt": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "..."}

PPO prompts (`lm2 rlhf ppo --data`): `{"condition", "prompt"}` plus an optional `"gold"` (gold.py) that
makes the reward verifiable. `prompt` is a list of chat messages; a plain string is read as one user
turn. `condition` names a system prompt in the recipe's `rlhf.conditions` (missing = `default`, which
adds no system message). A record that cannot be used is kept with a reason, never dropped silently.

Reward-model input (SPEC §8.1): `[system: conditions[key]] + prompt turns + [assistant: response]` in
the chat template, then the reward token, appended exactly once; the score is read there. The actor
sees the prompt turns only (its own system message, if the data gives one, is part of the prompt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from ..chat import Rejected, check_messages, encode_prompt
from ..errors import InputError


@dataclass
class Pair:
    condition: str
    prompt: list[dict]
    chosen: str
    rejected: str
    line: int = 0


@dataclass
class Prompt:
    condition: str
    prompt: list[dict]
    gold: Optional[dict] = None
    line: int = 0
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: Path) -> Iterable[tuple[int, str]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def _messages(prompt: Any) -> list[dict]:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise Rejected("no-prompt", "`prompt` must be a non-empty list of messages or a string")
    check_messages(prompt)
    if prompt[-1]["role"] == "assistant":
        raise Rejected("prompt-ends-with-assistant", "the prompt's last turn is the assistant's; nothing to answer")
    return prompt


def _condition(record: dict, conditions: dict) -> str:
    cond = record.get("condition", "default")
    if cond is None:
        cond = "default"
    if cond not in conditions:
        raise Rejected("unknown-condition", f"condition {cond!r} is not in rlhf.conditions ({', '.join(conditions)})")
    return cond


def parse_pair(record: Any, conditions: dict, line: int = 0) -> Pair:
    if not isinstance(record, dict):
        raise Rejected("not-an-object", "record is not a JSON object")
    cond = _condition(record, conditions)
    prompt = _messages(record.get("prompt"))
    chosen, rejected = record.get("chosen"), record.get("rejected")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str) or not text.strip():
            raise Rejected(f"empty-{name}", f"`{name}` must be non-empty text")
    if chosen == rejected:
        raise Rejected("identical-responses", "`chosen` and `rejected` are the same text")
    return Pair(cond, prompt, chosen, rejected, line)


def parse_prompt(record: Any, conditions: dict, line: int = 0) -> Prompt:
    if not isinstance(record, dict):
        raise Rejected("not-an-object", "record is not a JSON object")
    cond = _condition(record, conditions)
    prompt = _messages(record.get("prompt"))
    gold = record.get("gold")
    if gold is not None:
        from .gold import check_gold

        check_gold(gold)
    meta = {k: v for k, v in record.items() if k not in ("condition", "prompt", "gold")}
    return Prompt(cond, prompt, gold, line, meta)


def load_records(path: Path, parse, conditions: dict) -> tuple[list, list[dict]]:
    """(records, rejected) where each rejected entry holds `line`, `reason`, `detail` and the raw text."""
    kept, rejected = [], []
    for n, line in read_jsonl(path):
        try:
            kept.append(parse(json.loads(line), conditions, n))
        except json.JSONDecodeError as e:
            rejected.append({"line": n, "reason": "invalid-json", "detail": str(e), "text": line.rstrip("\n")})
        except Rejected as e:
            rejected.append({"line": n, "reason": e.code, "detail": e.detail, "text": line.rstrip("\n")})
    return kept, rejected


# ---------------------------------------------------------------------------------------------------
# Token sequences


def with_reward_token(ids: list[int], reward_id: int) -> list[int]:
    """`ids` ending in the reward token: appended once, never twice."""
    return list(ids) if ids and ids[-1] == reward_id else list(ids) + [reward_id]


def rm_prefix(tok, prompt: list[dict], system: str) -> list[int]:
    """The RM's view of a prompt up to the assistant header: the condition's system turn first (if any,
    and unless the prompt already opens with that very system turn)."""
    opens_with_it = bool(prompt) and prompt[0]["role"] == "system" and prompt[0]["content"] == system
    messages = ([{"role": "system", "content": system}] if system and not opens_with_it else []) + list(prompt)
    return encode_prompt(tok, messages)


def close_response(tok, response_ids: list[int]) -> list[int]:
    """A response as the template closes an assistant turn: its ids, `<|im_end|>`, newline.

    A generated response may end in a stop id (`</s>` or `<|im_end|>`); it is replaced by the closing,
    so text-encoded (RM training) and generated (PPO) responses end the same way.
    """
    ids = list(response_ids)
    while ids and ids[-1] in tok.stop_ids:
        ids.pop()
    return ids + [tok.im_end_id] + tok.encode("\n")


def rm_sequence(tok, prefix: list[int], response_ids: list[int]) -> list[int]:
    return with_reward_token(prefix + close_response(tok, response_ids), tok.reward_id)


def encode_text(tok, text: str) -> list[int]:
    return tok.encode(text, allow_special=False)
