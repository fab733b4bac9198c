"""PPO against a frozen conditional reward model (SPEC §8.3): rollouts, experience, updates, on any
number of ranks.

The four models: the actor and the critic are training engines (`train.engine.Engine`: DeepSpeed, ZeRO
0–3, fp32 or bf16 with fp32 master weights and gradient accumulation); the reference and the reward model
are frozen (`frozen.frozen`: whole per rank, or ZeRO-3-sharded when the actor is, optionally with their
parameters in CPU memory). The critic is the reward model's backbone with a *new* value head, initialised
to zero as the RM's own head was (InternLM2/SPEC: "critic ← RM without its head"): the RM's head was
trained to read a finished response at the reward token, not to predict the return from a partial one,
so V starts at 0 everywhere and the critic-only warm-up teaches the head first.

One iteration:
1. take `prompts_per_iteration` prompts (a seeded shuffle, cycled; the same on every rank), order them by
   length, and give each rank its contiguous share;
2. sample responses through the rollout backend (`rollout.py`) in micro-batches of `generate_batch_size`,
   each seeded by its position in the iteration, so the responses do not depend on the number of ranks;
   under ZeRO-3 the actor is gathered once for the whole rollout phase;
3. score each response with the frozen RM behind its prompt's condition system prompt, and compute the
   actor's, the reference's and the critic's per-token values, `micro_batch_size` responses per forward;
4. shape the reward per token (−β·KL, plus the clipped score on the last token), run GAE (γ, λ), and
   optionally whiten the advantages (off by default, as in the report);
5. update the critic (value MSE) and, after the critic-only warm-up, the actor (clipped surrogate +
   `ptx_coef` × cross-entropy on pretraining/SFT text), `ppo_epochs` passes over `minibatches` splits of
   each rank's experience. A minibatch is accumulated over micro-batches; every loss is a sum over
   response tokens divided by the minibatch's token count *over all ranks*, so the gradient is the
   minibatch's token mean whatever the micro-batch size and the number of ranks.

All per-response tensors are [B, R] and right-padded: entry r is response token r, `index[b, r]` is the
sequence position whose output predicts it (the state before the action) and `mask` marks real tokens.
Sequences (prompt + response) are right-padded and run without an attention mask: causal attention
keeps real tokens blind to the padding after them.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from ..config import PPOConfig, TrainConfig
from ..model import InternLM2
from . import losses as L
from .frozen import all_sum, gather_objects, module_of, share
from .gold import gold_reward
from .records import Prompt, rm_sequence
from .reward_model import RewardModel, score_sequences


@dataclass
class EncodedPrompt:
    record: Prompt
    ids: list[int]  # what the actor sees: prompt turns + generation prompt
    rm_prefix: list[int]  # what the RM sees before the response: condition system turn + prompt turns


# ---------------------------------------------------------------------------------------------------
# Sequences and per-token quantities


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, T] prompt + response, right-padded
    index: torch.Tensor  # [B, R] position predicting response token r
    actions: torch.Tensor  # [B, R] response token ids
    mask: torch.Tensor  # [B, R] 1 on real response tokens

    def rows(self, idx) -> "Rollout":
        """The rows `idx` (a tensor of indices or a slice), cut to the columns they need."""
        index = self.index[idx]
        width = int(index.max()) + 1 if index.numel() else 1
        return Rollout(self.input_ids[idx][:, :width], index, self.actions[idx], self.mask[idx])

    def to(self, device) -> "Rollout":
        return Rollout(self.input_ids.to(device), self.index.to(device), self.actions.to(device), self.mask.to(device))


def build_rollout(prompt_ids: list[list[int]], responses: list[list[int]], pad_id: int) -> Rollout:
    B = len(prompt_ids)
    T = max(len(p) + len(r) for p, r in zip(prompt_ids, responses))
    R = max(1, max(len(r) for r in responses))
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    index = torch.zeros((B, R), dtype=torch.long)
    actions = torch.zeros((B, R), dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.float32)
    for b, (p, r) in enumerate(zip(prompt_ids, responses)):
        seq = list(p) + list(r)
        input_ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        n = len(r)
        index[b] = len(p) - 1  # padding entries point at a real position; the mask drops them
        if n:
            index[b, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
            actions[b, :n] = torch.tensor(r, dtype=torch.long)
            mask[b, :n] = 1.0
    return Rollout(input_ids, index, actions, mask)


def response_logprobs(model, ro: Rollout) -> torch.Tensor:
    """[B, R] log π(a_r | s_r); the LM head runs only on response positions. `model` is the module, a
    training engine's `model` or a frozen engine."""
    hidden = model(ro.input_ids, return_hidden=True)
    h = hidden.gather(1, ro.index[..., None].expand(-1, -1, hidden.shape[-1]))
    return L.token_logprobs(module_of(model).output(h), ro.actions)


