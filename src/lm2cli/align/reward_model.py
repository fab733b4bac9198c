"""The conditional reward model (SPEC §8.1): `RewardModel`, pair batches, accuracy, and its folder.

`RewardModel` is an InternLM2 backbone (initialised from SFT) plus a scalar head read at the reward
token appended to every sequence. The head is a bias-free linear map initialised to zero, as xtuner
does: every score starts at 0 (P = ½ for every pair, the barrier at its minimum) and the backbone
learns from the first step on through the head's growing weights. The backbone's LM head is kept
(frozen, unused) so the folder also loads with `load_model`.

Sequences are right-padded and run without an attention mask: under causal attention a real token
never sees the padding after it, so the score equals the unpadded sequence's exactly.

A reward folder (`rlhf-reward/final/`) is a checkpoint folder (`config.json`, `model.safetensors`,
tokenizer files) plus `reward_head.safetensors` and `reward.json` (reward token, conditions, bound).
The same class serves as PPO's critic (the RM's backbone with a new, zero head: align/ppo.py): called
without `lengths` it gives the head at every position.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn

from ..chat import Rejected
from ..errors import InputError, WrongArtefact
from ..convert import load_model, save_model
from ..model import InternLM2
from .losses import reward_loss
from .records import Pair, encode_text, rm_prefix, rm_sequence

HEAD_FILE = "reward_head.safetensors"
INFO_FILE = "reward.json"


class RewardModel(nn.Module):
    def __init__(self, backbone: InternLM2):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        nn.init.zeros_(self.head.weight)
        backbone.output.weight.requires_grad_(False)  # the LM head plays no part in a score

    @property
    def config(self):
        return self.backbone.config

    def values(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] head output at every position (right-padded input, no mask needed)."""
        hidden = self.backbone(input_ids, return_hidden=True)
        return self.head(hidden).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B] scores, read at each row's last real token (the reward token); without `lengths`, the [B, T]
        values (PPO's critic). One entry point, so a DeepSpeed engine's per-forward hooks see every call."""
        v = self.values(input_ids)
        if lengths is None:
            return v
        return v[torch.arange(v.shape[0], device=v.device), lengths.to(v.device) - 1]


# ---------------------------------------------------------------------------------------------------
# Saving and loading


class _Weights:
    """What `save_model` reads: `config` and `state_dict()`."""

    def __init__(self, config, state: dict):
        self.config, self._state = config, state

    def state_dict(self) -> dict:
        return self._state


def reward_exporter(info: dict):
    """`export(module, dir, tokenizer)` for `fit` and its checkpoints: it sees only `config` and
    `state_dict()`, which it splits into the backbone (`model.safetensors`) and the head."""
    from safetensors.torch import save_file

    def export(module, path, tokenizer=None) -> Path:
        path = Path(path)
        state = module.state_dict()
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        save_model(_Weights(module.config, backbone), path, tokenizer=tokenizer)
        save_file({"weight": state["head.weight"].detach().cpu().contiguous()}, str(path / HEAD_FILE))
        (path / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        return path

    return export


def save_reward_model(model: RewardModel, path: Path, tokenizer, info: dict) -> Path:
    return reward_exporter(info)(model, path, tokenizer)


def is_reward_folder(path: Path) -> bool:
    return (Path(path) / HEAD_FILE).is_file()


def load_reward_model(path: Path, device=None) -> tuple[RewardModel, dict]:
    """(model, reward.json); a folder without a reward head is refused by name."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_reward_folder(path):
        raise WrongArtefact(f"reward model {path} has no {HEAD_FILE}; expected the output of `lm2 rlhf reward`")
    model = RewardModel(load_model(path, device=device))
    head = load_file(str(path / HEAD_FILE))
    if head.get("weight") is None or tuple(head["weight"].shape) != (1, model.config.hidden_size):
        raise InputError(f"{path / HEAD_FILE} does not match the backbone (hidden size {model.config.hidden_size})")
    with torch.no_grad():
        model.head.weight.copy_(head["weight"])
    info = json.loads((path / INFO_FILE).read_text()) if (path / INFO_FILE).is_file() else {}
    return model.to(device or "cpu").eval(), info


# ---------------------------------------------------------------------------------------------------
# Pairs → token sequences → batches


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    condition: str
    line: int = 0

    @property
    def width(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def encode_pair(tok, pair: Pair, conditions: dict, max_len: int, use_condition: bool = True) -> EncodedPair:
    """Both responses behind the condition's system prompt (or none, for the unconditioned ablation)."""
    prefix = rm_prefix(tok, pair.prompt, conditions.get(pair.condition, "") if use_condition else "")
    chosen = rm_sequence(tok, prefix, encode_text(tok, pair.chosen))
    rejected = rm_sequence(tok, prefix, encode_text(tok, pair.rejected))
    longest = max(len(chosen), len(rejected))
    if longest > max_len:
        raise Rejected("too-long", f"{longest} tokens > rlhf.reward.train.seq_len {max_len}")
    return EncodedPair(chosen, rejected, pair.condition, pair.line)


def encode_pairs(tok, pairs: Iterable[Pair], conditions: dict, max_len: int, use_condition: bool = True
                 ) -> tuple[list[EncodedPair], list[dict]]:
    kept, rejected = [], []
    for p in pairs:
        try:
            kept.append(encode_pair(tok, p, conditions, max_len, use_condition))
        except Rejected as e:
            rejected.append({"line": p.line, "reason": e.code, "detail": e.detail, "condition": p.condition})
    return kept, rejected


def split_held_out(pairs: list[EncodedPair], fraction: float, seed: int) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(train, held-out), stratified by condition so every condition is measured."""
    train, held = [], []
    by_cond: dict[str, list[EncodedPair]] = {}
    for p in pairs:
        by_cond.setdefault(p.condition, []).append(p)
    rng = random.Random(seed)
    for cond in sorted(by_cond):
        group = by_cond[cond][:]
        rng.shuffle(group)
        n_held = round(len(group) * fraction) if len(group) > 1 else 0
        if fraction > 0 and len(group) > 1:
            n_held = max(1, n_held)
        held += group[:n_held]
        train += group[n_held:]
    return train, held


def token_budget_groups(pairs: list[EncodedPair], tokens_per_batch: int) -> list[list[EncodedPair]]:
    """Consecutive pairs grouped so that 2·n·(longest) ≤ tokens_per_batch (padded tokens count)."""
    groups: list[list[EncodedPair]] = []
    cur: list[EncodedPair] = []
    width = 0
    for p in pairs:
        w = max(width, p.width)
        if cur and 2 * (len(cur) + 1) * w > tokens_per_batch:
            groups.append(cur)
            cur, w = [], p.width
        cur.append(p)
        width = w
    if cur:
        groups.append(cur)
    return groups


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, longest] ids, [N] lengths)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def collate(group: list[EncodedPair], pad_id: int) -> dict:
    """A pair batch: `input_ids` [2n, T] (n chosen rows, then their n rejected rows), `lengths` [2n],
    `conditions` (n names)."""
    ids, lengths = right_pad([p.chosen for p in group] + [p.rejected for p in group], pad_id)
    return {"input_ids": ids, "lengths": lengths, "conditions": [p.condition for p in group]}


def pair_batches(pairs: list[EncodedPair], tokens_per_batch: int, pad_id: int, seed: Optional[int] = None
                 ) -> list[dict]:
    """One epoch of batches; with a seed the pairs are shuffled first, else kept in order."""
    order = list(pairs)
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [collate(g, pad_id) for g in token_budget_groups(order, tokens_per_batch)]


# ---------------------------------------------------------------------------------------------------
# Loss and evaluation


def pair_scores(model: RewardModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores; `model` may be the module or the training engine that wraps it."""
    scores = model(batch["input_ids"], batch["lengths"])
    n = len(batch["conditions"])
    return scores[:n], scores[n:]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_loss_fn(gamma: float, barrier_lambda: float, bound: float):
    """`loss_fn(model, batch) -> (loss, metrics)` for the shared training loop."""

    def loss_fn(model, batch: dict):
        r_c, r_r = pair_scores(model, batch)
        return reward_loss(r_c, r_r, gamma, barrier_lambda, bound)

    return loss_fn


@torch.no_grad()
def tally(model, batches: Iterable[dict]) -> dict:
    """Per-condition counts (pairs, correct, score sums) and the score range over `batches`; tallies of
    disjoint batch sets add up (`merge_tallies`), which is how ranks evaluate shares of the data."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    per: dict[str, dict] = {}
    lo, hi = float("inf"), float("-inf")
    for batch in batches:
        r_c, r_r = pair_scores(model, _to(batch, device))
        lo = min(lo, r_c.min().item(), r_r.min().item())
        hi = max(hi, r_c.max().item(), r_r.max().item())
        for cond, c, r in zip(batch["conditions"], r_c.tolist(), r_r.tolist()):
            s = per.setdefault(cond, {"n": 0, "correct": 0, "chosen": 0.0, "rejected": 0.0})
            s["n"] += 1
            s["correct"] += int(c > r)
            s["chosen"] += c
            s["rejected"] += r
    module.train(was_training)
    return {"per": per, "lo": lo, "hi": hi}


def merge_tallies(tallies: list[dict]) -> dict:
    per: dict[str, dict] = {}
    for t in tallies:
        for cond, s in t["per"].items():
            into = per.setdefault(cond, {"n": 0, "correct": 0, "chosen": 0.0, "rejected": 0.0})
            for k in into:
                into[k] += s[k]
    return {"per": per, "lo": min((t["lo"] for t in tallies), default=float("inf")),
            "hi": max((t["hi"] for t in tallies), default=float("-inf"))}


def summarize(t: dict) -> dict:
    """Held-out accuracy overall and per condition, mean scores, and the score range."""
    per, lo, hi = t["per"], t["lo"], t["hi"]
    n = sum(s["n"] for s in per.values())
    return {
        "pairs": n,
        "accuracy": sum(s["correct"] for s in per.values()) / n if n else None,
        "per_condition": {
            c: {"pairs": s["n"], "accuracy": s["correct"] / s["n"], "chosen_mean": s["chosen"] / s["n"],
                "rejected_mean": s["rejected"] / s["n"]}
            for c, s in sorted(per.items())
        },
        "score_min": lo if n else None,
        "score_max": hi if n else None,
    }


def evaluate(model: RewardModel, batches: Iterable[dict]) -> dict:
    """Accuracy overall and per condition, mean scores, and the score range, on one process."""
    return summarize(tally(model, batches))


def evaluate_distributed(model, batches: list[dict], dist) -> dict:
    """`evaluate` with the batches dealt over the ranks (every rank calls it; under ZeRO-3 each rank runs
    the same number of forwards, the short shares repeating a batch whose result is dropped)."""
    from .frozen import gather_objects, padded_share

    mine, real = padded_share(batches, dist)
    t = tally(model, mine[:real])
    if len(mine) > real:  # keep the collective forwards in step; nothing of it is counted
        tally(model, mine[real:])
    return summarize(merge_tallies(gather_objects(t, dist)))


@torch.no_grad()
def score_sequences(model: RewardModel, seqs: list[list[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Scores of ready-made RM sequences (each ending in the reward token), in input order."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, lengths = right_pad(seqs[i:i + batch_size], pad_id)
        out.append(model(ids.to(device), lengths).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


class PairStream:
    """Pair batches for `fit`: a seeded shuffle per epoch, grouped by token budget (so an epoch's batch
    count depends on its order). Batches are numbered across epochs; rank r of W takes batch k + r where k
    counts the batches every rank has consumed, so each rank trains different pairs and the position (one
    integer) is the same on every rank: a resumed run continues on the very next batch, whatever its world
    size."""

    def __init__(self, pairs: list[EncodedPair], tokens_per_batch: int, pad_id: int, seed: int, rank: int = 0,
                 world: int = 1):
        if not pairs:
            raise InputError("no preference pairs to train on")
        self.pairs, self.tokens_per_batch, self.pad_id, self.seed = pairs, tokens_per_batch, pad_id, seed
        self.rank, self.world = rank, world
        self.consumed = 0
        self._epoch, self._batches = -1, None
        self._lengths: dict[int, int] = {}

    def _order(self, epoch: int) -> list[EncodedPair]:
        order = list(self.pairs)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _length(self, epoch: int) -> int:
        if epoch not in self._lengths:
            self._lengths[epoch] = len(token_budget_groups(self._order(epoch), self.tokens_per_batch))
        return self._lengths[epoch]

    def batches_per_epoch(self) -> int:
        """The first epoch's batch count (later epochs differ by a batch or two)."""
        return self._length(0)

    def __iter__(self) -> "PairStream":
        return self

    def _batch(self, j: int) -> dict:
        epoch = 0
        while j >= self._length(epoch):
            j -= self._length(epoch)
            epoch += 1
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = [collate(g, self.pad_id)
                             for g in token_budget_groups(self._order(epoch), self.tokens_per_batch)]
        return self._batches[j]

    def __next__(self) -> dict:
        batch = self._batch(self.consumed + self.rank)
        self.consumed += self.world
        return batch

    def state_dict(self) -> dict:
        return {"batches_consumed": self.consumed, "pairs": len(self.pairs), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("pairs") != len(self.pairs) or state.get("seed") != self.seed:
            raise InputError(f"the checkpoint was trained on {state.get('pairs')} pairs (seed {state.get('seed')}), "
                             f"this data has {len(self.pairs)} (seed {self.seed}); resume with the same data and "
                             "recipe, or pass --resume never")
        if "batches_consumed" in state:
            self.consumed = int(state["batches_consumed"])
        else:  # written by lm2 before rank-sharded streams: (epoch, index)
            self.consumed = sum(self._length(e) for e in range(int(state["epoch"]))) + int(state["index"])
