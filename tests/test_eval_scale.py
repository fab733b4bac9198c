"""Evaluation at scale: chat-template needle prompts, forced choice from one shared prefix, batching by
length, the evaluation dtype, and `eval ppl` / `eval needle` sharded over 2 ranks equal to 1 rank."""

import json

import numpy as np
import pytest
import torch
from _eval_tiny import plain_tokenizer, spread_model

from lm2cli import chat
from lm2cli.config import load_recipe
from lm2cli.evaluate import needle as N
from lm2cli.evaluate.common import is_chat_checkpoint, load_model_fn, resolve_dtype
from lm2cli.evaluate.parallel import World, length_batches, map_batches, my_batches
from lm2cli.evaluate.ppl import batch_nll, token_nll
from lm2cli.layout import Workspace, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return plain_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return spread_model(tok.vocab_size, max_len=256)


def _save(model, tok, path, stage=None):
    from lm2cli.convert import save_model

    save_model(model, path, tok)
    write_manifest(path, "checkpoint", stats={}, **({"stage": stage} if stage else {}))
    return path


# ---------------------------------------------------------------------------------------------------
# Chat template


def test_chat_checkpoint_needle_prompt_is_the_chat_templates_rendering(tok, model, tmp_path):
    sft = _save(model, tok, tmp_path / "runs" / "default" / "sft" / "final", stage="sft")
    base = _save(model, tok, tmp_path / "base", stage="pretrain-stage1")
    cfg = load_recipe("tiny").eval.needle
    assert N.resolve_template(cfg, sft) == "chat" and N.resolve_template(cfg, base) == "raw"
    assert N.resolve_template(load_recipe("tiny", ["eval.needle.template=raw"]).eval.needle, sft) == "raw"
    assert N.resolve_template(load_recipe("tiny", ["eval.needle.template=chat"]).eval.needle, base) == "chat"

    task, hay = N.TASKS["passkey"], N.filler_haystack("passkey")
    raw = N.build_sample(task, hay, tok, tok, 200, 40, 0, buffer=8, bos_id=tok.bos_id)
    s = N.build_sample(task, hay, tok, tok, 200, 40, 0, buffer=8, bos_id=tok.bos_id, template="chat")
    start, end = "<s><|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
    decoded = tok.decode(s.ids)
    assert decoded.startswith(start) and decoded.endswith(end)
    text = decoded[len(start):-len(end)]  # the user turn: the same kind of needle prompt as the raw one
    assert text.startswith(task.header) and text.endswith(task.question)
    assert task.needle.format(key=s.key) in text
    assert decoded == chat.render(N.chat_messages(text), add_generation_prompt=True)
    assert s.ids == chat.encode_prompt(tok, N.chat_messages(text))  # SFT's tokenization of it
    assert len(s.ids) <= 200 - 8 and s.counted == len(s.ids)  # the template's tokens count toward the length
    assert s.key == raw.key and s.choices == [c.lstrip() for c in raw.choices]  # the answer opens the reply


def test_hf_folder_with_a_chat_template_is_a_chat_checkpoint(tok, model, tmp_path):
    folder = _save(model, tok, tmp_path / "hf", stage="pretrain-stage1")
    assert not is_chat_checkpoint(folder)  # lm2's own folder: its stage decides
    (folder / "manifest.json").unlink()  # a foreign HF folder: its tokenizer config decides
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config.get("chat_template") and is_chat_checkpoint(folder)
    config.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert not is_chat_checkpoint(folder)
    sft = _save(model, tok, tmp_path / "runs" / "default" / "sft" / "final", stage="sft")
    write_manifest(tmp_path / "export", "checkpoint", inputs=[sft])  # an lm2 export records its source
    (tmp_path / "export" / "config.json").write_text("{}")
    assert is_chat_checkpoint(tmp_path / "export")