def response_values(critic, ro: Rollout) -> torch.Tensor:
    """[B, R] V(s_r): the critic's head at the position before each action."""
    return critic(ro.input_ids).gather(1, ro.index)


def micro_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, size))]


@dataclass
class Experience:
    rollout: Rollout
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # [B] RM scores (before clipping)
    kl: torch.Tensor  # [B, R] log π − log π_ref on response tokens

    def rows(self, idx) -> "Experience":
        return Experience(self.rollout.rows(idx), self.old_logp[idx], self.ref_logp[idx], self.old_values[idx],
                          self.advantages[idx], self.returns[idx], self.scores[idx], self.kl[idx])


@torch.no_grad()
def make_experience(actor, ref, critic, ro: Rollout, scores: torch.Tensor, cfg: PPOConfig) -> Experience:
    """Log-probs, reference log-probs and values for every response (`micro_batch_size` per forward),
    then the shaped rewards, GAE advantages and returns."""
    parts = micro_slices(ro.input_ids.shape[0], cfg.micro_batch_size)
    old_logp = torch.cat([response_logprobs(actor, ro.rows(sl)) for sl in parts])
    ref_logp = torch.cat([response_logprobs(ref, ro.rows(sl)) for sl in parts])
    old_values = torch.cat([response_values(critic, ro.rows(sl)) for sl in parts])
    scores = scores.to(old_logp.device)
    rewards, kl = L.shaped_rewards(old_logp, ref_logp, scores, ro.mask, cfg.kl_coef, cfg.reward_clip)
    adv, ret = L.gae(rewards, old_values, ro.mask, cfg.gamma, cfg.gae_lambda)
    if cfg.normalize_advantages:
        adv = L.masked_whiten(adv, ro.mask)
    return Experience(ro, old_logp, ref_logp, old_values * ro.mask, adv, ret, scores, kl)


# ---------------------------------------------------------------------------------------------------
# Updates


def engine_config(cfg: PPOConfig, lr: float, total_steps: int) -> TrainConfig:
    """The shared engine's settings for a PPO model: AdamW at a constant `lr` (no warmup, no decay), the
    recipe's precision and sharding (bf16: fp32 master weights and fp32 gradient accumulation, ZeRO >= 1;
    `train.engine.deepspeed_config`), `micro_batch_size` responses per forward; a minibatch's micro-batches
    are accumulated by `ppo_update` itself (it marks the accumulation boundary), so grad_accum is 1."""
    return TrainConfig(seq_len=cfg.max_prompt_len + cfg.max_new_tokens, micro_batch_size=cfg.micro_batch_size,
                       grad_accum=1, max_steps=max(1, total_steps), lr=lr, min_lr_ratio=1.0, warmup_ratio=0.0,
                       weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, seed=cfg.seed,
                       precision=cfg.precision, sharding=cfg.sharding, zero_stage=cfg.zero_stage,
                       activation_checkpointing=cfg.activation_checkpointing)


