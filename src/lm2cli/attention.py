"""Scaled dot-product attention for the model, behind one function: `attend(q, k, v, ...)`.

The model says *what* each query may see; this module decides *how* to compute it:

- plain causal rows (and decoding against a KV cache): PyTorch's SDPA, its fused kernels;
- left-padded batches (`mask`, a boolean [B, 1, q, kv]): SDPA with that mask. Those are generation
  batches, short enough that the q×kv mask is not what limits them;
- packed rows (`docs`: several documents per row, each query sees earlier tokens of its own document
  only, SPEC §5.2), whose memory must grow with T, not T²:
    * "flash": FlashAttention-2's varlen kernel over `cu_seqlens` (CUDA, fp16/bf16, when `flash_attn`
      is installed) — what InternLM2 trains with;
    * "flex": FlexAttention with a document block mask (CUDA; compiled once per process). On CPU
      FlexAttention has no backward and needs torch.compile (~30 s on the first call), and forward it
      is no faster than "segments" (bench/packed_attention.py --inference), so it is only used there
      when asked for (`LM2_ATTENTION=flex`, inference only);
    * "segments": causal SDPA once per document segment of each row — exact, memory O(T), any device
      and dtype, with gradients; the CPU path (bench/packed_attention.py measures it against the others);
    * "dense": SDPA with the B×1×T×T block-diagonal causal mask — the old path, a reference only.

`LM2_ATTENTION=flash|flex|segments|dense` forces the packed backend (debugging, benchmarks).
Every backend computes the same function; tests/test_attention.py checks each against "dense".

Public API: `Documents`, `attend`, `packed_backend`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("flash", "flex", "segments", "dense")
FLEX_BLOCK = 128  # FlexAttention's default sparse block size


class Documents:
    """Where the documents of packed rows lie: `doc_ids[b, t]` numbers the document of token t in row b
    (non-decreasing along the row). Built once per forward and shared by every layer, so each derived
    layout (segments, cu_seqlens, block mask) is computed once, on first use."""

    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids
        self._cache: dict = {}

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor) -> "Documents":
        """A new document starts wherever the position resets to 0 (a row may open mid-document)."""
        return cls((position_ids == 0).cumsum(-1))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.doc_ids.shape)

    def segments(self) -> list[list[tuple[int, int]]]:
        """Per row, the [start, end) spans of its documents (one host sync per forward)."""
        if "segments" not in self._cache:
            ids = self.doc_ids
            t = ids.shape[1]
            change = torch.ones_like(ids, dtype=torch.bool)
            change[:, 1:] = ids[:, 1:] != ids[:, :-1]
            rows = []
            for starts in (torch.nonzero(c).flatten().tolist() for c in change.cpu()):
                rows.append(list(zip(starts, starts[1:] + [t])))
            self._cache["segments"] = rows
        return self._cache["segments"]

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """FlashAttention's varlen layout of the B·T flattened tokens: int32 offsets and the longest document."""
        if "cu" not in self._cache:
            b, t = self.shape
            bounds = [r * t + s for r, row in enumerate(self.segments()) for s, _ in row] + [b * t]
            longest = max(e - s for row in self.segments() for s, e in row)
            cu = torch.tensor(bounds, dtype=torch.int32, device=self.doc_ids.device)
            self._cache["cu"] = (cu, longest)
        return self._cache["cu"]

    def dense_mask(self) -> torch.Tensor:
        """The B×1×T×T boolean mask (True = attend): causal and same-document. Quadratic: a reference."""
        if "dense" not in self._cache:
            t = self.shape[1]
            idx = torch.arange(t, device=self.doc_ids.device)
            causal = idx[None, :] <= idx[:, None]
            same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
            self._cache["dense"] = (causal & same)[:, None]
        return self._cache["dense"]

    def block_mask(self):
        """FlexAttention's BlockMask, built from per-block document ranges — O((T/128)²), never the T×T mask
        `create_block_mask` would evaluate uncompiled."""
        if "block" not in self._cache:
            self._cache["block"] = _document_block_mask(self.doc_ids)
        return self._cache["block"]


def _document_block_mask(doc_ids: torch.Tensor, block: int = FLEX_BLOCK):
    from torch.nn.attention.flex_attention import BlockMask

    b, t = doc_ids.shape
    nb = math.ceil(t / block)
    pad = nb * block - t
    padded = F.pad(doc_ids, (0, pad), mode="replicate") if pad else doc_ids
    tiles = padded.view(b, nb, block)
    lo, hi = tiles[..., 0], tiles[..., -1]  # documents are numbered in order along a row
    i = torch.arange(nb, device=doc_ids.device)
    below = i[None, :] <= i[:, None]  # kv block j at or before q block i
    overlap = (lo[:, None, :] <= hi[:, :, None]) & (lo[:, :, None] <= hi[:, None, :])  # [b, q, kv]
    whole = torch.ones(nb, dtype=torch.bool, device=doc_ids.device)
    if pad:
        whole[-1] = False
    one_doc = lo == hi
    full = ((i[None, :] < i[:, None]) & one_doc[:, :, None] & one_doc[:, None, :]
            & (lo[:, :, None] == lo[:, None, :]) & whole[:, None] & whole[None, :])
    partial = below & overlap & ~full

    def ordered(dense: torch.Tensor):
        dense = dense[:, None].to(torch.int32)  # [b, 1 (heads), q blocks, kv blocks]
        return (dense.sum(-1).to(torch.int32),
                torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32))

    def same_document_causal(bi, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[bi, q_idx] == doc_ids[bi, kv_idx])

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block,
                                    mask_mod=same_document_causal, seq_lengths=(t, t))


