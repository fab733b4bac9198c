"""The training loop in-process on a tiny InternLM2: stage folder layout, checkpoints (DONE, latest,
keep-last, async snapshot), exact resume, skipping a truncated checkpoint, SIGTERM save-and-stop."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading

import pytest
import torch
from _train_ws import build_tokens
from safetensors.torch import load_file

from lm2cli.config import ModelConfig, TrainConfig
from lm2cli.convert import load_model
from lm2cli.errors import InputError
from lm2cli.layout import read_manifest
from lm2cli.model import InternLM2
from lm2cli.tokens import TokenStore
from lm2cli.train import checkpoint as ckpt_mod
from lm2cli.train.checkpoint import AsyncCheckpointer, find_resume, list_steps, verify
from lm2cli.train.data import PackedStream
from lm2cli.train.engine import Engine, init_distributed
from lm2cli.train.loop import Stopped, fit, lm_loss, read_metrics
from lm2cli.train.schedule import schedule


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return TokenStore(build_tokens(tmp_path_factory.mktemp("tok")))


pytestmark = pytest.mark.usefixtures("one_thread")


CFG = TrainConfig(seq_len=32, micro_batch_size=2, grad_accum=2, max_steps=6, lr=3e-3, warmup_ratio=0.34,
                  save_every=2, keep_last=2, eval_every=3, eval_batches=2, seed=0)


def tiny_model(vocab: int) -> InternLM2:
    torch.manual_seed(0)
    return InternLM2(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def run(store, stage_dir, cfg=CFG, **kw):
    tok = store.tokenizer()
    batches = PackedStream.from_store(store, "train", cfg)
    evals = lambda: [b for _, b in zip(range(cfg.eval_batches), PackedStream.from_store(store, "val", cfg))]  # noqa: E731
    return fit(tiny_model(tok.vocab_size), cfg, batches, stage_dir, kind="pretrain-stage1", eval_data=evals,
               tokenizer=tok, inputs=[store.path], **kw)


def losses(stage_dir):
    return [r["loss"] for r in read_metrics(stage_dir / "metrics.jsonl") if "loss" in r]


def test_fit_writes_the_stage_folder_and_whole_checkpoints(store, tmp_path):
    stage = tmp_path / "pretrain-stage1"
    result = run(store, stage)
    assert result.steps == 6 and result.tokens == 6 * 2 * 32 * 2
    start, *rows = read_metrics(stage / "metrics.jsonl")
    assert set(start) == {"step", "eval_loss"} and start["step"] == 0  # the stage's starting point
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed"} <= set(rows[0])
    assert [("eval_loss" in r) for r in rows] == [False, False, True, False, False, True]
    assert rows[0]["lr"] == pytest.approx(3e-3 * 0.5) and rows[-1]["lr"] == pytest.approx(3e-4)  # 2 warmup steps
    ckpts = stage / "checkpoints"
    assert [s for s, _ in list_steps(ckpts)] == [4, 6]  # keep_last 2
    assert (ckpts / "latest").read_text().strip() == "step-00000006"
    last = ckpts / "step-00000006"
    assert verify(last) is None
    for name in ("model.safetensors", "config.json", "dataloader.json", "train_state.json", "config.resolved.yaml",
                 "optim/mp_rank_00_model_states.pt", "optim/rng-rank00000.pt", "manifest.json", "DONE"):
        assert (last / name).is_file(), name
    assert json.loads((last / "train_state.json").read_text())["step"] == 6
    assert read_manifest(last)["kind"] == "checkpoint"
    # final/ holds the trained weights in HF form, as does the last checkpoint.
    final = load_model(stage / "final")
    assert read_manifest(stage / "final", kinds=("checkpoint",))["stage"] == "pretrain-stage1"
    for k, v in load_file(last / "model.safetensors").items():
        assert torch.equal(v, final.state_dict()[k])
    m = read_manifest(stage, kinds=("pretrain-stage1",))
    assert m["stats"]["steps"] == 6 and m["stats"]["final_loss"] == rows[-1]["loss"]
    assert (stage / "loss.png").stat().st_size > 1000 and (stage / "config.yaml").exists()


def test_resume_skips_a_truncated_checkpoint_and_matches_the_uninterrupted_run(store, tmp_path, monkeypatch):
    a, b = tmp_path / "a" / "pretrain-stage1", tmp_path / "b" / "pretrain-stage1"
    run(store, a)
    run(store, b)
    weights_a = load_file(a / "final" / "model.safetensors")
    # Damage b's newest checkpoint and forget what happened after step 4.
    newest = b / "checkpoints" / "step-00000006"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    warnings = []
    monkeypatch.setattr(ckpt_mod, "warn", warnings.append)
    assert find_resume(b / "checkpoints") == b / "checkpoints" / "step-00000004"
    assert "step-00000006" in warnings[0] and "truncated" in warnings[0]
    assert find_resume(b) == b / "checkpoints" / "step-00000004"  # the stage folder works too
    result = run(store, b, resume="auto")
    assert result.resumed_from == b / "checkpoints" / "step-00000004"
    assert losses(b) == losses(a)
    for k, v in load_file(b / "final" / "model.safetensors").items():
        assert torch.equal(v, weights_a[k]), k


def test_a_resumed_run_follows_its_own_schedule(store, tmp_path):
    stage = tmp_path / "pretrain-stage1"
    run(store, stage)  # 6 steps
    longer = dataclasses.replace(CFG, max_steps=10)
    run(store, stage, cfg=longer)  # resumes at step 6 and goes on to 10
    rows = [r for r in read_metrics(stage / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 11))
    f = schedule(10, longer.warmup_ratio, longer.min_lr_ratio)
    assert [r["lr"] for r in rows[6:]] == pytest.approx([longer.lr * f(s) for s in range(6, 10)])


def test_a_save_snapshots_and_returns_while_the_writer_works(store, tmp_path, monkeypatch):
    dist = init_distributed()
    model = tiny_model(store.tokenizer().vocab_size)
    engine = Engine(model, CFG, CFG.max_steps, dist)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    release = threading.Event()
    monkeypatch.setattr(AsyncCheckpointer, "before_write", lambda: release.wait(60))
    saver = AsyncCheckpointer(tmp_path / "checkpoints", engine, dist, keep_last=2, model_config=model.config)
    folder = saver.save(1, {"sample": 0}, {"step": 1, "tokens": 0})
    assert saver.in_flight and not (folder / "DONE").exists()  # save() returned; nothing written yet
    with torch.no_grad():  # training goes on and changes the weights under the writer
        for p in model.parameters():
            p.add_(1.0)
    release.set()
    saver.wait()
    assert verify(folder) is None
    for k, v in load_file(folder / "model.safetensors").items():
        assert torch.equal(v, before[k])  # the snapshot, not the live weights


def test_training_continues_while_a_checkpoint_is_written(store, tmp_path, monkeypatch):
    next_step_started = threading.Event()
    seen = {}

    def hold_writer():
        seen["released"] = next_step_started.wait(60)

    calls = []

    def loss_fn(model, batch):
        calls.append(torch.is_grad_enabled())  # False for evaluation batches
        if sum(calls) == CFG.save_every * CFG.grad_accum + 1 and calls[-1]:  # first micro-batch after the first save
            seen["writer_alive"] = any(t.name == "lm2-save-2" and t.is_alive() for t in threading.enumerate())
            next_step_started.set()
        return lm_loss(model, batch)

    monkeypatch.setattr(AsyncCheckpointer, "before_write", hold_writer)
    run(store, tmp_path / "pretrain-stage1", loss_fn=loss_fn)
    assert seen == {"writer_alive": True, "released": True}


def test_sigterm_saves_a_checkpoint_and_stops(store, tmp_path):
    stage = tmp_path / "pretrain-stage1"
    cfg = dataclasses.replace(CFG, max_steps=50, save_every=100)
    calls = []

    def loss_fn(model, batch):
        calls.append(torch.is_grad_enabled())  # False for evaluation batches
        if sum(calls) == 3 * cfg.grad_accum and calls[-1]:  # during step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return lm_loss(model, batch)

    with pytest.raises(Stopped, match="step 3/50") as e:
        run(store, stage, cfg=cfg, loss_fn=loss_fn)
    assert e.value.exit_code == 143
    assert (stage / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    assert verify(stage / "checkpoints" / "step-00000003") is None
    assert not (stage / "final").exists() and not (stage / "manifest.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_a_checkpoint_resumes_at_its_own_zero_stage_only(store, tmp_path):
    stage = tmp_path / "pretrain-stage1"
    run(store, stage)  # ZeRO-0
    with pytest.raises(InputError, match="holds ZeRO-0 state; this run is ZeRO-1"):
        run(store, stage, cfg=dataclasses.replace(CFG, max_steps=8, zero_stage=1))
