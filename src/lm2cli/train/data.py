"""Packed pretraining samples streamed from `data/tokens` (SPEC §5.2), resumable to the exact sample.

A sample is `seq_len` tokens cut from a stream of whole documents laid end to end (InternEvo packing):
- `position_ids` restart at 0 at every document start, so the model attends within documents only;
- `labels` are the next token inside the same piece, and -100 at each piece's last position;
- a document that does not fit is split, and its remainder opens the next sample from that stream as a
  new piece (positions from 0 again), so no token is dropped (stage 1's "remainder is also trained on").

Which documents: each split (`<lang>.<content_type>`) gets a token share from `mixture` (keys are split
names or prefixes, the most specific key wins; empty = by size). A document is drawn from split s with
probability proportional to share_s / mean_len_s, so expected *token* shares match the mixture. Within
a split, documents come in a seeded permutation, reshuffled each epoch. With `long_fraction` > 0 there
are two document streams, short (≤ `long_min_tokens`) and long (> it), and that share of samples is
filled from the long one (stage 2: half the tokens from long documents).

Order is a pure function of the seed and counters (counter-based RNG blocks), so the stream's position
is a handful of integers: `state_dict()` is small JSON and `load_state_dict()` resumes exactly. Global
sample k of micro-step m goes to rank (k - m·B·W) // B; every rank walks the whole stream (cheap: it
only moves cursors for other ranks' samples), so the state is identical on all ranks and independent
of the world size it was saved with.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

import numpy as np
import torch

from ..errors import InputError

IGNORE_INDEX = -100
BLOCK = 1024  # draws per counter-based RNG block
STATE_VERSION = 1


class SplitLike(Protocol):
    """What the stream reads from a split (`lm2cli.tokens.Split` or any test double)."""

    tokens: np.ndarray  # flat token ids
    starts: np.ndarray  # document starts, with a final sentinel == len(tokens)


# ---------------------------------------------------------------------------------------------------
# Mixture weights


def _matches(name: str, key: str) -> bool:
    return name == key or name.startswith(key + ".")


def split_weights(tokens_by_split: Mapping[str, int], mixture: Optional[Mapping[str, float]],
                  strict: bool = True) -> dict[str, float]:
    """Token share per split (summing to 1). A key covers the splits it names or prefixes; the most
    specific key wins; a key's weight is spread over its splits by size. Unmatched splits get 0."""
    names = [n for n, t in tokens_by_split.items() if t > 0]
    if not mixture:
        total = sum(tokens_by_split[n] for n in names)
        return {n: tokens_by_split[n] / total for n in names} if total else {}
    owner: dict[str, str] = {}
    for key, weight in mixture.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise InputError(f"mixture weight for {key!r} must be a number >= 0, got {weight!r}")
        matched = [n for n in names if _matches(n, str(key))]
        if not matched and strict:
            raise InputError(f"mixture key {key!r} matches no token split; splits are: {', '.join(sorted(names))}")
        for n in matched:
            if n not in owner or len(str(key)) > len(owner[n]):
                owner[n] = str(key)
    key_tokens: dict[str, int] = {}
    for n, key in owner.items():
        key_tokens[key] = key_tokens.get(key, 0) + tokens_by_split[n]
    weights = {n: float(mixture[key]) * tokens_by_split[n] / key_tokens[key] for n, key in owner.items()}
    total = sum(weights.values())
    if total <= 0:
        if strict:
            raise InputError(f"mixture {dict(mixture)} gives every split weight 0")
        return {}
    return {n: w / total for n, w in weights.items() if w > 0}


# ---------------------------------------------------------------------------------------------------
# One document stream


