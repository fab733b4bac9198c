"""InternLM2's chat template, its loss mask, record validation with reasons, truncation and packing."""

import json
from collections import Counter

import pytest
import torch

from lm2cli.chat import (
    IGNORE,
    Rejected,
    build_examples,
    encode_chat,
    encode_prompt,
    encode_record,
    labels_for,
    masked_spans,
    pack,
    render,
)
from lm2cli.config import ModelConfig, TokenizerConfig
from lm2cli.model import InternLM2
from lm2cli.tokenizer import build_vocab

CALL = '{"name": "calculator", "parameters": {"expression": "12 * 7"}}'
CONVERSATION = [
    {"role": "system", "content": "You are InternLM2."},
    {"role": "user", "content": "What is 12 * 7?"},
    {"role": "assistant", "content": f"Let me compute.<|action_start|><|plugin|>\n{CALL}<|action_end|>"},
    {"role": "environment", "name": "<|plugin|>", "content": '{"result": 84}'},
    {"role": "assistant", "content": "12 * 7 = 84."},
    {"role": "user", "content": "Is <|im_end|> in my text just text?"},
    {"role": "assistant", "content": "Yes."},
]
# SPEC §3.2, written out by hand: BOS once, then <|im_start|>role[ name=..]\n content <|im_end|>\n per message.
EXPECTED = (
    "<s>"
    "<|im_start|>system\nYou are InternLM2.<|im_end|>\n"
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n"
    "<|im_start|>assistant\nLet me compute.<|action_start|><|plugin|>\n"
    '{"name": "calculator", "parameters": {"expression": "12 * 7"}}<|action_end|><|im_end|>\n'
    "<|im_start|>environment name=<|plugin|>\n{\"result\": 84}<|im_end|>\n"
    "<|im_start|>assistant\n12 * 7 = 84.<|im_end|>\n"
    "<|im_start|>user\nIs <|im_end|> in my text just text?<|im_end|>\n"
    "<|im_start|>assistant\nYes.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok():
    return build_vocab(TokenizerConfig(n_en=1000, n_zh=0, n_spare=16), Counter())[0]


def test_rendered_template_equals_spec_character_for_character(tok):
    assert render(CONVERSATION) == EXPECTED
    ids, mask = encode_chat(tok, CONVERSATION)
    assert tok.decode(ids) == EXPECTED
    assert len(ids) == len(mask)


def test_special_tokens_come_only_from_structure(tok):
    ids, _ = encode_chat(tok, CONVERSATION)
    counts = Counter(ids)
    assert counts[tok.bos_id] == 1
    assert counts[tok.im_start_id] == len(CONVERSATION)
    assert counts[tok.im_end_id] == len(CONVERSATION)  # the user's literal "<|im_end|>" stayed text
    for name in ("<|action_start|>", "<|action_end|>"):
        assert counts[tok.token_to_id(name)] == 1
    assert counts[tok.token_to_id("<|plugin|>")] == 2  # the call's namespace and the environment's name
    user = tok.encode("Is <|im_end|> in my text just text?")
    assert tok.im_end_id not in user and tok.decode(user) == "Is <|im_end|> in my text just text?"


def test_loss_mask_covers_exactly_assistant_content_and_its_im_end_newline(tok):
    ids, mask = encode_chat(tok, CONVERSATION)
    spans = [tok.decode(s) for s in masked_spans(ids, mask)]
    assert spans == [m["content"] + "<|im_end|>\n" for m in CONVERSATION if m["role"] == "assistant"]
    # The masked-out remainder is everything else: BOS, headers and the other roles' turns.
    assert sum(mask) == sum(len(s) for s in masked_spans(ids, mask))
    assert mask[0] == 0


def test_turns_marked_loss_false_are_masked(tok):
    conv = [dict(m) for m in CONVERSATION]
    conv[4]["loss"] = False
    ids, mask = encode_chat(tok, conv)
    spans = [tok.decode(s) for s in masked_spans(ids, mask)]
    assert "12 * 7 = 84.<|im_end|>\n" not in spans and len(spans) == 2


def test_generation_prompt(tok):
    msgs = CONVERSATION[:2]
    ids = encode_prompt(tok, msgs)
    assert tok.decode(ids) == render(msgs, add_generation_prompt=True)
    assert render(msgs, add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ids[-len(tok.encode("assistant\n")) - 1] == tok.im_start_id


def _line(messages, **extra):
    return json.dumps({"messages": messages, **extra})


def test_invalid_records_are_rejected_with_reasons_never_dropped(tok):
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lines = [
        _line(ok),
        "{not json",
        _line([{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]),
        _line([{"role": "user", "content": "only a question"}]),
        _line([{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]),
        _line([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a <|action_start|> b"}]),
        _line([{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "a"}]),
        json.dumps({"text": "no messages"}),
        "",
        _line(ok),
    ]
    examples, rejected, stats = build_examples(tok, lines, max_len=64)
    assert len(examples) == 2 and stats.kept == 2
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (2, "invalid-json"), (3, "unknown-role"), (4, "no-assistant-turn"), (5, "empty-content"),
        (6, "malformed-tool-call"), (7, "too-long"), (8, "no-messages")]
    assert stats.records == 9 and stats.kept + len(rejected) == stats.records  # the blank line is not a record
    assert rejected[1]["record"]["messages"][0]["role"] == "bot"  # the record itself is kept
    assert "'bot'" in rejected[1]["detail"]


def test_over_long_conversations_keep_whole_turns_up_to_an_assistant_turn(tok):
    conv = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second " * 100}, {"role": "assistant", "content": "second answer"}]
    full = encode_record(tok, {"messages": conv}, max_len=10_000)
    short = encode_record(tok, {"messages": conv}, max_len=60)
    assert not full.truncated and short.truncated
    assert tok.decode(short.ids) == render(conv[:2])
    assert short.mask == full.mask[:len(short.ids)]
    with pytest.raises(Rejected) as e:
        encode_record(tok, {"messages": conv}, max_len=8)
    assert e.value.code == "too-long"


def test_labels_are_next_trained_tokens_and_minus_100_elsewhere():
    ids, mask = [1, 10, 11, 12, 13, 14], [0, 0, 1, 1, 0, 1]
    assert labels_for(ids, mask) == [IGNORE, 11, 12, IGNORE, 14, IGNORE]


def test_packing_resets_positions_and_matches_unpacked_logits(tok):
    convs = [[{"role": "user", "content": f"question {i}" + " more" * i},
              {"role": "assistant", "content": f"answer {i}"}] for i in range(5)]
    examples, rejected, _ = build_examples(tok, [_line(c) for c in convs], max_len=64)
    assert not rejected
    rows = pack(examples, 64, pad_id=tok.pad_id, seed=0)
    n_rows = len(rows["input_ids"])
    assert n_rows < len(examples)  # several conversations share a row
    assert all(len(r) == 64 for k in rows for r in rows[k])
    docs = []  # split each row where its positions restart
    for ids, pos in zip(rows["input_ids"], rows["position_ids"]):
        for i, p in enumerate(pos):
            if p == 0:
                docs.append([])
            docs[-1].append(ids[i])
    conversations = sorted(d for d in docs if d[0] == tok.bos_id)
    assert conversations == sorted(e.ids for e in examples)  # every conversation once, whole, in order
    assert all(set(d) == {tok.pad_id} for d in docs if d[0] != tok.bos_id)  # the rest is padding
    trained = sum(int(lab != IGNORE) for r in rows["labels"] for lab in r)
    assert trained == sum(sum(e.mask[1:]) for e in examples)
    # Each conversation inside a packed row sees only itself: its logits equal a forward on it alone.
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = InternLM2(cfg).eval()
    row_ids, row_pos = rows["input_ids"][0], rows["position_ids"][0]
    doc_starts = [i for i, p in enumerate(row_pos) if p == 0]
    second = slice(doc_starts[1], doc_starts[2] if len(doc_starts) > 2 else 64)
    with torch.no_grad():
        packed = model(torch.tensor([row_ids]), position_ids=torch.tensor([row_pos]))
        alone = model(torch.tensor([row_ids[second]]))
    torch.testing.assert_close(packed[0, second], alone[0], rtol=1e-4, atol=1e-4)