def test_lm2_needle_on_a_chat_checkpoint_scores_chat_prompts(tok, model, tmp_path):
    from lm2cli.evaluate.needle import run_needle

    ws = Workspace.at(tmp_path / "ws")
    sft = _save(model, tok, ws.root / "runs" / "default" / "sft" / "final", stage="sft")
    recipe = load_recipe("tiny", ["eval.needle.depths=[0, 100]", "eval.needle.max_new_tokens=3"])
    out = run_needle(ws, recipe, checkpoint=sft, lengths=[128], repeats=1, name="chat")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["template"] for r in rows} == {"chat"} and json.loads((out / "summary.json").read_text())["template"] == "chat"
    assert all(r["prompt_tokens"] <= 128 for r in rows)


# ---------------------------------------------------------------------------------------------------
# Forced choice from one shared prefix, batching by length


def test_shared_prefix_forced_choice_scores_equal_the_five_pass_version(tok, model):
    task, hay = N.TASKS["passkey"], N.filler_haystack("passkey")
    samples = [N.build_sample(task, hay, tok, tok, n, d, 0, buffer=8, bos_id=tok.bos_id)
               for n, d in ((120, 0), (170, 50), (230, 100))]  # different lengths: a left-padded prefix batch
    conts = [[tok.encode(c) for c in s.choices] for s in samples]
    conts[1][2] = conts[1][2] + tok.encode(" and more words")  # continuations of unequal lengths too
    shared = N.shared_prefix_logprobs(model, [s.ids for s in samples], conts, pad_id=tok.pad_id)
    for s, cs, got in zip(samples, conts, shared):
        five = N.choice_logprobs(model, s.ids, cs, pad_id=tok.pad_id)  # one full forward per candidate
        np.testing.assert_allclose(got, five, rtol=1e-5, atol=2e-5)
    one = N.shared_prefix_logprobs(model, [samples[0].ids], [conts[0]], pad_id=tok.pad_id)[0]
    np.testing.assert_allclose(one, shared[0], rtol=1e-5, atol=2e-5)  # alone or in a padded batch


def test_needle_batches_by_length_give_the_per_item_results_of_unbatched_scoring(tok, model):
    task, hay = N.TASKS["passkey"], N.filler_haystack("passkey")
    samples = [N.build_sample(task, hay, tok, tok, n, d, r, buffer=8, bos_id=tok.bos_id)
               for n in (120, 180) for d in (0, 60) for r in range(2)]
    batched = map_batches([len(s.ids) for s in samples], 3, World(),
                          lambda idx: dict(zip(idx, N.score_batch(model, tok, [samples[i] for i in idx],
                                                                  "passkey", 4))))
    single = [N.score_batch(model, tok, [s], "passkey", 4)[0] for s in samples]
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
    assert [(r["length"], r["depth"], r["repeat"]) for r in batched] == [(s.length, s.depth, s.repeat) for s in samples]
    np.testing.assert_allclose([r["choice_logprobs"] for r in batched], [r["choice_logprobs"] for r in single],
                               atol=2e-3)  # records round to 3 decimals


def test_ppl_batches_by_length_give_the_per_item_results_of_unbatched_scoring(model):
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 40, 17, 40, 1, 23, 9)]
    batched = token_nll(model, seqs, batch_size=3)
    single = [batch_nll(model, [s])[0] for s in seqs]
    for b, s, seq in zip(batched, single, seqs):
        assert b.shape == (len(seq) - 1,)
        np.testing.assert_allclose(b, s, rtol=1e-5, atol=1e-5)


def test_length_batches_pad_minimally_and_ranks_share_them():
    lengths = [5, 40, 17, 40, 1, 23, 9]
    batches = length_batches(lengths, 3)
    assert batches == [[1, 3, 5], [2, 6, 0], [4]]  # longest first, ties in input order
    shares = [my_batches(batches, World(r, 2)) for r in range(2)]
    assert shares == [[[1, 3, 5], [4]], [[2, 6, 0]]]


# ---------------------------------------------------------------------------------------------------
# dtype


