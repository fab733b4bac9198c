"""`lm2 export`: HF-format folders in InternLM2 layout or in Llama layout (fused wqkv split apart).

The Llama conversion follows InternLM's tools/convert2llama.py (SPEC §2.1, §2.3): `w1→gate_proj`,
`w3→up_proj`, `w2→down_proj`, norms renamed, and `wqkv` rows `(g s d)` split into q (slots < qpk),
k (slot qpk) and v (slot qpk+1). Both directions are exact permutations of rows, so a round trip
returns the same tensors bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import InputError

_RENAMES = [  # internlm2 suffix → llama suffix, per layer
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
]


def split_wqkv(wqkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nkv, qpk, hd, h = cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim, wqkv.shape[-1]
    w = wqkv.view(nkv, qpk + 2, hd, h)
    return (
        w[:, :qpk].reshape(nkv * qpk * hd, h).clone(),
        w[:, qpk].reshape(nkv * hd, h).clone(),
        w[:, qpk + 1].reshape(nkv * hd, h).clone(),
    )


def fuse_wqkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    nkv, qpk, hd, h = cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim, wq.shape[-1]
    q = wq.view(nkv, qpk, hd, h)
    return torch.cat([q, wk.view(nkv, 1, hd, h), wv.view(nkv, 1, hd, h)], dim=1).reshape(-1, h).contiguous()


def to_llama_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {
        "model.embed_tokens.weight": state["model.tok_embeddings.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v = split_wqkv(state[p + "attention.wqkv.weight"], cfg)
        out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"], out[p + "self_attn.v_proj.weight"] = q, k, v
        for src, dst in _RENAMES:
            out[p + dst] = state[p + src]
    return out


def from_llama_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {
        "model.tok_embeddings.weight": state["model.embed_tokens.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "attention.wqkv.weight"] = fuse_wqkv(
            state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"], state[p + "self_attn.v_proj.weight"], cfg
        )
        for src, dst in _RENAMES:
            out[p + src] = state[p + dst]
    return out


def llama_config(cfg: ModelConfig) -> dict:
    rs = cfg.rope_scaling
    rope_scaling = None
    if rs:
        rope_scaling = {k: v for k, v in rs.items() if k != "type"}
        rope_scaling["rope_type"] = rs["type"]
        rope_scaling["type"] = rs["type"]  # older transformers read "type"
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }


def llama_config_to_model_config(raw: dict) -> ModelConfig:
    rs = raw.get("rope_scaling") or None
    if rs is None and isinstance(raw.get("rope_parameters"), dict) and raw["rope_parameters"].get("rope_type") not in (None, "default"):
        rs = raw["rope_parameters"]
    if rs:
        rs = {k: v for k, v in rs.items() if k not in ("rope_type", "rope_theta")} | {"type": rs.get("rope_type", rs.get("type"))}
    theta = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rope_scaling=rs,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        initializer_range=raw.get("initializer_range", 0.02),
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=raw["eos_token_id"][0] if isinstance(raw.get("eos_token_id"), list) else raw.get("eos_token_id", 2),
        pad_token_id=raw.get("pad_token_id") if raw.get("pad_token_id") is not None else 2,
    )


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "internlm2") -> Path:
    """Write an HF-format folder: weights, config.json, generation_config.json and tokenizer files."""
    from safetensors.torch import save_file

    from .layout import staging_dir, write_manifest
    from .model import WEIGHTS, load_model

    if fmt not in ("internlm2", "llama"):
        raise InputError(f"unknown export format {fmt!r}; use internlm2 or llama")
    checkpoint, out = Path(checkpoint), Path(out)
    model = load_model(checkpoint)
    cfg = model.config
    with staging_dir(out) as tmp:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if fmt == "llama":
            save_file(to_llama_state(state, cfg), str(tmp / WEIGHTS), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(llama_config(cfg), indent=2) + "\n")
        else:
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        for extra in checkpoint.iterdir():  # tokenizer + generation config travel with the weights
            if extra.is_file() and extra.name not in (WEIGHTS, "config.json", "manifest.json"):
                shutil.copy2(extra, tmp / extra.name)
        write_manifest(tmp, "checkpoint", config={"format": fmt}, inputs=[checkpoint],
                       stats={"params": model.num_params(), "format": fmt})
    return out
