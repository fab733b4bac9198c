"""The InternLM2 architecture: layout, parity with transformers' Llama, packing, KV cache, RoPE variants."""

import dataclasses
import math

import pytest
import torch

from lm2cli.config import ModelConfig
from lm2cli.errors import InputError
from lm2cli.convert import export_checkpoint, from_llama_state, fuse_wqkv, split_wqkv, to_llama_state
from lm2cli.convert import load_model, save_model
from lm2cli.model import InternLM2, KVCache, effective_rope_base, rope_inv_freq

CFG = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=50_000.0)


def _model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return InternLM2(cfg).eval()


def test_module_names_match_internlm2():
    names = set(_model().state_dict())
    for n in ["model.tok_embeddings.weight", "model.layers.0.attention.wqkv.weight", "model.layers.0.attention.wo.weight",
              "model.layers.1.feed_forward.w1.weight", "model.layers.1.feed_forward.w2.weight",
              "model.layers.1.feed_forward.w3.weight", "model.layers.0.attention_norm.weight",
              "model.layers.0.ffn_norm.weight", "model.norm.weight", "output.weight"]:
        assert n in names
    assert _model().model.layers[0].attention.wqkv.weight.shape == (2 * (2 + 2) * 16, 64)


def test_scaled_init_for_wo_and_w2():
    cfg = dataclasses.replace(CFG, hidden_size=256, intermediate_size=768, num_hidden_layers=4, vocab_size=64)
    m = _model(cfg)
    std = lambda t: t.float().std().item()
    for i, layer in enumerate(m.model.layers):
        expect = 0.02 / math.sqrt(2 * (i + 1))
        assert std(layer.attention.wo.weight) == pytest.approx(expect, rel=0.05)
        assert std(layer.feed_forward.w2.weight) == pytest.approx(expect, rel=0.05)
        assert std(layer.feed_forward.w1.weight) == pytest.approx(0.02, rel=0.05)
    assert torch.all(m.model.norm.weight == 1)


def test_wqkv_layout_and_exact_inverse():
    # Row (g, s, d) of wqkv: slots < qpk are query heads g*qpk+s, then key g, then value g.
    cfg = CFG
    nkv, qpk, hd, h = cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim, cfg.hidden_size
    wqkv = torch.arange(nkv * (qpk + 2) * hd * h, dtype=torch.float32).view(-1, h)
    q, k, v = split_wqkv(wqkv, cfg)
    assert torch.equal(q[: qpk * hd], wqkv[: qpk * hd])  # group 0's queries come first
    assert torch.equal(k[:hd], wqkv[qpk * hd:(qpk + 1) * hd])
    assert torch.equal(v[:hd], wqkv[(qpk + 1) * hd:(qpk + 2) * hd])
    assert torch.equal(q[qpk * hd: 2 * qpk * hd], wqkv[(qpk + 2) * hd:(2 * qpk + 2) * hd])  # group 1's queries
    assert torch.equal(fuse_wqkv(q, k, v, cfg), wqkv)
    state = _model().state_dict()
    back = from_llama_state(to_llama_state(state, cfg), cfg)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_llama_export_matches_transformers_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = _model()
    save_model(m, tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "llama", fmt="llama")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", torch_dtype=torch.float32).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = m(ids), hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and the Llama folder loads back into lm2 unchanged
    again = load_model(tmp_path / "llama")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours, rtol=0, atol=0)


def test_packed_sample_equals_documents_run_separately():
    m = _model()
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(3, CFG.vocab_size, (n,), generator=g) for n in (7, 12, 5)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = m(ids, position_ids=pos)[0]
        alone = torch.cat([m(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # without position ids the later documents would see the earlier ones
        leaky = m(ids)[0]
    assert not torch.allclose(leaky[7:], alone[7:], atol=1e-4)


def test_kv_cache_decoding_equals_full_forward():
    m = _model()
    ids = torch.randint(0, CFG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(CFG, batch_size=2, max_len=32)
        steps = [m(ids[:, :12], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_matches_unpadded_rows():
    m = _model()
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, CFG.vocab_size, (9,), generator=g), torch.randint(3, CFG.vocab_size, (5,), generator=g)
    ids = torch.stack([a, torch.cat([torch.full((4,), 2), b])])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    with torch.no_grad():
        cache = KVCache(CFG, 2, 16)
        out = m(ids, attention_mask=mask, cache=cache)
        nxt = torch.tensor([[7], [8]])
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        out2 = m(nxt, attention_mask=mask2, cache=cache)
        ref_b = m(torch.cat([b, torch.tensor([8])])[None])
    torch.testing.assert_close(out[1, 4:], ref_b[0, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2[1, 0], ref_b[0, 5], rtol=1e-5, atol=1e-5)


def test_dynamic_ntk_base_matches_spec_table():
    cfg = ModelConfig(vocab_size=8, hidden_size=128 * 32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8, max_position_embeddings=32_768, rope_theta=1e6,
                      rope_scaling={"type": "dynamic", "factor": 2.0})
    assert cfg.head_dim == 128
    assert effective_rope_base(cfg, 32_768) == 1e6  # unchanged up to L_max
    for length, expect in [(65_536, 3.05e6), (131_072, 7.22e6), (200_000, 1.17e7), (262_144, 1.57e7)]:
        assert effective_rope_base(cfg, length) == pytest.approx(expect, rel=5e-3)
    cfg3 = dataclasses.replace(cfg, rope_scaling={"type": "dynamic", "factor": 3.0})
    assert effective_rope_base(cfg3, 131_072) == pytest.approx(1.04e7, rel=5e-3)


def test_dynamic_ntk_has_no_stale_cache():
    cfg = dataclasses.replace(CFG, rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16)
    m = _model(cfg)
    short = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = m(short)
        m(torch.randint(0, cfg.vocab_size, (1, 60)))  # longer than L_max: a larger base for this call only
        after = m(short)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    plain = _model(dataclasses.replace(cfg, rope_scaling=None))
    with torch.no_grad():
        torch.testing.assert_close(plain(short), before, rtol=0, atol=0)  # identical below L_max


def test_rope_base_change_and_linear_interpolation_formulas():
    d = CFG.head_dim
    inv, scale, msc = rope_inv_freq(dataclasses.replace(CFG, rope_theta=1e6), 10)
    expect = torch.tensor([1e6 ** (-2 * i / d) for i in range(d // 2)])
    torch.testing.assert_close(inv, expect.float())
    assert (scale, msc) == (1.0, 1.0)
    _, scale, _ = rope_inv_freq(dataclasses.replace(CFG, rope_scaling={"type": "linear", "factor": 4.0}), 10)
    assert scale == 0.25  # position p is rotated like p/4


def test_yarn_keeps_high_and_interpolates_low_frequencies():
    cfg = dataclasses.replace(CFG, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    inv, _, mscale = rope_inv_freq(cfg, 10)
    base_inv, _, _ = rope_inv_freq(CFG, 10)
    assert inv[0] == pytest.approx(base_inv[0].item())  # highest frequency untouched
    assert inv[-1] == pytest.approx(base_inv[-1].item() / 4, rel=1e-5)  # lowest frequency interpolated
    assert mscale == pytest.approx(0.1 * math.log(4.0) + 1)


def test_save_load_round_trip_and_truncated_checkpoint(tmp_path):
    m = _model()
    save_model(m, tmp_path / "a")
    again = load_model(tmp_path / "a")
    for k, v in m.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    weights = tmp_path / "a" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt or partial"):
        load_model(tmp_path / "a")
    with pytest.raises(InputError, match="no config.json"):
        load_model(tmp_path)
