"""RLHF objectives against values worked out by hand from the formulas in SPEC §8.1 and §8.3."""

import math

import pytest
import torch

from lm2cli.align import losses as L


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_focal_ranking_loss_matches_hand_values():
    r_c = torch.tensor([1.0, 0.0, 2.0])
    r_r = torch.tensor([0.0, 1.0, 2.0])
    # d = 1: P = σ(1), decay = (1 − 2(P − ½))² ; d = −1: decay = 1 ; d = 0: P = ½, decay = 1.
    p = _sig(1.0)
    expect = [-(1 - 2 * (p - 0.5)) ** 2 * math.log(p), -math.log(_sig(-1.0)), math.log(2.0)]
    assert L.focal_ranking_loss(r_c, r_r, gamma=2.0).tolist() == pytest.approx(expect, rel=1e-6)
    # γ = 0 is Bradley–Terry.
    assert L.focal_ranking_loss(r_c, r_r, gamma=0.0).tolist() == pytest.approx(L.bradley_terry_loss(r_c, r_r).tolist())


def test_focal_loss_never_exceeds_bradley_terry_and_equals_it_at_half():
    d = torch.linspace(-8, 8, 161)
    zero = torch.zeros_like(d)
    focal, bt = L.focal_ranking_loss(d, zero), L.bradley_terry_loss(d, zero)
    assert torch.all(focal <= bt + 1e-7)
    assert torch.equal(focal[d <= 0], bt[d <= 0])  # wrongly ranked (P <= ½) pairs are not decayed
    assert torch.all(focal[d > 0.5] < bt[d > 0.5])
    assert L.focal_ranking_loss(torch.tensor([0.3]), torch.tensor([0.3])).item() == pytest.approx(math.log(2.0))


def test_log_barrier_values_and_clamp():
    x = torch.tensor([0.0, 3.0, -3.0, 10.0, -10.0], dtype=torch.float64)
    got = L.log_barrier(x, bound=5.0).tolist()
    edge = -(math.log(9.999) + math.log(0.001))
    expect = [-2 * math.log(5.0), -(math.log(8.0) + math.log(2.0)), -(math.log(2.0) + math.log(8.0)), edge, edge]
    assert got == pytest.approx(expect, rel=1e-12)


def test_barrier_gradient_points_inward():
    x = torch.tensor([-4.9, -2.0, -0.1, 0.0, 0.1, 2.0, 4.9], requires_grad=True)
    L.log_barrier(x).sum().backward()
    g = x.grad
    # Descent moves x by −g: positive scores go down, negative ones up, 0 stays.
    assert torch.all(g[x > 0] > 0) and torch.all(g[x < 0] < 0) and g[3] == 0
    # d/dx = 1/(b − x) − 1/(x + b)
    assert g[5].item() == pytest.approx(1 / 3 - 1 / 7, rel=1e-5)


def test_reward_loss_total_is_rank_plus_lambda_barriers():
    r_c, r_r = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    loss, m = L.reward_loss(r_c, r_r, gamma=2.0, barrier_lambda=0.02, bound=5.0)

    def pen(x):
        return -(math.log(x + 5) + math.log(5 - x))

    p1 = _sig(1.0)
    rank = [-(1 - 2 * (p1 - 0.5)) ** 2 * math.log(p1), -math.log(_sig(-1.0))]
    pens = [pen(1.0) + pen(0.0), pen(-0.5) + pen(0.5)]
    expect = sum(r + 0.02 * p for r, p in zip(rank, pens)) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert m["acc"] == 0.5


def test_gae_matches_hand_computed_example():
    # Row 0: T = 3, γ = 1, λ = 0.5. δ = [0.1, 0.1, 0.3]; A2 = 0.3, A1 = 0.1 + 0.5·0.3, A0 = 0.1 + 0.5·0.25.
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = L.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.225, 0.25, 0.3])
    assert ret.tolist()[0] == pytest.approx([0.725, 0.85, 1.0])
    # Row with padding: whatever sits after the last token must not leak in. γ = 0.9, λ = 1:
    # δ1 = 2 − 0.5 = 1.5, δ0 = 0.9·0.5 − 1 = −0.55, A0 = −0.55 + 0.9·1.5 = 0.8.
    adv, ret = L.gae(torch.tensor([[0.0, 2.0, 9.0]]), torch.tensor([[1.0, 0.5, 7.0]]),
                     torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.8, 1.5, 0.0])
    assert ret.tolist()[0] == pytest.approx([1.8, 2.0, 0.0])


def test_shaped_rewards_put_clipped_score_on_last_token():
    logp = torch.tensor([[-1.0, -2.0, -1.5, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    r, kl = L.shaped_rewards(logp, ref, torch.tensor([7.0, -0.25]), mask, kl_coef=0.1, reward_clip=5.0)
    assert kl.flatten().tolist() == pytest.approx([0.5, 0.0, -0.5, 0.0] + [0.0] * 4)
    assert r.flatten().tolist() == pytest.approx([-0.05, 0.0, 0.05 + 5.0, 0.0] + [0.0, -0.25, 0.0, 0.0])


def test_policy_loss_clips_and_ratio_one_when_unchanged():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5, 0.5]]))  # ratios 2, 1, 1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, st = L.policy_loss(logp, old, adv, torch.ones(1, 3), clip_eps=0.2)
    # token 0: max(−2, −1.2) = −1.2 ; token 1: 1 ; token 2: −2
    assert loss.item() == pytest.approx((-1.2 + 1.0 - 2.0) / 3)
    assert st["clip_frac"] == pytest.approx(1 / 3)
    _, st = L.policy_loss(logp, logp, adv, torch.ones(1, 3))
    assert st["ratio"] == 1.0 and st["clip_frac"] == 0.0


def test_zero_advantage_gives_zero_policy_gradient():
    logp = torch.randn(2, 5, requires_grad=True)
    loss, _ = L.policy_loss(logp, logp.detach() - 0.1, torch.zeros(2, 5), torch.ones(2, 5))
    loss.backward()
    assert torch.count_nonzero(logp.grad) == 0


def test_value_loss_unclipped_and_clipped():
    v, old, ret = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 2.9]]), torch.tensor([[0.0, 3.0]])
    mask = torch.ones(1, 2)
    assert L.value_loss(v, old, ret, mask).item() == pytest.approx(0.5)
    # Clipped V0 = 0 + clamp(1, ±0.5) = 0.5 → 0.25 < 1: the max keeps the unclipped error.
    assert L.value_loss(v, old, ret, mask, value_clip=0.5).item() == pytest.approx(0.5)
    # Clipped V0 = −3 + clamp(2, ±0.5) = −2.5 → 6.25 > 1: the pessimistic clip takes over.
    v2 = torch.tensor([[-1.0, 3.0]])
    assert L.value_loss(v2, torch.tensor([[-3.0, 3.0]]), ret, mask, value_clip=0.5).item() == pytest.approx(
        ((-2.5) ** 2 + 0) / 2)


def test_token_logprobs_equals_log_softmax_gather():
    logits = torch.randn(3, 7, 11)
    tgt = torch.randint(0, 11, (3, 7))
    ref = torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0]
    assert torch.allclose(L.token_logprobs(logits, tgt, chunk=4), ref, atol=1e-6)
