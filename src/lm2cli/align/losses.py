"""The RLHF objectives as plain tensor functions (SPEC §8.1, §8.3); no models, no state.

Reward model: focal ranking loss (γ = 2) plus a log barrier keeping scores in (−b, b), b = 5.
PPO: per-token KL reward shaping with the clipped RM score on the last token, GAE, the clipped
policy surrogate averaged over response tokens, the value MSE (clipping optional), and the PTX
cross-entropy. Response tensors are [B, T] and right-padded; `mask` is 1 on real response tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# Reward model (SPEC §8.1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(r_c − r_r)."""
    return -F.logsigmoid(r_chosen - r_rejected)


def focal_ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-pair −(1 − 2·max(0, P − ½))^γ · log P with P = σ(r_c − r_r).

    The factor only down-weights pairs already ranked correctly (P > ½), so easy pairs stop
    dominating; it is not detached (xtuner keeps its gradient too).
    """
    diff = r_chosen - r_rejected
    decay = (1.0 - 2.0 * (torch.sigmoid(diff) - 0.5).clamp(min=0.0)) ** gamma
    return -decay * F.logsigmoid(diff)


def log_barrier(x: torch.Tensor, bound: float = 5.0, eps: float = 1e-3) -> torch.Tensor:
    """Per-score −[log(x + b) + log(b − x)], with x clamped to ±(b − eps) as xtuner does.

    Outside the clamp the penalty is flat (no gradient), so a score that escaped is pulled back only
    by the ranking loss; inside, the gradient always points towards 0.
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32)).clamp(-bound + eps, bound - eps)
    return -(torch.log(x + bound) + torch.log(bound - x))


def reward_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    gamma: float = 2.0,
    barrier_lambda: float = 0.02,
    bound: float = 5.0,
) -> tuple[torch.Tensor, dict]:
    """Mean over pairs of L_rank + λ·(L_pen(r_c) + L_pen(r_r)); returns (loss, metrics)."""
    rank = focal_ranking_loss(r_chosen, r_rejected, gamma) if gamma > 0 else bradley_terry_loss(r_chosen, r_rejected)
    pen = log_barrier(r_chosen, bound) + log_barrier(r_rejected, bound)
    loss = (rank + barrier_lambda * pen).mean()
    with torch.no_grad():
        metrics = {
            "rank_loss": rank.mean().item(),
            "barrier": pen.mean().item(),
            "acc": (r_chosen > r_rejected).float().mean().item(),
            "chosen_score": r_chosen.mean().item(),
            "rejected_score": r_rejected.mean().item(),
        }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# PPO (SPEC §8.3)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None,
                tokens: Optional[float] = None) -> torch.Tensor:
    """Mean of `x` over the mask; with `tokens`, the masked sum over that many tokens instead, so that
    micro-batches (and ranks) that each hold part of a minibatch add up to the minibatch's mean."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / (max(float(tokens), 1.0) if tokens is not None else mask.sum().clamp(min=1.0))
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """log softmax(logits)[target] per position, computed in row chunks so B×T×V never sits in fp32 twice."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    out = []
    for i in range(0, flat_logits.shape[0], chunk):
        lg = flat_logits[i:i + chunk].float()
        out.append(lg.gather(-1, flat_targets[i:i + chunk, None]).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.cat(out).view(targets.shape)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded mask (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def shaped_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    score: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = −β·(log π − log π_ref) + 𝟙[t = T]·clip(R, ±c); returns (rewards, per-token KL), both masked."""
    mask = mask.to(logp.dtype)
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    clipped = score.to(rewards.dtype).clamp(-reward_clip, reward_clip) if reward_clip else score.to(rewards.dtype)
    rewards[rows, last_index(mask)] += clipped * (mask.sum(-1) > 0).to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.99
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses; returns (advantages, returns).

    δ_t = r_t + γ·V_{t+1} − V_t with V = 0 after the last token, A_t = Σ_l (γλ)^l δ_{t+l}, returns = A + V.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
    tokens: Optional[float] = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate max(−A·ρ, −A·clip(ρ, 1 ± ε)) averaged over response tokens (over `tokens` of them
    when given: see `masked_mean`; the stats are then shares of the same total)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, tokens=tokens)
    with torch.no_grad():
        stats = {
            "ratio": masked_mean(ratio, mask, tokens=tokens).item(),
            "clip_frac": masked_mean((clipped > unclipped).float(), mask, tokens=tokens).item(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: Optional[float] = None,
    tokens: Optional[float] = None,
) -> torch.Tensor:
    """Mean squared error to the returns over response tokens (or over `tokens`, see `masked_mean`);
    with `value_clip`, PPO2's pessimistic clip."""
    err = (values - returns) ** 2
    if value_clip:
        v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        err = torch.maximum(err, (v_clipped - returns) ** 2)
    return masked_mean(err, mask, tokens=tokens)


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on pretraining/SFT text; labels are −100 where masked, already shifted."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
