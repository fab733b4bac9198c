"""InternLM2's chat format: the template, its tokenization with loss masks, validation and packing.

The template (SPEC §3.2), byte for byte:

    <s><|im_start|>{role}[ name={name}]\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n

with roles `system`, `user`, `assistant` and `environment` (tool results). A tool call sits inside
assistant content as `<|action_start|><|plugin|>\\n{json}<|action_end|>` (or `<|interpreter|>`).

Special tokens come only from the template's structure, never from what a user typed: contents are
encoded with `allow_special=False`, so a user message holding the text `<|im_end|>` stays text. The
one deliberate exception is the tool-call markup of assistant turns, which is parsed here and emitted
as the action/namespace tokens; a header name of `<|plugin|>` or `<|interpreter|>` is a token too.

Loss mask (SPEC §7, xtuner): assistant content, tool calls included, plus its `<|im_end|>\\n`. BOS,
headers, system/user/environment turns and assistant turns marked `"loss": false` are masked.

Truncation policy for `max_len` (tokens, BOS included): a conversation that does not fit keeps its
longest prefix of whole messages that ends with a trained assistant turn and fits; one whose first
trained assistant turn already ends past `max_len` is rejected (`too-long`). A turn is never cut in
the middle, so no sample teaches a reply that stops half way.

Packing: conversations are shuffled (seeded) and concatenated, whole, into rows of `max_len`; each
restarts its positions at 0, so the model's packed-document attention keeps them apart (SPEC §5.2,
P11). The padding tail is its own "document" with labels −100. Labels are the next token where the
next token is trained, else −100; a conversation's last position is −100.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

ROLES = ("system", "user", "assistant", "environment")
BOS, IM_START, IM_END = "<s>", "<|im_start|>", "<|im_end|>"
ACTION_START, ACTION_END = "<|action_start|>", "<|action_end|>"
NAMESPACES = ("<|plugin|>", "<|interpreter|>")
IGNORE = -100

_CALL = re.compile(r"<\|action_start\|>(<\|plugin\|>|<\|interpreter\|>)(.*?)<\|action_end\|>", re.S)
_MARKUP = re.compile(r"<\|(action_start|action_end|plugin|interpreter)\|>")


class Rejected(ValueError):
    """A conversation lm2 cannot train on; `code` is a stable short reason, the message the detail."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


# ---------------------------------------------------------------------------------------------------
# Template


