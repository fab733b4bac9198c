# Written by lm2 (lm2cli/hf/) beside every InternLM2 model folder it saves, so that
# `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` runs the model without lm2 installed.
# Same math as `lm2cli.model` (tests compare logits to 1e-4 in fp32); parameter names are the released
# InternLM2 models', so released checkpoints load here too.
"""InternLM2 for transformers: fused interleaved `wqkv`, GQA, RMSNorm, SwiGLU, RoPE (plain, linear, dynamic NTK).

`wqkv` rows follow InternLM2's `(g s d)` layout: for KV group g, slots 0..q_per_kv-1 are its query heads,
slot q_per_kv its key and the last slot its value. RoPE rotates halves (`rotate_half`). Dynamic NTK
computes the base from the length each call reaches (never cached across calls), as lm2 does.
Works with transformers 4.44+ (`past_key_values`) and 5.x (`cache`).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers import GenerationMixin
except ImportError:  # transformers < 4.45: PreTrainedModel is already generative
    GenerationMixin = object

from .configuration_internlm2 import InternLM2Config

# transformers 5 names the KV cache `cache`; 4.x names it `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rope_cos_sin(config, position_ids, dtype):
    """cos/sin [B, 1, T, head_dim] for these positions; the base depends on the call's reach (dynamic NTK)."""
    d = config.hidden_size // config.num_attention_heads
    base = float(config.rope_theta)
    rs = config.rope_scaling or {}
    kind, factor = rs.get("type"), float(rs.get("factor", 1.0))
    if kind == "dynamic":
        span = int(position_ids.max().item()) + 1
        l_max = config.max_position_embeddings
        if span > l_max:
            base = base * ((factor * span / l_max) - (factor - 1)) ** (d / (d - 2))
    exponent = torch.arange(0, d, 2, dtype=torch.float64, device=position_ids.device) / d
    inv_freq = (1.0 / (base**exponent)).float()
    t = position_ids.float() * (1.0 / factor if kind == "linear" else 1.0)
    freqs = t[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class InternLM2RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.float() * y).to(x.dtype)


class InternLM2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_per_kv = self.num_heads // self.num_key_value_heads
        qkv_rows = self.num_key_value_heads * (self.q_per_kv + 2) * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, qkv_rows, bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, x, cos, sin, mask, cache):
        b, t, _ = x.shape
        qkv = self.wqkv(x).view(b, t, self.num_key_value_heads, self.q_per_kv + 2, self.head_dim)
        q = qkv[..., : self.q_per_kv, :].reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.q_per_kv > 1:  # query head g*q_per_kv+s reads KV head g
            k = k.repeat_interleave(self.q_per_kv, dim=1)
            v = v.repeat_interleave(self.q_per_kv, dim=1)
        if isinstance(mask, str):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


def attention_mask_4d(attention_mask, q_len, kv_len, device):
    """Boolean [B, 1, q, kv] (True = attend), "causal" when plain causal attention suffices, or None."""
    past = kv_len - q_len
    if attention_mask is None:
        if past == 0:
            return "causal"
        if q_len == 1:
            return None
    q_idx = torch.arange(past, kv_len, device=device)[:, None]
    k_idx = torch.arange(kv_len, device=device)[None, :]
    mask = (k_idx <= q_idx)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :kv_len].bool()
    # A fully masked row (a left-pad query) would give NaN in softmax; let every query see itself.
    return mask | (k_idx == q_idx)[None, None]


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]  # noqa: RUF012 (transformers reads these lists)
    _skip_keys_device_placement = ["past_key_values", "cache"]  # noqa: RUF012
    _supports_cache_class = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, InternLM2RMSNorm):
            module.weight.fill_(1.0)


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None):
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        kv_len = past + t
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:kv_len]
            else:
                position_ids = torch.arange(past, kv_len, device=h.device)[None].expand(b, t)
        cos, sin = rope_cos_sin(self.config, position_ids, h.dtype)
        if attention_mask is not None and bool(attention_mask[:, :kv_len].all()):
            attention_mask = None
        mask = attention_mask_4d(attention_mask, t, kv_len, h.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, None, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache)
        return self.norm(h), cache


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    """InternLM2 with its untied `output` head (`model.*` holds embeddings, layers, norm)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, new_embeddings):
        self.output = new_embeddings

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, return_dict=None, logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values
        if isinstance(cache, (tuple, list)):
            raise TypeError("pass the KV cache as a transformers Cache object (e.g. DynamicCache), not tuples")
        hidden, cache = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.output(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      cache=None, use_cache=True, **kwargs):
        """Only the tokens the cache has not seen; positions come from the attention mask in `forward`."""
        cache = cache if cache is not None else past_key_values
        if isinstance(cache, Cache) and cache.get_seq_length() > 0:
            input_ids = input_ids[:, cache.get_seq_length():]
            inputs_embeds = None
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, _CACHE_FIELD: cache}
        if inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids
        return inputs