def test_eval_dtype_is_fp32_on_cpu_unless_asked_and_bf16_loads_in_bf16(tok, model, tmp_path, monkeypatch):
    ck = _save(model, tok, tmp_path / "ck")
    assert resolve_dtype("auto", ck, "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", ck, "cuda") == torch.bfloat16  # an fp32 save evaluates in bf16 on a GPU
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    assert resolve_dtype("auto", ck, "cuda") == torch.float16  # a half-precision save keeps its dtype
    (ck / "config.json").write_text(json.dumps(config))
    assert resolve_dtype("bf16", ck, "cpu") == torch.bfloat16
    assert load_model_fn()(ck, dtype=resolve_dtype("bf16", ck, "cpu")).output.weight.dtype == torch.bfloat16
    with pytest.raises(Exception, match="eval.dtype"):
        load_recipe("tiny", ["eval.dtype=int8"])


def test_eval_ppl_in_bf16_is_close_to_fp32(tok, model, tmp_path):
    from lm2cli.evaluate.ppl import run_ppl

    ws = Workspace.at(tmp_path / "ws")
    ck = _save(model, tok, tmp_path / "ck")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"The grass is green number {i}. " * 6}) + "\n" for i in range(6)))
    res = {}
    for dt in ("fp32", "bf16"):
        out = run_ppl(ws, load_recipe("tiny", [f"eval.dtype={dt}"]), ck, data=[data], name=f"ppl-{dt}", show=False)
        res[dt] = json.loads((out / "results.json").read_text())
    assert res["fp32"]["dtype"] == "float32" and res["bf16"]["dtype"] == "bfloat16"
    assert res["bf16"]["all"]["loss"] == pytest.approx(res["fp32"]["all"]["loss"], rel=0.05)


# ---------------------------------------------------------------------------------------------------
# Sharded over ranks


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eval_ppl_and_needle_on_2_ranks_equal_1_rank(tok, model, tmp_path):
    from lm2cli.evaluate.needle import run_needle
    from lm2cli.evaluate.ppl import run_ppl

    ws = Workspace.at(tmp_path / "ws")
    ck = _save(model, tok, tmp_path / "ck")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": (f"Pass key {i}. ") * (3 + 7 * i), "lang": "en"}) + "\n"
                            for i in range(9)))
    recipe = load_recipe("tiny", ["eval.batch_size=2", "eval.max_len=64", "eval.needle.depths=[0, 50, 100]",
                                  "eval.needle.max_new_tokens=4"])
    ppl = {n: json.loads((run_ppl(ws, recipe, ck, data=[data], name=f"ppl{n}", show=False, nproc=n)
                          / "results.json").read_text()) for n in (1, 2)}
    assert ppl[2]["ranks"] == 2 and ppl[1]["ranks"] == 1
    for key in ("all", "lang", "split"):
        assert ppl[2][key] == ppl[1][key]  # the same batches, so the same floats

    needle = {}
    for n in (1, 2):
        out = run_needle(ws, recipe, checkpoint=ck, lengths=[128, 192], repeats=2, name=f"needle{n}", nproc=n)
        needle[n] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert json.loads((out / "summary.json").read_text())["ranks"] == n
    assert needle[2] == needle[1]


def test_opencompass_nproc_splits_inference_among_workers_and_scores_once():
    from lm2cli.evaluate.opencompass_runner import build_config

    one, two = build_config({}, [], 1), build_config({}, [], 2)
    assert one["infer"]["partitioner"]["type"].endswith("NaivePartitioner") and one["infer"]["runner"]["debug"]
    assert two["infer"]["partitioner"]["type"].endswith("NumWorkerPartitioner")
    assert two["infer"]["partitioner"]["num_worker"] == 2 == two["infer"]["runner"]["max_num_workers"]
    assert not two["infer"]["runner"]["debug"]  # worker processes, one GPU each on CUDA
    assert two["eval"] == one["eval"]  # scoring the gathered predictions runs once