def render(messages: list[dict], add_generation_prompt: bool = False, bos: bool = True) -> str:
    """The conversation as InternLM2 template text (what `encode_chat` tokenizes, piece by piece)."""
    parts = [BOS] if bos else []
    for m in messages:
        parts.append(f"{IM_START}{_header(m)}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def _header(m: dict) -> str:
    return f"{m['role']} name={m['name']}" if m.get("name") else m["role"]


# `render` as a Jinja template, for HF's `apply_chat_template` (lm2 writes it into every
# tokenizer_config.json): byte-identical output, names and tool/environment turns included.
JINJA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] }}"
    "{% if message['name'] is defined and message['name'] %}{{ ' name=' + message['name'] }}{% endif %}"
    "{{ '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def validate(record: Any) -> list[dict]:
    """The record's messages if it is a trainable conversation; else raise `Rejected` with the reason."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise Rejected("no-messages", "record has no non-empty `messages` list")
    check_messages(messages)
    if not any(m["role"] == "assistant" and m.get("loss", True) for m in messages):
        raise Rejected("no-assistant-turn", "no assistant turn to learn from")
    return messages


def check_messages(messages: list) -> None:
    """Roles, contents and names that the template can render (prompts use this too)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise Rejected("bad-message", f"message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise Rejected("unknown-role", f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise Rejected("empty-content", f"message {i} ({role}) has empty or non-text content")
        name = m.get("name")
        if name is not None and (not isinstance(name, str) or "\n" in name or not name.strip()):
            raise Rejected("bad-name", f"message {i} has name {name!r}; a name is one line of text")
        if role == "assistant":
            _split_tool_calls(content, i)
        if "loss" in m and not isinstance(m["loss"], bool):
            raise Rejected("bad-message", f"message {i} has a non-boolean `loss`")


def _split_tool_calls(content: str, index: int = 0) -> list[tuple[str, str]]:
    """Assistant content as [("text", s) | ("call", namespace) | ("text", body) | ("end", "")] pieces."""
    pieces, pos = [], 0
    for m in _CALL.finditer(content):
        pieces.append(("text", content[pos:m.start()]))
        pieces += [("call", m.group(1)), ("text", m.group(2)), ("end", "")]
        pos = m.end()
    pieces.append(("text", content[pos:]))
    for kind, text in pieces:
        if kind == "text" and _MARKUP.search(text):
            raise Rejected("malformed-tool-call", f"message {index}: tool-call markup outside "
                           "<|action_start|><|plugin|>|<|interpreter|> ... <|action_end|>")
    return [(k, t) for k, t in pieces if k != "text" or t]


# ---------------------------------------------------------------------------------------------------
# Tokenization


def encode_chat(tok, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of the rendered conversation; mask 1 marks tokens the model learns to write."""
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        ids_m, mask_m = encode_message(tok, m)
        ids += ids_m
        mask += mask_m
    if add_generation_prompt:
        gen = generation_prompt(tok)
        ids += gen
        mask += [0] * len(gen)
    return ids, mask


def encode_prompt(tok, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the generation prompt `<|im_start|>assistant\\n`."""
    check_messages(messages)
    return encode_chat(tok, messages, add_generation_prompt=True)[0]


def generation_prompt(tok) -> list[int]:
    return [tok.im_start_id] + _text(tok, "assistant\n")


def encode_message(tok, m: dict) -> tuple[list[int], list[int]]:
    head = [tok.im_start_id] + _encode_header(tok, m)
    trained = m["role"] == "assistant" and m.get("loss", True)
    body = _encode_assistant(tok, m["content"]) if m["role"] == "assistant" else _text(tok, m["content"])
    tail = [tok.im_end_id] + _text(tok, "\n")
    return head + body + tail, [0] * len(head) + [int(trained)] * (len(body) + len(tail))


def _encode_header(tok, m: dict) -> list[int]:
    name = m.get("name")
    if name in NAMESPACES:
        return _text(tok, f"{m['role']} name=") + [tok.token_to_id(name)] + _text(tok, "\n")
    return _text(tok, _header(m) + "\n")


def _encode_assistant(tok, content: str) -> list[int]:
    ids: list[int] = []
    for kind, text in _split_tool_calls(content):
        if kind == "call":
            ids += [tok.token_to_id(ACTION_START), tok.token_to_id(text)]
        elif kind == "end":
            ids.append(tok.token_to_id(ACTION_END))
        else:
            ids += _text(tok, text)
    return ids


def _text(tok, s: str) -> list[int]:
    """Plain text: whatever looks like a special token stays text."""
    return tok.encode(s, allow_special=False)


# ---------------------------------------------------------------------------------------------------
# Conversations → training examples


@dataclass
class Example:
    ids: list[int]
    mask: list[int]
    truncated: bool = False


@dataclass
class BuildStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    rejected: dict = field(default_factory=dict)  # reason code -> count
    tokens: int = 0
    loss_tokens: int = 0


def encode_record(tok, record: Any, max_len: int) -> Example:
    """One JSONL record → a training example within `max_len`, or `Rejected` (module docstring policy)."""
    messages = validate(record)
    ids, mask, ends = [tok.bos_id], [0], []
    for m in messages:
        ids_m, mask_m = encode_message(tok, m)
        ids += ids_m
        mask += mask_m
        ends.append(len(ids))
    if len(ids) <= max_len:
        return Example(ids, mask)
    cut = 0
    for m, end in zip(messages, ends):
        if end > max_len:
            break
        if m["role"] == "assistant" and m.get("loss", True):
            cut = end
    if cut == 0:
        first = next(e for m, e in zip(messages, ends) if m["role"] == "assistant" and m.get("loss", True))
        raise Rejected("too-long", f"the first assistant turn ends at token {first} > max_len {max_len}")
    return Example(ids[:cut], mask[:cut], truncated=True)


def build_examples(tok, lines: Iterable[str], max_len: int) -> tuple[list[Example], list[dict], BuildStats]:
    """JSONL lines → (examples, rejected records with `line`, `reason`, `detail`, stats)."""
    examples, rejected, stats = [], [], BuildStats()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        stats.records += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            rejected.append({"line": n, "reason": "invalid-json", "detail": str(e), "text": line.rstrip("\n")})
            stats.rejected["invalid-json"] = stats.rejected.get("invalid-json", 0) + 1
            continue
        try:
            ex = encode_record(tok, record, max_len)
        except Rejected as e:
            rejected.append({"line": n, "reason": e.code, "detail": e.detail, "record": record})
            stats.rejected[e.code] = stats.rejected.get(e.code, 0) + 1
            continue
        examples.append(ex)
        stats.kept += 1
        stats.truncated += ex.truncated
        stats.tokens += len(ex.ids)
        stats.loss_tokens += sum(ex.mask[1:])  # the first token is never a target
    return examples, rejected, stats


# ---------------------------------------------------------------------------------------------------
# Packing


def labels_for(ids: list[int], mask: list[int]) -> list[int]:
    """Next-token labels: ids[t+1] where that token is trained, else −100; the last position −100."""
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def pack(examples: list[Example], max_len: int, pad_id: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """Rows of exactly `max_len`: {"input_ids", "labels", "position_ids"} (see the module docstring)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    cur_ids: list[int] = []
    cur_lab: list[int] = []
    cur_pos: list[int] = []

    def flush():
        pad = max_len - len(cur_ids)
        rows["input_ids"].append(cur_ids + [pad_id] * pad)
        rows["labels"].append(cur_lab + [IGNORE] * pad)
        rows["position_ids"].append(cur_pos + list(range(pad)))

    for i in order:
        ex = examples[i]
        if len(ex.ids) > max_len:
            raise ValueError(f"example of {len(ex.ids)} tokens does not fit max_len {max_len}")
        if len(cur_ids) + len(ex.ids) > max_len:
            flush()
            cur_ids, cur_lab, cur_pos = [], [], []
        cur_ids += ex.ids
        cur_lab += labels_for(ex.ids, ex.mask)
        cur_pos += list(range(len(ex.ids)))
    if cur_ids:
        flush()
    return rows


def masked_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The contiguous runs of trained ids (for tests and data inspection)."""
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans
