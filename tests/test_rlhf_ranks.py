"""RLHF on several ranks through the real command: `lm2 rlhf reward` and `lm2 rlhf ppo` on 2 CPU ranks
under ZeRO-3 log the same losses, rewards and grad norms as one rank, and a run killed with SIGKILL
resumes (`--resume auto`) to the same end as an uninterrupted one.

One rank and two train on the same data: the 1-rank reward run accumulates 2 batches per step where
each of 2 ranks takes 1, and the 1-rank PPO run scores and updates its 4 responses in one micro-batch
where 2 ranks take 2 each in micro-batches of 1 (losses are token-normalised over the whole minibatch,
rollouts seeded per generation micro-batch, so neither the rank count nor the micro-batch size shows).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _rlhf import arithmetic_pairs, sft_workspace

from lm2cli.train.checkpoint import verify
from lm2cli.train.engine import clean_env

pytestmark = pytest.mark.slow

REWARD = ["rlhf.reward.train.lr=1e-3", "rlhf.reward.tokens_per_batch=512", "rlhf.reward.train.seq_len=128",
          "rlhf.reward.held_out_fraction=0.2", "rlhf.reward.train.sharding=full", "rlhf.reward.train.save_every=1"]
PPO = ["rlhf.ppo.iterations=4", "rlhf.ppo.critic_warmup=1", "rlhf.ppo.prompts_per_iteration=4",
       "rlhf.ppo.max_new_tokens=8", "rlhf.ppo.save_every=1", "rlhf.ppo.minibatches=1", "rlhf.ppo.generate_batch_size=2",
       "rlhf.ppo.sharding=full", "rlhf.ppo.actor_lr=1e-3", "rlhf.ppo.critic_lr=1e-3"]


def env() -> dict:
    return {**clean_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def lm2(ws, *args, sets=(), nproc=1, run="default") -> list[str]:
    flags = [x for s in sets for x in ("--set", s)]
    return [sys.executable, "-m", "lm2cli.cli", "rlhf", *map(str, args), "--workdir", str(ws.root), "--run", run,
            "--recipe", "tiny", *flags, *(["--nproc", str(nproc)] if nproc > 1 else [])]


def check(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def rows(stage: Path, key: str) -> list[dict]:
    path = stage / "metrics.jsonl"
    return [r for r in (json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")) if key in r]


def kill_after(cmd: list[str], done: list[Path], timeout: float = 600.0) -> None:
    """Start `cmd` (all its ranks in one process group), SIGKILL the group once every `done` checkpoint is
    whole; the run must still be going then."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not all(verify(p) is None for p in done):
            assert proc.poll() is None, f"run ended (status {proc.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlhf-ranks")
    ws = sft_workspace(root / "ws")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arithmetic_pairs(40)))
    return ws


def assert_same(one: list[dict], two: list[dict], keys: tuple, rel: float = 1e-4) -> None:
    assert [r.get("step", r.get("iteration")) for r in one] == [r.get("step", r.get("iteration")) for r in two]
    for a, b in zip(one, two):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-6), (k, a, b)


@pytest.mark.timeout(1500)
def test_reward_on_two_zero3_ranks_matches_one_and_resumes_after_sigkill(ws):
    pairs = ws.root.parent / "pairs.jsonl"
    sft = ws.stage_dir("sft")
    check(lm2(ws, "reward", "--data", pairs, "--from", sft, sets=REWARD + ["rlhf.reward.train.grad_accum=2"], run="one"))
    two = lm2(ws, "reward", "--data", pairs, "--from", sft, sets=REWARD, nproc=2, run="two")
    stage = ws.stage_dir("rlhf-reward", "two")
    kill_after(two, [stage / "checkpoints" / "step-00000003"])
    assert not (stage / "manifest.json").exists()
    check(two)

    one_rows, two_rows = rows(ws.stage_dir("rlhf-reward", "one"), "loss"), rows(stage, "loss")
    assert len(one_rows) == 8  # 40 pairs - 8 held out = 32, 4 per 512-token batch, 2 batches a step
    assert_same(one_rows, two_rows, ("loss", "grad_norm", "rank_loss", "acc"))
    assert len({r["loss"] for r in one_rows}) > 4  # the model moved: later steps test the gradients too
    one_ev, two_ev = (json.loads((ws.stage_dir("rlhf-reward", r) / "eval.json").read_text()) for r in ("one", "two"))
    assert two_ev["held_out"]["pairs"] == one_ev["held_out"]["pairs"] == 8
    assert two_ev["held_out"]["accuracy"] == one_ev["held_out"]["accuracy"]
    assert two_ev["held_out"]["score_max"] == pytest.approx(one_ev["held_out"]["score_max"], rel=1e-4)
    man = json.loads((stage / "manifest.json").read_text())
    assert man["stats"]["world"] == 2 and man["stats"]["zero_stage"] == 3 and man["resumed_from"]


@pytest.mark.timeout(1500)
def test_ppo_on_two_zero3_ranks_matches_one_and_resumes_after_sigkill(ws):
    pairs = ws.root.parent / "pairs.jsonl"
    sft = ws.stage_dir("sft")
    rm_run = ws.stage_dir("rlhf-reward", "one")
    if not (rm_run / "final").exists():  # run alone: train the reward model here
        check(lm2(ws, "reward", "--data", pairs, "--from", sft, sets=REWARD, run="one"))
    common = ["ppo", "--from", sft, "--reward", rm_run / "final", "--ptx", "none"]
    check(lm2(ws, *common, sets=PPO + ["rlhf.ppo.micro_batch_size=4"], run="one"))
    two = lm2(ws, *common, sets=PPO + ["rlhf.ppo.micro_batch_size=1"], nproc=2, run="two")
    stage = ws.stage_dir("rlhf-ppo", "two")
    kill_after(two, [stage / "checkpoints" / "step-00000002", stage / "critic" / "checkpoints" / "step-00000002"])
    check(two)

    one_rows, two_rows = rows(ws.stage_dir("rlhf-ppo", "one"), "reward_mean"), rows(stage, "reward_mean")
    assert [r["phase"] for r in one_rows] == ["critic-warmup", "ppo", "ppo", "ppo"]
    assert_same(one_rows, two_rows, ("reward_mean", "kl", "response_len", "value_loss", "critic_grad_norm"))
    assert_same(one_rows[1:], two_rows[1:], ("policy_loss", "ratio", "actor_grad_norm"))
    assert one_rows[-1]["kl"] != 0.0  # the actor moved away from the reference: later rows test the updates
    one_out, two_out = ((ws.stage_dir("rlhf-ppo", r) / "rollouts.jsonl").read_text().splitlines() for r in ("one", "two"))
    assert [json.loads(x)["response"] for x in one_out] == [json.loads(x)["response"] for x in two_out]
    man = json.loads((stage / "manifest.json").read_text())
    assert man["stats"]["world"] == 2 and man["stats"]["zero_stage"] == 3