class _DocStream:
    """Documents of eligible length from weighted splits, in a seeded order; a cursor inside the current one."""

    def __init__(self, stream_id: int, splits: Mapping[str, SplitLike], eligible: dict[str, np.ndarray],
                 shares: dict[str, float], seed: int):
        self.stream_id, self.seed = stream_id, seed
        self.names = sorted(n for n in shares if len(eligible[n]))
        self.splits = {n: splits[n] for n in self.names}
        self.eligible = {n: eligible[n] for n in self.names}
        lens = {n: float(np.diff(np.asarray(splits[n].starts))[eligible[n]].mean()) for n in self.names}
        q = np.array([shares[n] / lens[n] for n in self.names], dtype=np.float64)
        self.doc_probs = q / q.sum()
        self._choices: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))
        self._perms: dict[str, tuple[int, np.ndarray]] = {}
        self.docs = 0  # documents started so far
        self.counts = {n: 0 for n in self.names}  # documents started per split
        self.current: Optional[tuple[str, int]] = None
        self.start = self.length = self.offset = 0

    def __bool__(self) -> bool:
        return bool(self.names)

    def _split_of(self, j: int) -> str:
        if len(self.names) == 1:
            return self.names[0]
        block = j // BLOCK
        if self._choices[0] != block:
            rng = np.random.default_rng([self.seed, self.stream_id, 0, block])
            self._choices = (block, rng.choice(len(self.names), size=BLOCK, p=self.doc_probs))
        return self.names[int(self._choices[1][j % BLOCK])]

    def _doc_of(self, name: str, c: int) -> int:
        n = len(self.eligible[name])
        epoch = c // n
        cached = self._perms.get(name)
        if cached is None or cached[0] != epoch:
            sid = self.names.index(name)
            cached = (epoch, np.random.default_rng([self.seed, self.stream_id, 1, sid, epoch]).permutation(n))
            self._perms[name] = cached
        return int(self.eligible[name][cached[1][c % n]])

    def _open(self, name: str, doc: int, offset: int) -> None:
        starts = self.splits[name].starts
        self.current = (name, doc)
        self.start, self.length, self.offset = int(starts[doc]), int(starts[doc + 1] - starts[doc]), offset

    def _advance(self) -> None:
        name = self._split_of(self.docs)
        doc = self._doc_of(name, self.counts[name])
        self.counts[name] += 1
        self.docs += 1
        self._open(name, doc, 0)

    def fill(self, n: int, tokens: Optional[np.ndarray], positions=None, labels=None) -> None:
        """Take the next `n` tokens as pieces into the given rows; with `tokens=None` only move the cursor."""
        filled = 0
        while filled < n:
            if self.current is None or self.offset >= self.length:
                self._advance()
            take = min(n - filled, self.length - self.offset)
            if tokens is not None:
                a = self.start + self.offset
                piece = self.splits[self.current[0]].tokens[a:a + take]
                tokens[filled:filled + take] = piece
                positions[filled:filled + take] = np.arange(take)
                labels[filled:filled + take - 1] = piece[1:]
            self.offset += take
            filled += take

    def state_dict(self) -> dict:
        return {"docs": self.docs, "counts": dict(self.counts),
                "current": list(self.current) if self.current else None, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.docs = int(state["docs"])
        self.counts = {n: int(state["counts"].get(n, 0)) for n in self.names}
        self.current = None
        self.start = self.length = self.offset = 0
        if state.get("current"):
            name, doc = state["current"]
            if name not in self.splits:
                raise InputError(f"data position refers to split {name!r}, which the token shards no longer have")
            self._open(name, int(doc), int(state["offset"]))


# ---------------------------------------------------------------------------------------------------
# The packed stream


class PackedStream:
    """Infinite iterator of this rank's micro-batches: dicts of `input_ids`, `labels`, `position_ids`,
    each a `[micro_batch_size, seq_len]` long tensor."""

    def __init__(self, splits: Mapping[str, SplitLike], seq_len: int, micro_batch_size: int, *,
                 mixture: Optional[Mapping[str, float]] = None, long_fraction: float = 0.0,
                 long_min_tokens: int = 0, seed: int = 0, rank: int = 0, world: int = 1, strict: bool = True):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.rank, self.world, self.seed = rank, world, int(seed)
        self.long_fraction = float(long_fraction)
        self.notes: list[str] = []  # what the caller should tell the user (a stream fell back)
        self.config = {"seq_len": self.seq_len, "seed": self.seed, "mixture": dict(mixture or {}),
                       "long_fraction": self.long_fraction, "long_min_tokens": int(long_min_tokens)}
        lengths = {n: np.diff(np.asarray(s.starts)) for n, s in splits.items()}
        if not any(int(v.sum()) for v in lengths.values()):
            raise InputError("the token shards hold no tokens to train on")
        if strict:  # every key must name a split; the per-stream weights below may then drop some
            split_weights({n: int(v.sum()) for n, v in lengths.items()}, mixture, strict=True)
        short, long_ = self._partition(lengths, long_min_tokens)
        self.short = self._stream(0, splits, short, lengths, mixture)
        self.long = self._stream(1, splits, long_, lengths, mixture) if long_ else None
        if self.long_fraction > 0 and not self.long:
            self.notes.append(f"no documents longer than {long_min_tokens} tokens: every sample comes from "
                              "short documents (long_fraction ignored)")
            self.long_fraction, self.long = 0.0, None
        if self.long_fraction < 1 and not self.short:
            self.notes.append(f"no documents of at most {long_min_tokens} tokens: every sample comes from long ones")
            self.long_fraction = 1.0
        self._long_block: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=bool))
        self.sample = 0  # next global sample index

    def _partition(self, lengths: dict[str, np.ndarray], long_min: int):
        nonempty = {n: np.flatnonzero(v > 0) for n, v in lengths.items()}
        if self.long_fraction <= 0:
            return nonempty, None
        short = {n: np.flatnonzero((v > 0) & (v <= long_min)) for n, v in lengths.items()}
        long_ = {n: np.flatnonzero(v > long_min) for n, v in lengths.items()}
        return short, long_

    def _stream(self, sid, splits, eligible, lengths, mixture) -> _DocStream:
        tokens = {n: int(lengths[n][idx].sum()) for n, idx in eligible.items()}
        shares = split_weights(tokens, mixture, strict=False)
        return _DocStream(sid, splits, eligible, shares, self.seed)

    @classmethod
    def from_store(cls, store, part: str, cfg, rank: int = 0, world: int = 1, seed: Optional[int] = None,
                   micro_batch_size: Optional[int] = None) -> "PackedStream":
        """The stream a `TrainConfig` asks for over `TokenStore` part `train` or `val`. A validation
        stream tolerates mixture keys its (smaller) part lacks."""
        splits = store.splits(part)
        if not splits:
            raise InputError(f"{store.path} has no {part} documents; rerun `lm2 tokenize`"
                             + (" with tokenize.val_fraction > 0" if part == "val" else ""))
        return cls(splits, cfg.seq_len, micro_batch_size or cfg.micro_batch_size, mixture=cfg.mixture,
                   long_fraction=cfg.long_fraction, long_min_tokens=cfg.long_min_tokens,
                   seed=cfg.seed if seed is None else seed, rank=rank, world=world, strict=part == "train")

    # -- iteration ---------------------------------------------------------------------------------

    def is_long(self, k: int) -> bool:
        """Whether global sample k comes from the long-document stream."""
        if self.long_fraction <= 0:
            return False
        if self.long_fraction >= 1:
            return True
        block = k // BLOCK
        if self._long_block[0] != block:
            # An exact share per block, in a seeded order: no drift, and no rank always gets one kind.
            pattern = np.zeros(BLOCK, dtype=bool)
            pattern[: round(self.long_fraction * BLOCK)] = True
            self._long_block = (block, np.random.default_rng([self.seed, 2, block]).permutation(pattern))
        return bool(self._long_block[1][k % BLOCK])

    def __iter__(self) -> "PackedStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        b, t = self.micro_batch_size, self.seq_len
        tokens = np.zeros((b, t), dtype=np.int64)
        positions = np.zeros((b, t), dtype=np.int64)
        labels = np.full((b, t), IGNORE_INDEX, dtype=np.int64)
        first_mine = self.sample + self.rank * b
        for k in range(self.sample, self.sample + b * self.world):
            stream = self.long if self.is_long(k) else self.short
            i = k - first_mine
            if 0 <= i < b:
                stream.fill(t, tokens[i], positions[i], labels[i])
            else:
                stream.fill(t, None)
        self.sample += b * self.world
        return {"input_ids": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions)}

    # -- position ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        streams = {"short": self.short.state_dict()}
        if self.long:
            streams["long"] = self.long.state_dict()
        return {"version": STATE_VERSION, "sample": self.sample, "config": self.config, "streams": streams}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise InputError(f"data position has version {state.get('version')}; this lm2 reads {STATE_VERSION}")
        if state.get("config") != self.config:
            from ..console import warn

            warn(f"resuming a data stream saved with {state.get('config')} under {self.config}: "
                 "the order from here on differs from the original run")
        self.sample = int(state["sample"])
        self.short.load_state_dict(state["streams"]["short"])
        if self.long and "long" in state["streams"]:
            self.long.load_state_dict(state["streams"]["long"])