def ppo_layout(cfg: PPOConfig, world: int) -> dict:
    """What one iteration runs on each of `world` ranks, computed without building anything (`--dry-run`,
    `lm2 plan`): the rank's prompts, its generation and update micro-batches, optimizer steps, the ZeRO
    stage of the actor and critic, and how the reference and reward model are held."""
    from ..errors import InputError

    if cfg.prompts_per_iteration % world:
        raise InputError(f"rlhf.ppo.prompts_per_iteration {cfg.prompts_per_iteration} does not split over {world} "
                         f"ranks; use a multiple of {world}")
    per_rank = cfg.prompts_per_iteration // world
    minibatches = min(cfg.minibatches, per_rank)
    rows = math.ceil(per_rank / minibatches)
    stage = cfg.resolved_zero_stage
    stage = max(stage, 1) if cfg.precision == "bf16" else stage  # bf16 keeps fp32 master weights: ZeRO >= 1
    return {"ranks": world, "prompts_per_rank": per_rank, "sequence_length": cfg.max_prompt_len + cfg.max_new_tokens,
            "generate_batch_size": min(cfg.generate_batch_size, per_rank),
            "generate_micro_batches": math.ceil(per_rank / cfg.generate_batch_size),
            "micro_batch_size": min(cfg.micro_batch_size, rows), "minibatch_rows": rows,
            "micro_batches_per_minibatch": math.ceil(rows / cfg.micro_batch_size),
            "optimizer_steps_per_iteration": cfg.ppo_epochs * minibatches, "zero_stage": stage,
            "precision": cfg.precision,
            "frozen": "zero3-offload" if cfg.frozen_offload else ("zero3" if stage == 3 else "whole"),
            "rollout_backend": cfg.rollout_backend}


def backward_step(engine, loss: torch.Tensor, last: bool) -> Optional[float]:
    """One micro-batch of a minibatch; the optimizer steps after the `last` (returns its grad norm)."""
    engine.ds.set_gradient_accumulation_boundary(last)
    engine.backward(loss)
    norm = engine.step()
    return None if norm is None else float(norm)


