"""`lm2 sft` end to end on a tiny model: the artefact, rejected records, resume, the batch iterator."""

import json
import math
import random
from collections import Counter

import pytest
import torch

from lm2cli import synthetic
from lm2cli.config import ModelConfig, TokenizerConfig, load_recipe
from lm2cli.convert import load_model, save_model
from lm2cli.errors import InputError
from lm2cli.layout import Workspace, read_manifest, write_manifest
from lm2cli.model import InternLM2
from lm2cli.sft import RowBatches, run_sft
from lm2cli.tokenizer import Tokenizer, build_vocab

SMALL = ["sft.max_len=256", "sft.train.micro_batch_size=4", "sft.train.lr=3e-3", "sft.train.save_every=4",
         "sft.train.eval_every=4", "sft.train.eval_batches=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ws(workdir):
    """A workspace whose run has a finished pretrain-stage1 (random weights, a built tokenizer)."""
    ws = Workspace.at(workdir)
    tok = build_vocab(TokenizerConfig(n_en=600, n_zh=0, n_spare=16), Counter())[0]
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    stage = ws.stage_dir("pretrain-stage1")
    save_model(InternLM2(cfg), stage / "final", tokenizer=tok)
    write_manifest(stage / "final", "checkpoint")
    write_manifest(stage, "pretrain-stage1")
    return ws


def _data(tmp_path, n=40, extra=()):
    rows = synthetic.chat_examples(random.Random(0), n, tools_fraction=0.2)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra))
    return path


def test_tiny_sft_run_writes_the_artefact(ws, tmp_path):
    bad = ['{"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}',
           '{"messages": [{"role": "user", "content": "no answer"}]}', "{oops"]
    data = _data(tmp_path, extra=bad)
    recipe = load_recipe("tiny", SMALL)
    stage = run_sft(ws, recipe, data=data, eval_data=data)
    manifest = read_manifest(stage, kinds=("sft",))
    d = manifest["stats"]["data"]
    assert (d["records"], d["kept"], d["rejected"]) == (43, 40, {"unknown-role": 1, "no-assistant-turn": 1,
                                                                 "invalid-json": 1})
    epochs = recipe.sft.train.epochs  # steps = ceil(epochs * rows / global batch of 4)
    assert d["rows"] >= 1 and manifest["stats"]["steps"] == math.ceil(epochs * d["rows"] / 4)
    rejected = [json.loads(line) for line in (stage / "rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejected] == ["unknown-role", "no-assistant-turn", "invalid-json"]
    assert [r["line"] for r in rejected] == [41, 42, 43]
    final = stage / "final"
    read_manifest(final, kinds=("checkpoint",))
    tok = Tokenizer.load(final)
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] == [tok.eos_id, tok.im_end_id]
    model = load_model(final)
    assert model.config.max_position_embeddings == 256  # widened to the SFT length
    src = load_model(ws.stage_dir("pretrain-stage1") / "final")
    assert not torch.equal(model.output.weight, src.output.weight)  # it trained
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    history = [r for r in rows if "loss" in r]  # step 0 holds only the starting eval loss
    assert history[-1]["loss"] < history[0]["loss"] and "eval_loss" in history[-1]
    assert ws.latest_model() == final


def test_sft_refuses_missing_inputs_by_name(workdir, tmp_path):
    ws = Workspace.at(workdir)
    with pytest.raises(InputError, match="no finished pretraining stage"):
        run_sft(ws, load_recipe("tiny", SMALL))


def test_all_rejected_data_is_an_input_error_with_reasons(ws, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(InputError, match="no-assistant-turn 1"):
        run_sft(ws, load_recipe("tiny", SMALL), data=path)
    assert (ws.stage_dir("sft") / "rejected.jsonl").read_text().count("\n") == 1


def test_row_batches_shard_ranks_reshuffle_epochs_and_resume_exactly():
    rows = {"input_ids": [[i, i] for i in range(10)], "labels": [[i, i] for i in range(10)],
            "position_ids": [[0, 1]] * 10}
    first = [b["input_ids"][:, 0].tolist() for b, _ in zip(RowBatches(rows, 3, seed=1), range(7))]
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation per epoch
    r0, r1 = RowBatches(rows, 3, rank=0, world=2, seed=1), RowBatches(rows, 3, rank=1, world=2, seed=1)
    assert [next(r0)["input_ids"][:, 0].tolist() + next(r1)["input_ids"][:, 0].tolist() for _ in range(2)] == [
        flat[0:6], flat[6:12]]
    it = RowBatches(rows, 3, seed=1)
    for _ in range(4):
        next(it)
    again = RowBatches(rows, 3, seed=1)
    again.load_state_dict(json.loads(json.dumps(it.state_dict())))
    assert next(again)["input_ids"][:, 0].tolist() == first[4]
    with pytest.raises(InputError, match="same data"):
        RowBatches({k: v[:9] for k, v in rows.items()}, 3, seed=1).load_state_dict(it.state_dict())
