"""The InternLM2 architecture in one file (SPEC §2), with HuggingFace-InternLM2 module names.

Pre-norm blocks `h = x + Attn(RMSNorm(x))`, `x' = h + SwiGLU(RMSNorm(h))`, a final RMSNorm and an
untied output head. Queries, keys and values come from one fused `wqkv` whose rows follow the
InternLM2 interleaved layout `(g s d)`: for KV group g, slots 0..qpk-1 are its query heads, slot qpk
its key and slot qpk+1 its value (SPEC §2.3). RoPE uses half rotation; its base can be changed per
stage, stretched linearly, extended with YaRN, or scaled by dynamic NTK at inference, where the
effective base is computed from each call's length (never cached across calls, SPEC P5).

Packed samples: when `position_ids` are given, a new document starts wherever the position resets
to 0, and attention stays inside each document (SPEC §5.2, P11); `attention.attend` computes that
without a T×T mask.

Public API: `InternLM2(cfg)`, `KVCache`, `rope_inv_freq`, `effective_rope_base`. Checkpoint formats
(HF InternLM2 / Llama folders, GGUF) live in `convert.py`; this file knows none.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Documents, attend
from .config import ModelConfig
from .errors import InputError
from .train.loss import linear_cross_entropy

# ---------------------------------------------------------------------------------------------------
# RoPE


def effective_rope_base(cfg: ModelConfig, seq_len: int) -> float:
    """The base actually used for a sequence of `seq_len` tokens (dynamic NTK raises it past L_max)."""
    base = float(cfg.rope_theta)
    rs = cfg.rope_scaling or {}
    if rs.get("type") == "dynamic":
        f = float(rs.get("factor", 1.0))
        l_max = int(rs.get("original_max_position_embeddings", cfg.max_position_embeddings))
        if seq_len > l_max:
            d = cfg.head_dim
            base = base * ((f * seq_len / l_max) - (f - 1)) ** (d / (d - 2))
    return base


def _yarn_inv_freq(cfg: ModelConfig, device) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, blend in between."""
    rs = cfg.rope_scaling
    d, base = cfg.head_dim, float(cfg.rope_theta)
    factor = float(rs.get("factor", 1.0))
    orig = int(rs.get("original_max_position_embeddings", cfg.max_position_embeddings))
    beta_fast, beta_slow = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))

    def correction_dim(n_rot: float) -> float:
        return d * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = (torch.arange(d // 2, dtype=torch.float64, device=device) - low) / max(high - low, 1e-3)
    keep = 1.0 - ramp.clamp(0, 1)  # 1 = extrapolate (high frequency), 0 = interpolate
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    mscale = float(rs.get("attention_factor", 0.1 * math.log(factor) + 1.0)) if factor > 1 else 1.0
    return inv_freq.float(), mscale


def rope_inv_freq(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, float, float]:
    """(inv_freq, position scale, cos/sin scale) for a call covering positions < seq_len."""
    rs = cfg.rope_scaling or {}
    kind = rs.get("type")
    if kind == "yarn":
        inv_freq, mscale = _yarn_inv_freq(cfg, device)
        return inv_freq, 1.0, mscale
    base = effective_rope_base(cfg, seq_len)
    d = cfg.head_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    pos_scale = 1.0 / float(rs.get("factor", 1.0)) if kind == "linear" else 1.0
    return inv_freq.float(), pos_scale, 1.0


def rope_cos_sin(cfg: ModelConfig, position_ids: torch.Tensor, seq_len: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq, pos_scale, mscale = rope_inv_freq(cfg, seq_len, position_ids.device)
    t = position_ids.float() * pos_scale  # [B, T]
    freqs = t[..., None] * inv_freq  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # half rotation pairs i with i + d/2
    return (emb.cos() * mscale).to(dtype)[:, None], (emb.sin() * mscale).to(dtype)[:, None]  # [B, 1, T, d]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 whatever the activation dtype (SPEC §2.1).
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * y).to(x.dtype)


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding.

    All rows of a batch share one write position; left padding is handled by the attention mask.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise InputError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only (or permute) batch rows, e.g. to drop finished sequences."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.nh, self.nkv, self.hd, self.qpk = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.q_per_kv
        self.wqkv = nn.Linear(cfg.hidden_size, self.nkv * (self.qpk + 2) * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, span: dict, cache: Optional[KVCache]):
        """`span`: who sees whom, as `attend`'s keyword arguments (see `_attention_span`)."""
        b, t, _ = x.shape
        qkv = self.wqkv(x).view(b, t, self.nkv, self.qpk + 2, self.hd)
        q = qkv[..., : self.qpk, :].reshape(b, t, self.nh, self.hd).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)  # [b, nkv, t, hd]
        v = qkv[..., -1, :].transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, **span)  # query head g*qpk+s reads KV head g
        return self.wo(out.transpose(1, 2).reshape(b, t, self.nh * self.hd))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attention = Attention(cfg, layer_idx)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, span, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, span, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class InternLM2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def _attention_span(position_ids, attention_mask, q_len: int, kv_len: int, packed: bool, device) -> dict:
    """Who each query sees, as `attend`'s keyword arguments: causal (with or without a cache), packed
    documents (never a T×T mask: the backend decides), or a boolean [B, 1, q, kv] mask for left padding."""
    if packed:
        return {"docs": Documents.from_positions(position_ids)}  # needs q_len == kv_len (no cache)
    if attention_mask is None:
        return {"causal": True}
    past = kv_len - q_len
    q_idx = torch.arange(past, kv_len, device=device)[:, None]
    k_idx = torch.arange(kv_len, device=device)[None, :]
    mask = (k_idx <= q_idx)[None, None]  # [1, 1, q, kv]
    mask = mask & attention_mask[:, None, None, :kv_len].bool()
    # A fully masked row (a left-pad query) would give NaN in softmax; let every query see itself.
    return {"mask": mask | (k_idx == q_idx)[None, None]}