def minibatch_indices(n: int, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [c for c in torch.tensor_split(perm, min(k, n)) if len(c)]


def ppo_update(
    actor_engine,
    critic_engine,
    exp: Experience,
    cfg: PPOConfig,
    gen: torch.Generator,
    dist,
    train_actor: bool = True,
    ptx: Optional[Iterator[dict]] = None,
) -> dict:
    """Critic (always) and actor (when `train_actor`) updates on this rank's experience, every rank in step
    (see the module docstring); returns the mean stats over minibatches and the first minibatch's ratio (1
    up to float error: the policy has not moved yet)."""
    device = exp.old_logp.device
    totals: dict[str, float] = {}
    count = 0
    first_ratio = None
    for _ in range(cfg.ppo_epochs):
        for idx in minibatch_indices(exp.old_logp.shape[0], cfg.minibatches, gen):
            mb = exp.rows(idx.to(device))
            tokens = all_sum([float(mb.rollout.mask.sum())], dist)[0]
            parts = micro_slices(len(idx), cfg.micro_batch_size)
            # DeepSpeed averages gradients over ranks; each rank's share of the token sum is scaled back up.
            scale = float(dist.world)
            row = {"value_loss": 0.0}
            for i, sl in enumerate(parts):
                m = mb.rows(sl)
                values = response_values(critic_engine.model, m.rollout)
                v_loss = L.value_loss(values, m.old_values, m.returns, m.rollout.mask, cfg.value_clip, tokens=tokens)
                norm = backward_step(critic_engine, v_loss * scale, last=i == len(parts) - 1)
                row["value_loss"] += v_loss.item()
            critic_norm = norm
            actor_norm = None
            if train_actor:
                row.update(policy_loss=0.0, ratio=0.0, clip_frac=0.0)
                use_ptx = ptx is not None and cfg.ptx_coef > 0
                for i, sl in enumerate(parts):
                    m = mb.rows(sl)
                    logp = response_logprobs(actor_engine.model, m.rollout)
                    p_loss, st = L.policy_loss(logp, m.old_logp, m.advantages, m.rollout.mask, cfg.clip_eps,
                                               tokens=tokens)
                    actor_norm = backward_step(actor_engine, p_loss * scale,
                                               last=i == len(parts) - 1 and not use_ptx)
                    row["policy_loss"] += p_loss.item()
                    row["ratio"] += st["ratio"]
                    row["clip_frac"] += st["clip_frac"]
                if use_ptx:  # one batch of text per rank and minibatch; ranks average like data parallel
                    batch = next(ptx)
                    logits = actor_engine.model(batch["input_ids"].to(device),
                                                position_ids=batch["position_ids"].to(device))
                    lm_loss = L.ptx_loss(logits, batch["labels"].to(device))
                    actor_norm = backward_step(actor_engine, cfg.ptx_coef * lm_loss, last=True)
                    row["ptx_loss"] = lm_loss.item() / dist.world
            keys = sorted(row)
            row = dict(zip(keys, all_sum([row[k] for k in keys], dist)))
            row["critic_grad_norm"] = float("nan") if critic_norm is None else critic_norm
            if train_actor:
                row["actor_grad_norm"] = float("nan") if actor_norm is None else actor_norm
                if first_ratio is None:
                    first_ratio = row["ratio"]
            for k, v in row.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
    out = {k: v / count for k, v in totals.items()}
    if first_ratio is not None:
        out["first_ratio"] = first_ratio
    return out


# ---------------------------------------------------------------------------------------------------
# Prompt sampling (resumable)


@dataclass
class PromptSampler:
    n: int
    batch: int
    seed: int
    epoch: int = 0
    pos: int = 0
    _order: list = field(default_factory=list, repr=False)

    def _perm(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> list[int]:
        out = []
        while len(out) < self.batch:
            if not self._order:
                self._order = self._perm(self.epoch)
            take = self._order[self.pos:self.pos + self.batch - len(out)]
            out += take
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos, self._order = self.epoch + 1, 0, []
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos, self._order = int(s["epoch"]), int(s["pos"]), []


# ---------------------------------------------------------------------------------------------------
# One iteration, end to end


def repetition(ids: list[int], n: int = 3) -> float:
    """Share of repeated n-grams in a token list (0 = none repeated)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def strip_stop(ids: list[int], stop_ids) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stop_ids else list(ids)


def rollout_step(actor_engine, ref, critic, rm, tok, batch: list[EncodedPrompt], cfg: PPOConfig, seed: int,
                 backend, first: int = 0) -> tuple[Experience, list[dict]]:
    """Sample, score and evaluate this rank's prompts (`first` = the index of its first prompt in the
    iteration); returns the experience and one record per response."""
    device = next(actor_engine.module.parameters()).device
    ids = [p.ids for p in batch]
    responses: list[list[int]] = []
    with backend.phase(actor_engine):  # under ZeRO-3: the actor gathered once for every micro-batch below
        for sl in micro_slices(len(ids), cfg.generate_batch_size):
            responses += backend.generate(ids[sl], seed=seed + first + sl.start)
    rm_seqs = [rm_sequence(tok, p.rm_prefix, r) for p, r in zip(batch, responses)]
    scores = score_sequences(rm, rm_seqs, tok.pad_id, batch_size=cfg.micro_batch_size)
    ro = build_rollout(ids, responses, tok.pad_id).to(device)
    exp = make_experience(actor_engine.model, ref, critic, ro, scores, cfg)
    kl_seq = exp.kl.sum(-1).tolist()
    samples = []
    for p, r, s, k in zip(batch, responses, scores.tolist(), kl_seq):
        body = strip_stop(r, tok.stop_ids)
        text = tok.decode(body)
        samples.append({"line": p.record.line, "condition": p.record.condition, "response": text,
                        "tokens": len(r), "stopped": bool(r) and r[-1] in tok.stop_ids, "score": s,
                        "gold": gold_reward(p.record.gold, text), "kl": k, "repetition": repetition(body)})
    return exp, samples


def iteration_metrics(samples: list[dict], update: dict) -> dict:
    """One metrics.jsonl row: reward, gold, KL, length, repetition (overall and per condition) + losses."""
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    row = {
        "reward_mean": mean([s["score"] for s in samples]),
        "reward_std": _std([s["score"] for s in samples]),
        "gold_mean": mean([s["gold"] for s in samples]),
        "kl": mean([s["kl"] for s in samples]),
        "response_len": mean([s["tokens"] for s in samples]),
        "stopped": mean([float(s["stopped"]) for s in samples]),
        "repetition": mean([s["repetition"] for s in samples]),
    }
    for cond in sorted({s["condition"] for s in samples}):
        group = [s for s in samples if s["condition"] == cond]
        row[f"reward/{cond}"] = mean([s["score"] for s in group])
        gold = mean([s["gold"] for s in group])
        if gold is not None:
            row[f"gold/{cond}"] = gold
        row[f"response_len/{cond}"] = mean([s["tokens"] for s in group])
    row.update(update)
    return row


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over a model's tensors (names and bytes, in order): the reference must never change."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


class PPOTrainer:
    """The four models and the loop state; `iteration()` runs one PPO iteration on every rank together.

    `actor_engine` and `critic_engine` are `train.engine.Engine`s; `ref` and `rm` are frozen models
    (`frozen.frozen`); `ptx` yields this rank's packed text batches (or is None); `backend` generates
    (`rollout.RolloutBackend`)."""

    def __init__(self, actor_engine, ref, critic_engine, rm, tok, prompts: list[EncodedPrompt], cfg: PPOConfig,
                 ptx: Optional[Iterator[dict]], dist, backend):
        self.actor_engine, self.critic_engine = actor_engine, critic_engine
        self.ref, self.rm, self.tok, self.prompts, self.cfg, self.ptx = ref, rm, tok, prompts, cfg, ptx
        self.dist, self.backend = dist, backend
        self.mine = share(cfg.prompts_per_iteration, dist, "rlhf.ppo.prompts_per_iteration")
        self.sampler = PromptSampler(len(prompts), cfg.prompts_per_iteration, cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.iteration_done = 0

    @property
    def actor(self) -> InternLM2:
        return self.actor_engine.module

    @property
    def critic(self) -> RewardModel:
        return self.critic_engine.module

    def iteration(self) -> tuple[dict, list[dict]]:
        t0 = time.perf_counter()
        it = self.iteration_done
        # Longest first: micro-batches of similar length pad less; the order is the same on every rank.
        batch = sorted((self.prompts[i] for i in self.sampler.next()), key=lambda p: -len(p.ids))
        exp, samples = rollout_step(self.actor_engine, self.ref, self.critic_engine.model, self.rm, self.tok,
                                    batch[self.mine], self.cfg, seed=(self.cfg.seed * 1_000_003 + it) * 65_537,
                                    backend=self.backend, first=self.mine.start)
        warmup = it < self.cfg.critic_warmup
        update = ppo_update(self.actor_engine, self.critic_engine, exp, self.cfg, self.gen, self.dist,
                            train_actor=not warmup, ptx=self.ptx)
        samples = [s for part in gather_objects(samples, self.dist) for s in part]
        self.iteration_done += 1
        row = {"iteration": self.iteration_done, "phase": "critic-warmup" if warmup else "ppo"}
        row.update(iteration_metrics(samples, update))
        row["seconds"] = round(time.perf_counter() - t0, 3)
        for s in samples:
            s["iteration"] = self.iteration_done
        return row, samples

    def state_dict(self) -> dict:
        """The loop's position (the engines save weights and optimisers themselves); plain JSON, the same
        on every rank (the PTX stream counts what all ranks consumed)."""
        out = {"iteration": self.iteration_done, "sampler": self.sampler.state_dict(),
               "gen": self.gen.get_state().tolist()}
        if self.ptx is not None and hasattr(self.ptx, "state_dict"):
            out["ptx"] = self.ptx.state_dict()
        return out

    def load_state_dict(self, s: dict) -> None:
        self.iteration_done = int(s["iteration"])
        self.sampler.load_state_dict(s["sampler"])
        self.gen.set_state(torch.tensor(s["gen"], dtype=torch.uint8))
        if self.ptx is not None and "ptx" in s:
            self.ptx.load_state_dict(s["ptx"])


def encode_prompts(tok, prompts: list[Prompt], conditions: dict, use_conditions: bool, max_prompt_len: int
                   ) -> tuple[list[EncodedPrompt], list[dict]]:
    """Actor and RM views of each prompt; prompts longer than `max_prompt_len` are rejected with a reason."""
    from ..chat import encode_prompt
    from .records import rm_prefix

    kept, rejected = [], []
    for p in prompts:
        ids = encode_prompt(tok, p.prompt)
        if len(ids) > max_prompt_len:
            rejected.append({"line": p.line, "reason": "too-long",
                             "detail": f"{len(ids)} tokens > rlhf.ppo.max_prompt_len {max_prompt_len}"})
            continue
        system = conditions.get(p.condition, "") if use_conditions else ""
        kept.append(EncodedPrompt(p, ids, rm_prefix(tok, p.prompt, system)))
    return kept, rejected
