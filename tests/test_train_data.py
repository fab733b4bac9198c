"""Packing, mixtures, long-document share, determinism and the data position (train/data.py), plus the
LR schedule and the DeepSpeed config a TrainConfig implies (train/schedule.py, train/engine.py)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from lm2cli.config import TrainConfig
from lm2cli.errors import InputError
from lm2cli.train.data import IGNORE_INDEX, PackedStream, split_weights
from lm2cli.train.engine import deepspeed_config, param_groups, zero_section
from lm2cli.train.schedule import WarmupCosine, lr_scheduler, schedule, warmup_steps


@dataclass
class MemSplit:
    tokens: np.ndarray
    starts: np.ndarray


def mem_split(code: int, lengths: list[int]) -> MemSplit:
    """Token = code*1e6 + doc*1000 + position, so every token tells where it came from."""
    docs = [code * 1_000_000 + d * 1000 + np.arange(n) for d, n in enumerate(lengths)]
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    return MemSplit(np.concatenate(docs).astype(np.int64), starts)


def where(tok: int) -> tuple[int, int, int]:
    return tok // 1_000_000, (tok // 1000) % 1000, tok % 1000


def batches(stream, n):
    return [next(stream) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------
# Packing (SPEC §5.2)


def test_positions_restart_per_piece_and_labels_stay_inside_it():
    rng = np.random.default_rng(0)
    splits = {"en.web": mem_split(1, list(rng.integers(5, 150, size=40)))}
    stream = PackedStream(splits, seq_len=64, micro_batch_size=4, seed=3)
    for batch in batches(stream, 10):
        assert all(v.dtype == torch.long and v.shape == (4, 64) for v in batch.values())
        for ids, pos, lab in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(), batch["labels"].tolist()):
            for t in range(64):
                s, d, p = where(ids[t])
                new_piece = t == 0 or where(ids[t - 1])[:2] != (s, d)
                assert pos[t] == (0 if new_piece else pos[t - 1] + 1)
                last_of_piece = t == 63 or where(ids[t + 1])[:2] != (s, d)
                assert lab[t] == (IGNORE_INDEX if last_of_piece else ids[t + 1])


def test_every_token_is_trained_on_including_the_remainder_of_long_documents():
    lengths = [150, 7, 64, 200, 3, 90]  # longer and shorter than the 64-token samples
    splits = {"a.x": mem_split(1, lengths)}
    stream = PackedStream(splits, seq_len=64, micro_batch_size=1, seed=0)
    n = math.ceil(sum(lengths) / 64)
    flat = np.concatenate([b["input_ids"][0].numpy() for b in batches(stream, n)])[: sum(lengths)]
    # One epoch yields each document whole, in order, exactly once: pieces continue where they stopped.
    seen: dict[int, list[int]] = {}
    order = []
    for tok in flat:
        _, d, p = where(int(tok))
        if d not in seen:
            order.append(d)
        seen.setdefault(d, []).append(p)
    assert sorted(order) == list(range(len(lengths)))
    for d, positions in seen.items():
        assert positions == list(range(lengths[d])), d


# ---------------------------------------------------------------------------------------------------
# Mixtures and long documents


def token_shares(stream, n, codes):
    counts = dict.fromkeys(codes, 0)
    for b in batches(stream, n):
        for tok in b["input_ids"].flatten().tolist():
            counts[where(tok)[0]] += 1
    total = sum(counts.values())
    return {c: counts[c] / total for c in codes}


def test_mixture_sets_token_shares_whatever_the_document_lengths():
    # Split 1 has short documents and most of the data; the mixture still gives it a quarter of the tokens.
    splits = {"en.web": mem_split(1, [20] * 400), "en.book": mem_split(2, [80] * 30)}
    stream = PackedStream(splits, 64, 8, mixture={"en.web": 0.25, "en.book": 0.75}, seed=1)
    shares = token_shares(stream, 60, (1, 2))
    assert shares[1] == pytest.approx(0.25, abs=0.03)


def test_empty_mixture_weights_splits_by_size():
    splits = {"en.web": mem_split(1, [20] * 300), "zh.web": mem_split(2, [60] * 50)}  # 6000 vs 3000 tokens
    shares = token_shares(PackedStream(splits, 64, 8, seed=2), 60, (1, 2))
    assert shares[1] == pytest.approx(2 / 3, abs=0.03)


def test_mixture_keys_are_names_or_prefixes_and_the_most_specific_wins():
    sizes = {"en.web": 300, "en.book": 100, "zh.web": 600, "code.code": 50}
    w = split_weights(sizes, {"en": 0.5, "zh": 0.5})
    assert w["en.web"] == pytest.approx(0.375) and w["en.book"] == pytest.approx(0.125)
    assert w["zh.web"] == pytest.approx(0.5) and "code.code" not in w
    w = split_weights(sizes, {"en": 0.6, "en.book": 0.2, "code": 0.2})
    assert w == pytest.approx({"en.web": 0.6, "en.book": 0.2, "code.code": 0.2})


def test_a_mixture_key_that_names_no_split_is_refused_with_the_splits_listed():
    with pytest.raises(InputError, match=r"'math'.*en\.web"):
        PackedStream({"en.web": mem_split(1, [10] * 5)}, 16, 1, mixture={"math": 1.0})


def test_long_fraction_fills_that_share_of_samples_from_long_documents():
    splits = {"en.web": mem_split(1, [20] * 300), "en.book": mem_split(2, [150] * 40)}
    stream = PackedStream(splits, 64, 8, long_fraction=0.5, long_min_tokens=32, seed=4)
    kinds = []
    for b in batches(stream, 128):  # 1024 samples: one exact block
        for row in b["input_ids"].tolist():
            lengths = {150 if where(t)[0] == 2 else 20 for t in row}
            assert len(lengths) == 1  # a sample is all long or all short
            kinds.append(lengths.pop() == 150)
    assert sum(kinds) == 512


def test_missing_long_documents_fall_back_with_a_note():
    stream = PackedStream({"en.web": mem_split(1, [20] * 50)}, 32, 2, long_fraction=0.5, long_min_tokens=64)
    assert stream.long_fraction == 0 and "no documents longer than 64" in stream.notes[0]
    next(stream)


# ---------------------------------------------------------------------------------------------------
# Determinism, rank sharding, position


def make(seed=5, **kw):
    rng = np.random.default_rng(1)
    splits = {"en.web": mem_split(1, list(rng.integers(3, 40, 200))),
              "en.book": mem_split(2, list(rng.integers(60, 300, 30))),
              "zh.web": mem_split(3, list(rng.integers(10, 90, 80)))}
    args = dict(seq_len=48, micro_batch_size=2, mixture={"en": 0.7, "zh": 0.3}, long_fraction=0.25,
                long_min_tokens=50, seed=seed)
    args.update(kw)
    return PackedStream(splits, **args)


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_order_is_a_function_of_the_seed():
    assert same(batches(make(), 12), batches(make(), 12))
    assert not same(batches(make(seed=5), 3), batches(make(seed=6), 3))


def test_ranks_split_the_global_batch_exactly():
    whole = batches(make(micro_batch_size=4), 6)
    r0 = batches(make(micro_batch_size=2, rank=0, world=2), 6)
    r1 = batches(make(micro_batch_size=2, rank=1, world=2), 6)
    for w, a, b in zip(whole, r0, r1):
        for k in w:
            assert torch.equal(w[k], torch.cat([a[k], b[k]]))


def test_state_dict_resumes_the_exact_stream():
    s = make()
    batches(s, 7)
    state = json.loads(json.dumps(s.state_dict()))  # what dataloader.json holds
    expected = batches(s, 5)
    t = make()
    t.load_state_dict(state)
    assert same(batches(t, 5), expected)


def test_a_position_saved_on_one_rank_resumes_on_two():
    s = make(micro_batch_size=4)
    batches(s, 3)
    state = s.state_dict()
    expected = batches(s, 2)
    halves = []
    for r in (0, 1):
        t = make(micro_batch_size=2, rank=r, world=2)
        t.load_state_dict(state)
        halves.append(batches(t, 2))
    for w, a, b in zip(expected, *halves):
        assert torch.equal(w["input_ids"], torch.cat([a["input_ids"], b["input_ids"]]))


# ---------------------------------------------------------------------------------------------------
# Schedule


def test_warmup_is_linear_and_cosine_ends_at_the_floor():
    f = WarmupCosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(10 + 99 / 2) == pytest.approx(0.55)  # halfway down the cosine
    assert f(109) == pytest.approx(0.1)
    decay = [f(s) for s in range(10, 110)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_warmup_steps_round_from_the_ratio_with_at_least_one():
    assert warmup_steps(300, 0.01) == 3 and warmup_steps(50, 0.01) == 1 and warmup_steps(50, 0.0) == 0
    assert schedule(50, 0.0, 0.1)(0) == 1.0


def test_scheduler_state_round_trips_without_pickled_code(tmp_path):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = lr_scheduler(opt, schedule(20, 0.1, 0.1))
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0) and lrs[1] == pytest.approx(2.0) and lrs[-1] == pytest.approx(0.2)
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)  # plain numbers only
    assert state["lr_lambdas"][0] == {"total_steps": 20, "warmup_steps": 2, "min_ratio": 0.1}


# ---------------------------------------------------------------------------------------------------
# DeepSpeed config (SPEC §6.2)


@pytest.mark.parametrize("sharding,extra,expected", [
    ("full-replica", {}, {"stage": 0}),
    ("partial", {}, {"stage": 2}),
    ("partial", {"zero_stage": 1}, {"stage": 1}),
    ("partial", {"hpz_partition_size": 8}, {"stage": 3, "zero_hpz_partition_size": 8}),
    ("full", {}, {"stage": 3}),
])
def test_sharding_modes_map_to_zero(sharding, extra, expected):
    assert zero_section(TrainConfig(sharding=sharding, **extra)) == expected


def test_hpz_without_sharding_is_refused():
    with pytest.raises(InputError, match="hpZ"):
        zero_section(TrainConfig(sharding="full-replica", hpz_partition_size=8))


def test_deepspeed_config_batch_precision_and_clipping():
    c = deepspeed_config(TrainConfig(micro_batch_size=4, grad_accum=2, precision="bf16"), world=8)
    assert (c["train_batch_size"], c["gradient_accumulation_steps"], c["bf16"]["enabled"]) == (64, 2, True)
    assert c["gradient_clipping"] == 1.0 and "optimizer" not in c  # torch AdamW is passed in
    # fp32 data parallel: lm2 clips (DeepSpeed would drop the norm), so DeepSpeed must not clip again.
    assert deepspeed_config(TrainConfig(), world=1)["gradient_clipping"] == 0.0
    assert deepspeed_config(TrainConfig(sharding="full"), world=1)["gradient_clipping"] == 1.0


def test_norms_and_biases_get_no_weight_decay():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
