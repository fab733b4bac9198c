"""`train.engine.build_model` in one process: a fresh model has the same weights built dense or partitioned
(ZeRO-3, a world of one), checkpoint weights stream into the run's dtype without an fp32 detour, a checkpoint
that does not fit the config is refused by name, and a frozen engine serves but never trains."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lm2cli.config import ModelConfig, TrainConfig
from lm2cli.convert import save_model
from lm2cli.errors import InputError
from lm2cli.model import InternLM2
from lm2cli.train.engine import Engine, build_model, init_distributed, is_partitioned

MC = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32)


def cfg(sharding: str, precision: str = "fp32") -> TrainConfig:
    return TrainConfig(seq_len=16, micro_batch_size=1, sharding=sharding, precision=precision, seed=7)


def whole(model, c: TrainConfig) -> dict:
    """The model's weights as full CPU tensors, through a frozen engine (gathered under ZeRO-3)."""
    return Engine(model, c, 0, init_distributed(), trainable=False).full_state_dict()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_fresh_model_has_the_same_weights_dense_or_partitioned():
    dist = init_distributed()
    dense, sharded = build_model(MC, cfg("full-replica"), dist), build_model(MC, cfg("full"), dist)
    assert not is_partitioned(dense) and is_partitioned(sharded)
    a, b = whole(dense, cfg("full-replica")), whole(sharded, cfg("full"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # InternLM2's init rule, drawn from the seed: norms are ones, wo/w2 narrower in deeper layers.
    assert torch.equal(a["model.norm.weight"], torch.ones(32))
    assert a["model.layers.1.attention.wo.weight"].std() < a["model.layers.0.attention.wo.weight"].std()
    assert not torch.equal(a["output.weight"], whole(build_model(MC, TrainConfig(seed=8), dist),
                                                      TrainConfig(seed=8))["output.weight"])


def test_checkpoint_weights_stream_into_the_runs_dtype(tmp_path):
    torch.manual_seed(0)
    save_model(InternLM2(MC), tmp_path / "src", dtype=torch.bfloat16)
    saved = load_file(tmp_path / "src" / "model.safetensors")
    dist = init_distributed()
    for sharding in ("full", "partial"):  # ZeRO-3 partitions, ZeRO-2 a whole bf16 copy on the device
        c = cfg(sharding, "bf16")
        model = build_model(MC, c, dist, init_from=tmp_path / "src")
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        got = whole(model, c)
        assert all(torch.equal(got[k], saved[k]) for k in saved), sharding
    fp32 = whole(build_model(MC, cfg("full"), dist, init_from=tmp_path / "src"), cfg("full"))
    assert fp32["output.weight"].dtype == torch.float32
    assert torch.equal(fp32["output.weight"], saved["output.weight"].float())


def test_a_checkpoint_of_another_shape_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    save_model(InternLM2(MC), tmp_path / "src")
    wider = ModelConfig(**{**MC.__dict__, "intermediate_size": 96})
    with pytest.raises(InputError, match=r"shapes differ from the model's config: .*feed_forward\.w1\.weight"):
        build_model(wider, cfg("full-replica"), init_distributed(), init_from=tmp_path / "src")


def test_a_frozen_engine_scores_but_never_trains():
    dist = init_distributed()
    c = cfg("full")
    engine = Engine(build_model(MC, c, dist), c, 0, dist, trainable=False)
    assert not any(p.requires_grad for p in engine.module.parameters()) and not engine.module.training
    with torch.no_grad():
        logits = engine.model(torch.arange(8)[None])
    assert logits.shape == (1, 8, 96) and torch.isfinite(logits).all()
    with pytest.raises(RuntimeError, match="frozen engine"):
        engine.step()