class OutputHead(nn.Linear):
    """The untied output head. Given labels it returns the summed cross-entropy instead of the logits,
    computed a chunk of tokens at a time (train/loss.py) inside this module's forward, so that ZeRO-3
    gathers and releases the weight around it as for any Linear."""

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        return linear_cross_entropy(h, self.weight, labels)


class InternLM2(nn.Module):
    """InternLM2ForCausalLM: `model.*` (embeddings, layers, norm) and the untied `output` head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise InputError("model.vocab_size must be set (the tokenizer's vocab size) before building a model")
        self.config = cfg
        self.model = InternLM2Model(cfg)
        self.output = OutputHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """InternEvo init of every parameter (see `init_weight`), drawn in `named_parameters` order."""
        for name, p in self.named_parameters():
            self.init_weight(name, p, generator)

    @torch.no_grad()
    def init_weight(self, name: str, tensor: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        """Fill `tensor` as parameter `name`'s init: N(0, std), wo/w2 scaled by 1/sqrt(2(layer+1)), norms
        ones (SPEC §2.5). Separate from the parameter itself so that a sharded model (ZeRO-3) can draw
        each whole tensor on the host and keep its slice (`train.engine.init_weights`)."""
        std = self.config.initializer_range
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            layer = int(name.split(".")[2])
            tensor.normal_(0.0, std / math.sqrt(2.0 * (layer + 1)), generator=generator)
        else:
            tensor.normal_(0.0, std, generator=generator)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        return_hidden: bool = False,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits [B, T, V]; the final hidden states with `return_hidden`; with `labels` (next-token ids,
        -100 where nothing is predicted) the summed cross-entropy, an fp32 scalar, without the full logits."""
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        kv_len = past + t
        packed = position_ids is not None and cache is None and attention_mask is None
        if position_ids is None:
            if attention_mask is not None:
                pos_all = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = pos_all[:, past:kv_len]
            else:
                position_ids = torch.arange(past, kv_len, device=input_ids.device)[None].expand(b, t)
        elif packed and not bool((position_ids[:, 1:] == 0).any()):
            packed = False  # one document per row: plain causal attention
        h = self.model.tok_embeddings(input_ids)
        # Dynamic NTK's base depends on the length this call reaches, recomputed every call (SPEC P5).
        # Only that mode needs the (device-syncing) max position.
        dynamic = (self.config.rope_scaling or {}).get("type") == "dynamic"
        span = int(position_ids.max().item()) + 1 if dynamic else kv_len
        cos, sin = rope_cos_sin(self.config, position_ids, span, h.dtype)
        span = _attention_span(position_ids, attention_mask, t, kv_len, packed, input_ids.device)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, span, use_reentrant=False)
            else:
                h = layer(h, cos, sin, span, cache)
        if cache is not None:
            cache.length = kv_len
        h = self.model.norm(h)
        if labels is not None:
            return self.output(h, labels)
        return h if return_hidden else self.output(h)

    # -- accounting ------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        # ds_numel: a ZeRO-3 partitioned parameter's whole size (its local tensor is a slice or empty)
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        emb = self.model.tok_embeddings.weight
        return n - getattr(emb, "ds_numel", emb.numel()) if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·(matmul params) + 12·L·H·T for attention (PaLM appendix B)."""
        c = self.config
        return 6.0 * self.num_params(non_embedding=True) + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len
