"""The generation engine: greedy KV-cache decoding against full recomputation, batching, stops, sampling."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from lm2cli.chat import encode_prompt
from lm2cli.config import ModelConfig, TokenizerConfig
from lm2cli.convert import save_model
from lm2cli.errors import InputError
from lm2cli.generate import default_stop_ids, generate, score_logprobs
from lm2cli.layout import write_manifest
from lm2cli.model import InternLM2
from lm2cli.tokenizer import build_vocab

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = InternLM2(CFG).eval()
    # A larger init spreads the logits, so argmax decisions are far from ties and runs vary by prompt.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(6.0)
    return m


def _prompts(n, seed=1, lo=2, hi=12):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, CFG.vocab_size - 6, (k,), generator=g).tolist() for k in lens]


def _argmax_by_recomputation(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_kv_cache_equals_argmax_by_full_recomputation(model):
    prompts = _prompts(3)
    out = generate(model, prompts, 12, stop_ids=(), batch_size=1)
    assert out == [_argmax_by_recomputation(model, p, 12) for p in prompts]
    assert len({tuple(o) for o in out}) > 1  # the prompts matter: not a constant output


def test_left_padded_batches_equal_one_by_one(model):
    prompts = _prompts(7, seed=2)
    assert len({len(p) for p in prompts}) > 2
    one = generate(model, prompts, 10, stop_ids=(), batch_size=1)
    assert generate(model, prompts, 10, stop_ids=(), batch_size=4) == one
    assert generate(model, prompts, 10, stop_ids=(), batch_size=16) == one


def test_stop_ids_end_rows_and_are_excluded_unless_asked(model):
    prompts = _prompts(5, seed=3)
    free = generate(model, prompts, 10, stop_ids=())
    # Stop each row on a token it actually emits: the output must end just before its first occurrence.
    stop = free[0][4]
    cut = generate(model, prompts, 10, stop_ids=(stop,), batch_size=2)
    with_stop = generate(model, prompts, 10, stop_ids=(stop,), batch_size=2, include_stop=True)
    for f, c, w in zip(free, cut, with_stop):
        k = f.index(stop) if stop in f else len(f)
        assert c == f[:k]
        assert w == f[:k + 1]
    assert len(cut[0]) <= 4


def test_default_stops_are_eos_and_im_end(model):
    assert default_stop_ids(model) == (2, CFG.vocab_size - 2)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(model):
    prompts = _prompts(4, seed=4)
    kw = dict(temperature=1.0, top_p=0.9, top_k=20, stop_ids=(), batch_size=2)
    a = generate(model, prompts, 16, seed=7, **kw)
    assert a == generate(model, prompts, 16, seed=7, **kw)
    assert a != generate(model, prompts, 16, seed=8, **kw)


def test_top_k_one_is_greedy_and_tiny_top_p_is_greedy(model):
    prompts = _prompts(3, seed=5)
    greedy = generate(model, prompts, 8, stop_ids=())
    assert generate(model, prompts, 8, temperature=1.3, top_k=1, seed=0, stop_ids=()) == greedy
    assert generate(model, prompts, 8, temperature=1.3, top_p=1e-6, seed=0, stop_ids=()) == greedy


def test_results_keep_input_order_and_handle_zero_tokens(model):
    prompts = _prompts(5, seed=6)
    out = generate(model, prompts, 6, stop_ids=(), batch_size=2)
    assert out[3] == generate(model, [prompts[3]], 6, stop_ids=())[0]
    assert generate(model, prompts, 0) == [[] for _ in prompts]


def test_bad_arguments_are_input_errors(model):
    with pytest.raises(InputError, match="empty"):
        generate(model, [[]], 4)
    with pytest.raises(InputError, match="top_p"):
        generate(model, [[1]], 4, top_p=0.0)


def test_score_logprobs_match_log_softmax_with_left_padding(model):
    prompts = _prompts(2, seed=7, lo=6, hi=10)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    lp = score_logprobs(model, ids, mask, chunk=3)
    with torch.no_grad():
        for r, p in enumerate(prompts):
            ref = model(torch.tensor([p]))[0].log_softmax(-1)
            want = ref[:-1].gather(-1, torch.tensor(p[1:])[:, None])[:, 0]
            torch.testing.assert_close(lp[r, width - len(p):], want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# `lm2 generate` and `lm2 chat` on a saved checkpoint



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = build_vocab(TokenizerConfig(n_en=600, n_zh=0, n_spare=16), Counter())[0]
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(1)
    m = InternLM2(cfg).eval()
    path = save_model(m, tmp_path_factory.mktemp("ckpt") / "final", tokenizer=tok)
    write_manifest(path, "checkpoint")
    return path, m, tok


def _lm2(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "lm2cli.cli", *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)


def test_lm2_generate_file_keeps_fields_and_matches_the_engine(checkpoint, tmp_path):
    path, m, tok = checkpoint
    rows = [{"id": "a", "messages": [{"role": "user", "content": "Hello there"}]},
            {"id": "b", "prompt": "Once upon a time"},
            {"id": "c", "messages": [{"role": "wizard", "content": "x"}]},
            {"id": "d", "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "What is <|im_end|>?"}]}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    p = _lm2("generate", str(path), "-i", str(src), "-o", str(dst), "--max-new-tokens", "7", "--batch-size", "2")
    assert p.returncode == 0, p.stderr
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o.get("id") for o in out] == ["a", "b", "c", "d", None]
    assert out[2]["error"].startswith("unknown-role") and "completion" not in out[2]
    assert out[4]["error"].startswith("invalid-json")
    prompts = [encode_prompt(tok, rows[0]["messages"]), tok.encode("Once upon a time", bos=True),
               encode_prompt(tok, rows[3]["messages"])]
    want = generate(m, prompts, 7, stop_ids=tok.stop_ids)
    for o, w in zip([out[0], out[1], out[3]], want):
        assert o["completion"] == tok.decode(w)
        assert o["finish_reason"] == ("length" if len(w) == 7 else "stop")
        assert {k: v for k, v in o.items() if k not in ("completion", "finish_reason")} == rows[out.index(o)]


def test_lm2_generate_reads_a_stage_folder_as_its_final_and_refuses_bad_input_in_one_line(checkpoint, tmp_path):
    path, _, _ = checkpoint
    stage = path.parent
    write_manifest(stage, "sft")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello there"}) + "\n")
    outs = []
    for model_dir, name in ((stage, "a.jsonl"), (path, "b.jsonl")):
        p = _lm2("generate", str(model_dir), "-i", str(prompts), "-o", str(tmp_path / name), "--max-new-tokens", "5")
        assert p.returncode == 0, p.stderr
        outs.append([json.loads(line)["completion"] for line in (tmp_path / name).read_text().splitlines()])
    assert outs[0] == outs[1]  # a stage folder means its final/, as for every other command
    p = _lm2("generate", str(stage), "-i", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "y.jsonl"))
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "x.jsonl does not exist" in p.stderr
    p = _lm2("generate", "-w", str(tmp_path / "empty"), "-i", "x.jsonl", "-o", "y.jsonl")
    assert p.returncode == 2 and "no CHECKPOINT given" in p.stderr


def test_lm2_chat_through_a_pipe(checkpoint):
    path, m, tok = checkpoint
    script = "Hello\n\n/system Answer briefly.\nAnd now?\n/reset\nHello\n/bogus\n/exit\nnever read\n"
    p = _lm2("chat", str(path), "--temperature", "0", "--max-new-tokens", "6", stdin=script)
    assert p.returncode == 0, p.stderr
    # The same conversation by hand: ids of each turn, the model's own reply tokens kept verbatim.
    closing = [tok.im_end_id] + tok.encode("\n")
    first = encode_prompt(tok, [{"role": "user", "content": "Hello"}])
    r1 = generate(m, [first], 6, stop_ids=tok.stop_ids)[0]
    system = encode_prompt(tok, [{"role": "system", "content": "Answer briefly."}])[:-len(tok.encode("assistant\n")) - 1]
    second = system + first[1:] + r1 + closing + encode_prompt(tok, [{"role": "user", "content": "And now?"}])[1:]
    r2 = generate(m, [second], 6, stop_ids=tok.stop_ids)[0]
    r3 = generate(m, [system + first[1:]], 6, stop_ids=tok.stop_ids)[0]  # /reset forgot the turns, not the system
    assert p.stdout == "".join(tok.decode(r) + "\n" for r in (r1, r2, r3))
    assert r3 != r1
    assert "unknown command /bogus" in p.stderr
