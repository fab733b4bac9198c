"""Planning RLHF at scale without running it: `lm2 plan --rlhf` memory per rank of PPO's four models and
its rollout buffer, the layout `rlhf ppo --plan` takes, and what each rank runs (`ppo_layout`)."""

import dataclasses

import pytest

from lm2cli import plan as P
from lm2cli.align.ppo import ppo_layout
from lm2cli.config import load_recipe
from lm2cli.errors import InputError

GiB = 2**30


def _layout(recipe, **kw) -> P.RLHFLayout:
    cfg = recipe.rlhf.ppo
    base = dict(dp=8, zero_stage=cfg.resolved_zero_stage, micro_batch=cfg.micro_batch_size,
                generate_batch=cfg.generate_batch_size, checkpointing=cfg.activation_checkpointing,
                frozen_offload=cfg.frozen_offload)
    return P.RLHFLayout(**{**base, **kw})


@pytest.mark.parametrize("name", ["internlm2-1_8b", "internlm2-7b"])
def test_recipe_rlhf_sections_fit_8x80gb(name):
    recipe = load_recipe(name)
    cl = P.cluster(8, 8, "A100-80")
    mem = P.rlhf_memory(recipe, _layout(recipe))
    assert mem.total < 80 * GiB, mem.gib()
    assert P.best_rlhf_layout(recipe, cl).fits
    # The reward model's training: some layout of the recipe's batch fits, the recipe's own included.
    reward = recipe.rlhf.reward.train
    work = P.reward_workload(recipe)
    micro = recipe.rlhf.reward.tokens_per_batch // reward.seq_len
    own = P.Layout(8, reward.resolved_zero_stage, micro, reward.grad_accum, reward.activation_checkpointing)
    assert P.memory(work, own).total < 80 * GiB


def test_rlhf_memory_terms_follow_the_layout():
    recipe = load_recipe("internlm2-7b", ["rlhf.ppo.precision=bf16"])
    z0 = P.rlhf_memory(recipe, _layout(recipe, zero_stage=1))
    z3 = P.rlhf_memory(recipe, _layout(recipe, zero_stage=3))
    params = P.ppo_workload(recipe).model.params
    assert z3.actor < z0.actor / 2  # parameters and gradients sharded too, not only the optimizer state
    assert z0.reference == pytest.approx(2 * params)  # whole bf16 copy per rank below ZeRO-3
    assert z3.reference < z0.reference / 4  # ZeRO-3 inference: a shard plus the layer being gathered
    assert P.rlhf_memory(recipe, _layout(recipe, zero_stage=3, frozen_offload=True)).reference < z3.reference
    assert z3.rollout > z0.rollout  # generation runs on the gathered actor under ZeRO-3
    small, big = (P.rlhf_memory(recipe, _layout(recipe, micro_batch=m, checkpointing=False)) for m in (1, 16))
    assert big.update > 8 * small.update * 0.5
    g1, g32 = (P.rlhf_memory(recipe, _layout(recipe, generate_batch=g)) for g in (1, 32))
    assert g32.rollout > g1.rollout
    assert z3.critic < z3.actor  # the critic's LM head is frozen: no gradient or optimizer state


def test_plan_applies_to_the_recipe_and_rejects_an_uneven_split():
    recipe = load_recipe("internlm2-1_8b")
    choice = P.best_rlhf_layout(recipe, P.cluster(8, 8, "A100-80"))
    applied = P.apply_rlhf_layout(recipe, choice.layout).rlhf.ppo
    assert (applied.resolved_zero_stage, applied.micro_batch_size, applied.generate_batch_size) == (
        choice.layout.zero_stage, choice.layout.micro_batch, choice.layout.generate_batch)
    with pytest.raises(InputError, match="does not split"):
        P.plan_rlhf(recipe, P.cluster(7, 7, "A100-80"))
    tiny_gpu = P.cluster(8, 8, memory_gib=8.0, peak_tflops=100, intra_bw=100, inter_bw=10)
    with pytest.raises(InputError, match="no PPO layout fits"):
        P.best_rlhf_layout(load_recipe("internlm2-7b"), tiny_gpu)


def test_ppo_layout_per_rank():
    cfg = dataclasses.replace(load_recipe("tiny").rlhf.ppo, prompts_per_iteration=16, generate_batch_size=3,
                              micro_batch_size=2, minibatches=2, ppo_epochs=2, precision="bf16")
    got = ppo_layout(cfg, 2)
    assert got["prompts_per_rank"] == 8 and got["generate_micro_batches"] == 3
    assert got["minibatch_rows"] == 4 and got["micro_batches_per_minibatch"] == 2
    assert got["optimizer_steps_per_iteration"] == 4 and got["zero_stage"] == 1 and got["frozen"] == "whole"
    with pytest.raises(InputError, match="does not split"):
        ppo_layout(cfg, 3)
