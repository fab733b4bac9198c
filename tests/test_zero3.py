"""The rehearsal recipe (the 7B recipe's code paths at CI size) through `lm2 pretrain --nproc 2`: bf16 with
fp32 master weights, ZeRO-3 + hpZ built partitioned, activation checkpointing, stage 2 at 8x the context
with RoPE base 5e4 -> 1e6. Its loss curve matches one unsharded rank; its ZeRO-3 checkpoints resume on
another number of ranks (2 -> 1 and 1 -> 2) with the loss an uninterrupted run has at the next step.

One workspace, one run per layout (runs/<name>/), shared by the assertions: six launches in all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from _train_ws import build_tokens, workspace_with_tokens

from lm2cli.config import load_recipe
from lm2cli.layout import read_manifest
from lm2cli.train.engine import clean_env
from lm2cli.train.loop import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# One rank, the same global batch (micro 2 x accum 2 x 2 ranks = micro 2 x accum 4 x 1 rank), unsharded:
# bf16 full-replica is ZeRO-1's bf16 optimizer, which on one rank shards nothing (engine.deepspeed_config).
ONE_RANK_UNSHARDED = [f"pretrain.stage{s}.{k}" for s in (1, 2) for k in
                      ("sharding=full-replica", "hpz_partition_size=1", "grad_accum=4")]
ONE_RANK_ZERO3 = ["pretrain.stage1.sharding=full", "pretrain.stage1.hpz_partition_size=1",
                  "pretrain.stage1.grad_accum=4"]


def lm2(ws, run: str, *args: str) -> None:
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "lm2cli.cli", "pretrain", "--recipe", "rehearsal", "--workdir", str(ws.root),
           "--run", run, *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]


def sets(items: list[str]) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def losses(ws, run: str, stage: int) -> dict[int, float]:
    rows = read_metrics(ws.stage_dir(f"pretrain-stage{stage}", run) / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def fork(ws, src: str, dst: str) -> None:
    """runs/<dst>/ as a copy of runs/<src>/'s stage 1: the same checkpoints to resume from."""
    shutil.copytree(ws.stage_dir("pretrain-stage1", src), ws.stage_dir("pretrain-stage1", dst))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    tokens = build_tokens(tmp_path_factory.mktemp("tok"))
    return workspace_with_tokens(tokens, tmp_path_factory.mktemp("zero3") / "ws")


@pytest.fixture(scope="module")
def trained(ws):
    """Stages 1 -> 2 on two ZeRO-3 ranks and on one unsharded rank."""
    for stage in (1, 2):
        lm2(ws, "two", "--stage", str(stage), "--nproc", "2")
        lm2(ws, "one", "--stage", str(stage), *sets(ONE_RANK_UNSHARDED))
    return ws


def test_the_rehearsal_recipe_runs_the_7b_code_paths():
    seven, rehearsal = load_recipe("internlm2-7b"), load_recipe("rehearsal")
    for stage in ("stage1", "stage2"):
        big, small = getattr(seven.pretrain, stage), getattr(rehearsal.pretrain, stage)
        assert (small.precision, small.sharding, small.activation_checkpointing) == \
               (big.precision, big.sharding, big.activation_checkpointing) == ("bf16", "partial", True)
        assert small.hpz_partition_size > 1 and big.hpz_partition_size > 1 and small.grad_accum > 1
    for r in (seven, rehearsal):  # stage 2: 8x the context, RoPE base 5e4 -> 1e6, half the samples long
        s1, s2 = r.pretrain.stage1, r.pretrain.stage2
        assert (s2.seq_len / s1.seq_len, s1.rope_theta, s2.rope_theta, s2.long_fraction) == (8, 5e4, 1e6, 0.5)


@pytest.mark.timeout(1500)
def test_two_zero3_ranks_train_stages_1_and_2_like_one_rank(trained):
    ws = trained
    for stage in (1, 2):
        folder = ws.stage_dir(f"pretrain-stage{stage}", "two")
        ds = json.loads((folder / "deepspeed.json").read_text())
        assert ds["zero_optimization"] == {"stage": 3, "zero_hpz_partition_size": 2}
        assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
        stats = read_manifest(folder)["stats"]
        assert (stats["world"], stats["zero_stage"]) == (2, 3)
        two, one = losses(ws, "two", stage), losses(ws, "one", stage)
        assert list(two) == list(one) == list(range(1, len(two) + 1))
        # Identical weights at step 1 (the init is drawn whole on the host whatever the sharding; stage 2
        # streams stage 1's final weights), so the first loss is the same up to reduction order...
        assert two[1] == pytest.approx(one[1], abs=1e-3)
        # ...and then bf16 matmuls on different micro-batch splits: measured <= 2e-3 over both stages.
        assert max(abs(two[k] - one[k]) for k in two) < 2e-2, (two, one)
        assert two[1] - two[len(two)] > 0.3  # and the stage learns
    cfg2 = json.loads((ws.stage_dir("pretrain-stage2", "two") / "final" / "config.json").read_text())
    assert (cfg2["rope_theta"], cfg2["max_position_embeddings"]) == (1_000_000.0, 512)
    shards = list((ws.stage_dir("pretrain-stage1", "two") / "checkpoints" / "step-00000008" / "optim")
                  .glob("*optim_states.pt"))
    assert len(shards) == 2


@pytest.mark.timeout(1500)
def test_zero3_checkpoints_resume_on_another_number_of_ranks(trained):
    ws = trained
    two = losses(ws, "two", 1)
    # 2 -> 1: step 4 of the two-rank run, continued on one ZeRO-3 rank (same global batch); it saves at
    # 6 and 8 to give the next check a one-rank checkpoint with an uninterrupted one-rank run after it.
    fork(ws, "two", "to-one")
    step4 = ws.stage_dir("pretrain-stage1", "to-one") / "checkpoints" / "step-00000004"
    lm2(ws, "to-one", "--stage", "1", "--resume", str(step4),
        *sets(ONE_RANK_ZERO3 + ["pretrain.stage1.save_every=2"]))
    one = losses(ws, "to-one", 1)
    assert [one[k] for k in (1, 2, 3, 4)] == [two[k] for k in (1, 2, 3, 4)]  # kept from before the resume
    assert one[5] == pytest.approx(two[5], abs=1e-4)  # the restored weights are the saved ones
    assert max(abs(one[k] - two[k]) for k in (6, 7, 8)) < 1e-2  # then only reduction order differs
    assert (step4 / "optim-universal" / "DONE").exists()
    assert read_manifest(ws.stage_dir("pretrain-stage1", "to-one"))["stats"]["world"] == 1

    # 1 -> 2: step 6 of that one-rank run, continued on two ranks with hpZ as the recipe says.
    fork(ws, "to-one", "back-to-two")
    step6 = ws.stage_dir("pretrain-stage1", "back-to-two") / "checkpoints" / "step-00000006"
    lm2(ws, "back-to-two", "--stage", "1", "--nproc", "2", "--resume", str(step6))
    again = losses(ws, "back-to-two", 1)
    assert again[7] == pytest.approx(one[7], abs=1e-4)
    assert again[8] == pytest.approx(one[8], abs=1e-2)
