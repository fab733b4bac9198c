"""attention.attend: every packed-document backend computes what the dense block-diagonal mask computes."""

import pytest
import torch

from lm2cli.attention import Documents, attend, packed_backend
from lm2cli.config import ModelConfig
from lm2cli.model import InternLM2


def _positions(lengths_per_row):
    """position_ids of packed rows; a row may open mid-document (its first position is not 0)."""
    rows = []
    for lengths, first in lengths_per_row:
        pos = [torch.arange(first, first + lengths[0])] + [torch.arange(n) for n in lengths[1:]]
        rows.append(torch.cat(pos))
    return torch.stack(rows)


POS = _positions([((5, 9, 1, 17), 0), ((13, 19), 4), ((32,), 0)])  # 3 rows of 32 tokens


def _qkv(b, h, hkv, t, d=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(b, n, t, d, generator=g, requires_grad=grad) for n in (h, hkv, hkv)]
    return qkv


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa"])
def test_segments_match_dense_mask_outputs_and_gradients(heads):
    docs = Documents.from_positions(POS)
    results = {}
    for backend in ("dense", "segments"):
        q, k, v = _qkv(3, *heads, 32, grad=True)
        out = attend(q, k, v, docs=docs, backend=backend)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float32)).view_as(out))
        results[backend] = (out.detach(), q.grad, k.grad, v.grad)
    for want, got in zip(results["dense"], results["segments"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference writes each document in place instead of concatenating
        q, k, v = _qkv(3, *heads, 32)
        torch.testing.assert_close(attend(q, k, v, docs=docs, backend="segments"), results["dense"][0],
                                   rtol=1e-5, atol=1e-5)


def test_dense_mask_is_causal_within_documents_only():
    m = Documents.from_positions(POS).dense_mask()[:, 0]
    assert m.shape == (3, 32, 32)
    assert m[0, 5, 5] and m[0, 13, 5] and not m[0, 4, 5] and not m[0, 14, 13]  # docs 0:5, 5:14, 14:15
    assert m[0, 14].sum() == 1  # a one-token document sees itself
    assert m[2].equal(torch.ones(32, 32, dtype=torch.bool).tril())  # one document: plain causal


def test_document_block_mask_equals_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    pos = _positions([((100, 200, 3, 297), 0), ((250, 350), 7)])  # 600 tokens: 5 blocks, the last partial
    docs = Documents.from_positions(pos)
    doc = docs.doc_ids

    def mod(b, h, q, kv):
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    want = create_block_mask(mod, 2, 1, 600, 600, device="cpu")
    got = docs.block_mask()
    assert torch.equal(got.to_dense(), want.to_dense())
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
    assert torch.equal(got.full_kv_num_blocks, want.full_kv_num_blocks)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flex_attention_matches_dense_and_compiles_once_for_any_documents():
    # CPU FlexAttention needs torch.compile (tens of seconds once) and has no backward: inference only.
    from torch._dynamo.utils import counters

    q, k, v = _qkv(2, 4, 2, 256, d=16, seed=3)
    graphs = None
    for layout in ([((40, 100, 3, 113), 0), ((128, 128), 9)], [((256,), 0), ((7, 200, 49), 0)]):
        docs = Documents.from_positions(_positions(layout))
        with torch.no_grad():
            want = attend(q, k, v, docs=docs, backend="dense")
            got = attend(q, k, v, docs=docs, backend="flex")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        graphs = graphs or counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs  # a new batch's documents do not recompile


def test_backend_choice_and_override(monkeypatch):
    monkeypatch.delenv("LM2_ATTENTION", raising=False)
    assert packed_backend(torch.device("cpu"), torch.float32) == "segments"
    assert packed_backend(torch.device("cuda"), torch.float32) == "flex"  # flash-attn has no fp32 kernel
    monkeypatch.setenv("LM2_ATTENTION", "dense")
    assert packed_backend(torch.device("cpu"), torch.float32) == "dense"
    monkeypatch.setenv("LM2_ATTENTION", "fused")
    with pytest.raises(ValueError, match="LM2_ATTENTION"):
        packed_backend(torch.device("cpu"), torch.float32)


def test_cached_chunk_is_causal_bottom_right():
    # 3 new queries after 5 cached keys: query i sees keys <= 5 + i (SDPA's is_causal would align top-left).
    q, k, v = _qkv(1, 4, 2, 8, seed=5)
    got = attend(q[:, :, 5:], k, v, causal=True)
    full = attend(q, k, v, causal=True)
    torch.testing.assert_close(got, full[:, :, 5:], rtol=1e-5, atol=1e-5)


def test_a_given_mask_wins_over_the_cached_chunk_rule():
    # Left padding: 3 new queries after 5 cached keys with a padding mask. The mask (causal + padding) is
    # what counts; the cached-chunk rule must not replace it (it would let queries see the pad keys).
    q, k, v = _qkv(2, 4, 2, 8, seed=6)
    keep = torch.tensor([[True] * 8, [False, False] + [True] * 6])
    idx = torch.arange(8)
    mask = ((idx[None, :] <= idx[:, None])[None, None] & keep[:, None, None, :]) | torch.eye(8, dtype=torch.bool)
    got = attend(q[:, :, 5:], k, v, causal=True, mask=mask[:, :, 5:])
    full = attend(q, k, v, mask=mask)
    torch.testing.assert_close(got, full[:, :, 5:], rtol=1e-5, atol=1e-5)


def test_model_packed_forward_and_gradients_match_dense_backend(monkeypatch):
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = InternLM2(cfg)
    ids = torch.randint(0, 96, POS.shape, generator=torch.Generator().manual_seed(1))
    grads = {}
    for backend in ("dense", "segments"):
        monkeypatch.setenv("LM2_ATTENTION", backend)
        model.zero_grad()
        logits = model(ids, position_ids=POS)
        logits.float().logsumexp(-1).sum().backward()
        grads[backend] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["segments"][0], grads["dense"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads["segments"][1], grads["dense"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_on_packed_rows_gives_the_same_gradients():
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = InternLM2(cfg).train()
    ids = torch.randint(0, 96, POS.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(ids, position_ids=POS).float().logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flash_varlen_layout_is_what_the_kernel_expects(monkeypatch):
    # No flash-attn on CPU: a reference varlen kernel (its documented contract: tokens flattened to
    # [total, heads, d], int32 cu_seqlens, causal per sequence, fewer KV heads) checks lm2's plumbing.
    import torch.nn.functional as F

    from lm2cli import attention

    calls = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        assert q.shape[1] % k.shape[1] == 0 and cu_q.dtype == torch.int32 and causal
        calls.append((cu_q.tolist(), max_q))
        rep = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
            out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
        return out

    monkeypatch.setattr(attention, "_flash_varlen", lambda: varlen)
    docs = Documents.from_positions(POS)
    q, k, v = _qkv(3, 4, 2, 32, seed=9)
    torch.testing.assert_close(attend(q, k, v, docs=docs, backend="flash"),
                               attend(q, k, v, docs=docs, backend="dense"), rtol=1e-5, atol=1e-5)
    assert calls == [([0, 5, 14, 15, 32, 45, 64, 96], 32)]  # row 1 opens mid-document (13 tokens), row 2 is whole
