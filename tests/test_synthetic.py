"""Synthetic generators later stages rely on: deterministic, checkable, in the documented formats."""

import json
import random

import pytest

from lm2cli import synthetic as S


def test_generators_are_deterministic():
    for fn in (S.zh_document, S.en_document):
        assert fn(random.Random(1)) == fn(random.Random(1))
        assert fn(random.Random(1)) != fn(random.Random(2))
    a = S.chat_examples(random.Random(3), 20)
    assert a == S.chat_examples(random.Random(3), 20)


@pytest.mark.parametrize("filler", ["grass", "zh", "en"])
def test_passkey_document_places_the_key_at_the_depth(filler):
    rng = random.Random(4)
    for depth in (0.0, 0.5, 1.0):
        d = S.passkey_document(rng, n_chars=3000, depth=depth, filler=filler)
        assert d["n_chars"] <= 3000 and d["n_chars"] > 2000
        line = f"The pass key is {d['key']}. Remember it."
        pos = d["prompt"].index(line) / len(d["prompt"])
        assert abs(pos - depth) < 0.2
        assert d["prompt"].endswith("The pass key is") and d["text"] == f"{d['prompt']} {d['answer']}."
    toks = S.passkey_document(rng, n_tokens=200, count_tokens=lambda t: len(t.split()))
    assert len(toks["prompt"].split()) <= 200
    with pytest.raises(ValueError):
        S.passkey_document(rng)


def test_chat_examples_have_checkable_answers_and_tool_calls():
    ex = S.chat_examples(random.Random(5), 300, tools_fraction=0.5)
    kinds = {e["task"] for e in ex}
    assert {"add", "copy", "reverse", "kv"} <= kinds and any(k.endswith("-tool") for k in kinds)
    for e in ex:
        msgs = e["messages"]
        assert msgs[-1]["role"] == "assistant" and S.check_answer(e, msgs[-1]["content"] + "<|im_end|>")
        q = msgs[1]["content"]
        if e["task"].startswith("add"):
            a, b = (int(x) for x in q[len("What is "):-1].split(" + "))
            assert e["answer"] == str(a + b)
        if e["task"].endswith("-tool"):
            call = msgs[2]["content"]
            assert call.startswith(S.ACTION_START + S.PLUGIN + "\n") and call.endswith(S.ACTION_END)
            body = json.loads(call[len(S.ACTION_START + S.PLUGIN + "\n"):-len(S.ACTION_END)])
            assert body["name"] == "calculator"
            assert msgs[3]["role"] == "environment" and json.loads(msgs[3]["content"])["result"] == int(e["answer"])
    text = S.render_chatml(ex[0]["messages"])
    assert text.startswith("<|im_start|>system\n") and text.count("<|im_end|>\n") == len(ex[0]["messages"])


def test_preference_pairs_follow_their_condition():
    pairs = S.preference_pairs(random.Random(6), 90)
    assert {p["condition"] for p in pairs} == {"brief", "detailed", "default"}
    for p in pairs:
        assert p["system"] == S.CONDITION_PROMPTS[p["condition"]]
        if p["condition"] == "brief":
            assert p["chosen"] == p["answer"] and p["answer"] in p["rejected"] and len(p["rejected"]) > len(p["chosen"])
        elif p["condition"] == "detailed":
            assert p["rejected"] == p["answer"] and p["chosen"].endswith(f"The answer is {p['answer']}.")
        else:
            assert p["answer"] in p["chosen"] and not p["rejected"].endswith(f" {p['answer']}.") \
                and p["rejected"] != p["answer"]
