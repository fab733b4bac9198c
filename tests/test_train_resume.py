"""Crash safety through the real command: `lm2 pretrain` killed with SIGKILL mid-training and rerun with
`--resume auto` ends bit-identical to an uninterrupted run; SIGTERM saves a checkpoint and exits 143."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_ws import TINY_MODEL, build_tokens, workspace_with_tokens
from safetensors.torch import load_file

from lm2cli.train.checkpoint import verify
from lm2cli.train.engine import clean_env

pytestmark = pytest.mark.slow

# Steps of a few tens of milliseconds, so a kill lands mid-run with room to spare.
STAGE = ["pretrain.stage1.seq_len=64", "pretrain.stage1.micro_batch_size=8", "pretrain.stage1.lr=3e-3",
         "pretrain.stage1.save_every=20", "pretrain.stage1.eval_every=50", "pretrain.stage1.eval_batches=1",
         "model.hidden_size=64", "model.intermediate_size=128"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return build_tokens(tmp_path_factory.mktemp("tok"))


def env() -> dict:
    return {**clean_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def pretrain_cmd(ws, max_steps: int, *extra: str) -> list[str]:
    sets = [x for s in TINY_MODEL + STAGE + [f"pretrain.stage1.max_steps={max_steps}"] for x in ("--set", s)]
    return [sys.executable, "-m", "lm2cli.cli", "pretrain", "--stage", "1", "--workdir", str(ws.root), *sets, *extra]


def metrics(stage: Path) -> list[dict]:
    path = stage / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_until(proc, cond, timeout=300.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended (status {proc.returncode}) before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(tokens, tmp_path):
    steps = 120
    ref = workspace_with_tokens(tokens, tmp_path / "ref")
    subprocess.run(pretrain_cmd(ref, steps), env=env(), check=True, capture_output=True)

    ws = workspace_with_tokens(tokens, tmp_path / "crash")
    stage = ws.stage_dir("pretrain-stage1")
    latest = stage / "checkpoints" / "latest"
    proc = subprocess.Popen(pretrain_cmd(ws, steps), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill once a checkpoint is whole and training has gone past it (that progress is lost).
        wait_until(proc, lambda: latest.exists() and metrics(stage) and metrics(stage)[-1]["step"] >= 25)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = metrics(stage)[-1]["step"]
    assert 25 <= killed_at < steps and not (stage / "final").exists()

    done = subprocess.run(pretrain_cmd(ws, steps, "--resume", "auto"), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    manifest = json.loads((stage / "manifest.json").read_text())
    assert Path(manifest["resumed_from"]).name.startswith("step-")

    ref_stage = ref.stage_dir("pretrain-stage1")
    assert [r["step"] for r in metrics(stage)] == list(range(0, steps + 1))  # step 0: the starting eval
    assert metrics(stage)[0]["eval_loss"] == metrics(ref_stage)[0]["eval_loss"]
    assert [r["loss"] for r in metrics(stage)[1:]] == [r["loss"] for r in metrics(ref_stage)[1:]]
    ours, theirs = load_file(stage / "final" / "model.safetensors"), load_file(ref_stage / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_sigterm_saves_and_exits_143(tokens, tmp_path):
    ws = workspace_with_tokens(tokens, tmp_path / "term")
    stage = ws.stage_dir("pretrain-stage1")
    proc = subprocess.Popen(pretrain_cmd(ws, 100_000), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_until(proc, lambda: len(metrics(stage)) >= 3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "rerun the same command to resume" in err
    last = metrics(stage)[-1]["step"]
    name = f"step-{last:08d}"
    assert (stage / "checkpoints" / "latest").read_text().strip() == name
    assert verify(stage / "checkpoints" / name) is None