# ---------------------------------------------------------------------------------------------------
# Backends


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex_attention materialises the scores; compiled it is the fused (block-sparse) kernel.
    return torch.compile(flex_attention, dynamic=False)


def packed_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend `attend` uses for packed rows on this device and dtype (`LM2_ATTENTION` overrides)."""
    forced = os.environ.get("LM2_ATTENTION", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"LM2_ATTENTION={forced!r}: choose one of {', '.join(BACKENDS)}")
        return forced
    if device.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None:
            return "flash"
        return "flex"
    return "segments"


def _sdpa_has_gqa() -> bool:
    """SDPA's `enable_gqa` (torch >= 2.5; lm2 runs on older torch too)."""
    try:
        x = torch.zeros(1, 2, 1, 4)
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
        return True
    except TypeError:
        return False


_SDPA_GQA = _sdpa_has_gqa()


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query head g*qpk+s reads KV head g: repeat the KV heads."""
    qpk = q.shape[1] // k.shape[1]
    if qpk == 1:
        return k, v
    return k.repeat_interleave(qpk, dim=1), v.repeat_interleave(qpk, dim=1)


def _shared_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, in_place: bool):
    """(k, v, SDPA kwargs) for GQA: SDPA reads the shared KV heads in place where that keeps a fused kernel
    (decoding; CPU, where its flash kernel takes `enable_gqa` at the same speed without the qpk× copy),
    else the heads are repeated (CUDA's memory-efficient kernel, used for fp32, has no GQA)."""
    if q.shape[1] == k.shape[1]:
        return k, v, {}
    if in_place and _SDPA_GQA:
        return k, v, {"enable_gqa": True}
    return *_expand_kv(q, k, v), {}


def _segments(q, k, v, docs: Documents) -> torch.Tensor:
    k, v, gqa = _shared_kv(q, k, v, in_place=q.device.type == "cpu")

    def part(r: int, s: int, e: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(q[r:r + 1, :, s:e], k[r:r + 1, :, s:e], v[r:r + 1, :, s:e],
                                              is_causal=True, **gqa)

    spans = docs.segments()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # Training: concatenate (backward splits the gradient once; slice-assignment would copy it per
        # document: 1.5x vs 2.2x causal attention's peak memory at 16k, bench/packed_attention.py).
        return torch.cat([torch.cat([part(r, s, e) for s, e in row], dim=2) for r, row in enumerate(spans)])
    out = torch.empty_like(q)  # inference: each document's output goes straight into its place
    for r, row in enumerate(spans):
        for s, e in row:
            out[r:r + 1, :, s:e] = part(r, s, e)
    return out


def _flash(q, k, v, docs: Documents) -> torch.Tensor:
    b, h, t, d = q.shape
    cu, longest = docs.cu_seqlens()
    flat = lambda x: x.transpose(1, 2).reshape(b * t, x.shape[1], d)  # noqa: E731 — [B·T, heads, d]
    out = _flash_varlen()(flat(q), flat(k), flat(v), cu, cu, longest, longest, causal=True)  # GQA native
    return out.view(b, t, h, d).transpose(1, 2)


def _flex(q, k, v, docs: Documents) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    return _compiled_flex()(q, k, v, block_mask=docs.block_mask(), enable_gqa=gqa)


def _dense(q, k, v, docs: Documents) -> torch.Tensor:
    k, v = _expand_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.dense_mask())


_PACKED = {"flash": _flash, "flex": _flex, "segments": _segments, "dense": _dense}


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    mask: Optional[torch.Tensor] = None,
    docs: Optional[Documents] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v for q [B, H, Tq, d] and k, v [B, Hkv, Tkv, d] (H a multiple of Hkv), → [B, H, Tq, d].

    Who sees whom, in order of precedence: `docs` (packed rows: causal within each document, Tq == Tkv),
    `mask` (boolean [B, 1, Tq, Tkv], True = attend), else `causal` (the last Tq keys are the queries';
    with Tq == 1 against a cache pass causal=False: the new token sees every key). `backend` forces a
    packed backend (see `packed_backend`).
    """
    if docs is not None:
        return _PACKED[backend or packed_backend(q.device, q.dtype)](q, k, v, docs)
    tq, tkv = q.shape[2], k.shape[2]
    if mask is None and causal and 1 < tq < tkv:  # queries after cached keys: SDPA's is_causal aligns top-left
        idx = torch.arange(tkv, device=q.device)
        mask, causal = (idx[None, :] <= idx[tkv - tq:, None])[None, None], False
    # Decoding reads the shared KV heads in place instead of copying the whole cache qpk times every step.
    k, v, gqa = _shared_kv(q, k, v, in_place=tkv > tq or q.device.type == "cpu")
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and tq > 1, **gqa)
