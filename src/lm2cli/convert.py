"""Every model format lm2 reads or writes: HF InternLM2 folders, HF Llama folders, GGUF (SPEC §2.1, §2.3).

The model file (`model.py`) knows no format; this module maps between lm2's parameter names (those of
the released InternLM2 models) and the others', one table per format, with the layout fixes beside
the table: the fused `wqkv` split into q/k/v for Llama, and llama.cpp's q/k row permutation for GGUF.

* **Reading** (`read_config`, `load_model`): an lm2 `final/` or checkpoint, an `lm2 export`, or a
  released InternLM2 / Llama HF folder: one `model.safetensors` or shards listed in
  `model.safetensors.index.json`, any float dtype, `rope_scaling` in the released `{type, factor}`
  form or transformers 5's `rope_parameters`. Tensors stream shard by shard into the model (no second
  full copy). PyTorch pickles (`*.bin`, `*.pth`) are refused by name, never unpickled.
  Dtype: `dtype=None` means fp32 on CPU (what lm2's training and eval code expects there) and the
  checkpoint's own dtype (e.g. bf16) on a GPU.
* **Writing** (`save_model`, `export_checkpoint`): a complete HF folder. InternLM2 layout: config.json
  with `auto_map` and the `configuration_internlm2.py` / `modeling_internlm2.py` lm2 ships (`lm2cli/hf/`),
  so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs it; Llama layout for
  `LlamaForCausalLM`. Both carry generation_config.json (stop on `</s>` and `<|im_end|>`), lm2's
  tokenizer files and the HF tokenizer files. Optional bf16/fp16 and shards with an index.
* **GGUF** (`write_gguf`): llama.cpp's `internlm2` architecture with its tensor names, f32/f16/bf16
  tensors; lm2's tiktoken vocabularies as byte-level BPE with merges and the cl100k pre-tokenizer,
  SentencePiece ones (released InternLM2) as llama.cpp's "llama" vocabulary with scores.

RoPE in the InternLM2 config: the released config class accepts only `{"type": "linear"|"dynamic",
"factor": f}`, and its dynamic NTK starts past `max_position_embeddings`. lm2's dynamic NTK may start
at an `original_max_position_embeddings` below the model's context (after `extend-context --method
dynamic`): config.json then carries that threshold as `max_position_embeddings` (the exact math) and
lm2's context length as `lm2_max_position_embeddings`. YaRN has no InternLM2 form: export it as Llama
or GGUF (a `final/` trained with YaRN keeps lm2's rope_scaling and is readable by lm2 only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import InputError, Lm2Error
from .model import InternLM2

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
HF_CODE_DIR = Path(__file__).parent / "hf"
HF_CODE = ("configuration_internlm2.py", "modeling_internlm2.py")
AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
FORMATS = ("internlm2", "llama", "gguf")
DTYPES = {"f32": torch.float32, "float32": torch.float32, "fp32": torch.float32, "f16": torch.float16,
          "float16": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# ---------------------------------------------------------------------------------------------------
# Name tables: lm2 (= released InternLM2) name -> the other format's name; "{i}" is the layer index.
# `attention.wqkv` is absent from both: it is split (and for GGUF permuted) by the functions below.

LLAMA_NAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "model.layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
}
LLAMA_QKV = ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
             "model.layers.{i}.self_attn.v_proj.weight")
FROM_LLAMA = {v: k for k, v in LLAMA_NAMES.items()}

GGUF_NAMES = {  # llama.cpp's MODEL_ARCH.INTERNLM2 tensor names
    "model.tok_embeddings.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "model.layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
}
GGUF_QKV = ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight")
WQKV = "model.layers.{i}.attention.wqkv.weight"

_LAYER = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, int | None]:
    """"model.layers.3.ffn_norm.weight" -> ("model.layers.{i}.ffn_norm.weight", 3)."""
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return name[: m.start()] + ".{i}." + name[m.end():], int(m.group(1))


def split_wqkv(wqkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused rows `(g s d)` (slots: q_per_kv queries, then k, then v per KV group g) -> q, k, v."""
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


def gguf_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-rotation q/k rows -> llama.cpp's adjacent-pair rotation (its convert_hf_to_gguf `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _renamed(state: dict[str, torch.Tensor], cfg: ModelConfig, names: dict, qkv: tuple, permute: bool = False
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """lm2's state dict under another format's names, `wqkv` split (and permuted for llama.cpp)."""
    for name, tensor in state.items():
        tmpl, i = _template(name)
        if tmpl == WQKV:
            q, k, v = split_wqkv(tensor, cfg)
            if permute:
                q, k = gguf_permute(q, cfg.num_attention_heads), gguf_permute(k, cfg.num_key_value_heads)
            for out_tmpl, t in zip(qkv, (q, k, v)):
                yield out_tmpl.format(i=i), t
        elif tmpl in names:
            yield names[tmpl].format(i=i), tensor
        else:
            raise Lm2Error(f"no conversion for parameter {name!r}")


def to_llama_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(_renamed(state, cfg, LLAMA_NAMES, LLAMA_QKV))


def from_llama_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(_from_llama(iter(state.items()), cfg))


def _from_llama(items: Iterator[tuple[str, torch.Tensor]], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Llama names -> lm2 names as tensors stream in; q/k/v are fused once a layer has all three."""
    pending: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in items:
        tmpl, i = _template(name)
        if tmpl.endswith("rotary_emb.inv_freq"):  # old Llama checkpoints saved this buffer
            continue
        if tmpl in LLAMA_QKV:
            got = pending.setdefault(i, {})
            got[tmpl] = tensor
            if len(got) == 3:
                yield WQKV.format(i=i), fuse_wqkv(*(got[t] for t in LLAMA_QKV), cfg)
                del pending[i]
        elif tmpl in FROM_LLAMA:
            yield FROM_LLAMA[tmpl].format(i=i), tensor
        else:
            yield name, tensor  # reported as unexpected by the loader
    if pending:
        raise InputError(f"Llama checkpoint lacks q/k/v projections for layers {sorted(pending)}")


# ---------------------------------------------------------------------------------------------------
# config.json, both directions


def _rope_from_hf(raw: dict) -> dict | None:
    """lm2's rope_scaling from `rope_scaling` ({type|rope_type, factor, ...}) or transformers 5's `rope_parameters`."""
    rs = raw.get("rope_scaling") or None
    params = raw.get("rope_parameters")
    if rs is None and isinstance(params, dict) and params.get("rope_type") not in (None, "default"):
        rs = params
    if not rs:
        return None
    kind = rs.get("type") or rs.get("rope_type")
    if kind in (None, "default"):
        return None
    return {k: v for k, v in rs.items() if k not in ("type", "rope_type", "rope_theta")} | {"type": kind}


def _rope_theta(raw: dict) -> float:
    return float(raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def _first_id(value, default: int) -> int:
    if isinstance(value, list):
        return int(value[0]) if value else default
    return default if value is None else int(value)


def model_config_from_hf(raw: dict, model_type: str) -> ModelConfig:
    """An InternLM2 or Llama config.json (released, lm2's, or transformers 5-saved) -> ModelConfig."""
    heads = raw["num_attention_heads"]
    if model_type == "llama":
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise InputError("this Llama checkpoint has bias terms; lm2's InternLM2 has none")
        if raw.get("head_dim") not in (None, raw["hidden_size"] // heads):
            raise InputError(f"head_dim {raw['head_dim']} != hidden_size / num_attention_heads: not an InternLM2 shape")
        if raw.get("tie_word_embeddings"):
            raise InputError("this Llama checkpoint ties input and output embeddings; InternLM2's are separate")
    elif raw.get("bias"):
        raise InputError("this InternLM2 checkpoint has bias terms (bias: true); lm2's InternLM2 has none")
    rs = _rope_from_hf(raw)
    max_pos = int(raw.get("max_position_embeddings", 2048))
    if raw.get("lm2_max_position_embeddings") and rs and rs.get("type") == "dynamic":
        rs["original_max_position_embeddings"] = max_pos
        max_pos = int(raw["lm2_max_position_embeddings"])
    eos = _first_id(raw.get("eos_token_id"), 2)
    return ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        max_position_embeddings=max_pos,
        rope_theta=_rope_theta(raw),
        rope_scaling=rs,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        initializer_range=raw.get("initializer_range", 0.02),
        bos_token_id=_first_id(raw.get("bos_token_id"), 1),
        eos_token_id=eos,
        pad_token_id=_first_id(raw.get("pad_token_id"), eos),
    )


def internlm2_rope(cfg: ModelConfig) -> tuple[dict | None, int]:
    """(rope_scaling, max_position_embeddings) in the released InternLM2 form; YaRN is refused."""
    rs = cfg.rope_scaling
    if not rs:
        return None, cfg.max_position_embeddings
    if rs["type"] == "yarn":
        raise InputError("YaRN RoPE has no InternLM2 config form (its rope_scaling takes only linear or dynamic); "
                         "export with --format llama or --format gguf")
    threshold = cfg.max_position_embeddings
    if rs["type"] == "dynamic":
        threshold = int(rs.get("original_max_position_embeddings", threshold))
    return {"type": rs["type"], "factor": float(rs.get("factor", 1.0))}, threshold


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def internlm2_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of a complete HF InternLM2 folder (released keys + `auto_map` to lm2's shipped code)."""
    rope_scaling, max_pos = internlm2_rope(cfg)
    out = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": AUTO_MAP,
        "model_type": "internlm2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "attn_implementation": "eager",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": _dtype_name(dtype),
    }
    if max_pos != cfg.max_position_embeddings:
        out["lm2_max_position_embeddings"] = cfg.max_position_embeddings
    return out


def _lm2_only_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """A YaRN model's config.json: InternLM2 keys with lm2's own rope_scaling, no `auto_map`."""
    return dataclasses.asdict(cfg) | {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
                                      "bias": False, "hidden_act": "silu", "tie_word_embeddings": False,
                                      "torch_dtype": _dtype_name(dtype)}


def llama_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for `LlamaForCausalLM`. transformers' dynamic NTK starts past `max_position_embeddings`
    (it ignores `original_max_position_embeddings`), so a lower threshold travels as in `internlm2_config`."""
    rs = cfg.rope_scaling
    rope_scaling, max_pos = None, cfg.max_position_embeddings
    if rs and rs["type"] == "dynamic":
        rope_scaling, max_pos = internlm2_rope(cfg)
        rope_scaling = {"rope_type": "dynamic", "type": "dynamic", "factor": rope_scaling["factor"]}
    elif rs:
        rope_scaling = {k: v for k, v in rs.items() if k != "type"} | {"rope_type": rs["type"], "type": rs["type"]}
    extra = {"lm2_max_position_embeddings": cfg.max_position_embeddings} if max_pos != cfg.max_position_embeddings else {}
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
        "max_position_embeddings": max_pos,
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
        "torch_dtype": _dtype_name(dtype),
    } | extra


ARCHITECTURES = {"InternLM2ForCausalLM": "internlm2", "LlamaForCausalLM": "llama"}


def model_type_of(raw: dict) -> str:
    """The layout the weights follow: the architecture names it (some InternLM2 folders, early chat
    mirrors among them, say `model_type: "internlm"` beside `InternLM2ForCausalLM`), else `model_type`."""
    for arch in raw.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    return raw.get("model_type", "internlm2")


def folder_model_type(folder: str | Path) -> str:
    """`model_type_of` a folder's config.json ("internlm2" for a folder without one: lm2's own layout)."""
    cfg = Path(folder) / "config.json"
    return model_type_of(json.loads(cfg.read_text())) if cfg.is_file() else "internlm2"


def read_config(path: str | Path) -> tuple[ModelConfig, str]:
    """(config, "internlm2" | "llama") of a model folder."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise InputError(f"{path} is not a model checkpoint (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_file} is not valid JSON: {e}") from None
    model_type = model_type_of(raw)
    if model_type not in ("internlm2", "llama"):
        raise InputError(f"{path} holds a {model_type!r} model ({', '.join(raw.get('architectures') or [])}); "
                         "lm2 loads InternLM2ForCausalLM or LlamaForCausalLM checkpoints")
    try:
        return model_config_from_hf(raw, model_type), model_type
    except KeyError as e:
        raise InputError(f"{cfg_file} lacks {e.args[0]!r}") from None


# ---------------------------------------------------------------------------------------------------
# Reading weights


def pickle_files(path: Path) -> list[str]:
    return sorted(p.name for p in Path(path).iterdir() if p.suffix in (".bin", ".pth", ".pt") and p.is_file())


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a model folder, in index order; pickles are refused by name."""
    path = Path(path)
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise InputError(f"{path / INDEX} is unreadable ({e})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{path} lacks shards {missing[:3]} listed in {INDEX} (an incomplete download?)")
        return files
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    pickles = pickle_files(path) if path.is_dir() else []
    if pickles:
        raise InputError(
            f"{path} holds PyTorch pickles ({', '.join(pickles[:3])}), which lm2 never loads (unpickling runs code); "
            f"convert once: python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}', trust_remote_code=True, torch_dtype='auto')"
            f".save_pretrained('{path}-st', safe_serialization=True)\" and copy the tokenizer files into {path}-st")
    raise InputError(f"{path} has no {WEIGHTS} (nor {INDEX})")


def _stream_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, handle.get_tensor(name)
        except (OSError, RuntimeError, SafetensorError) as e:  # a truncated or foreign file
            raise InputError(f"{f} is unreadable ({e}); the checkpoint is corrupt or partial") from None


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype config.json records (`torch_dtype`, or transformers 5's `dtype`); fp32 if none."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    return DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype") or "float32"), torch.float32)


def load_model(path: str | Path, dtype: torch.dtype | None = None, device=None, **config_overrides) -> InternLM2:
    """Any lm2 checkpoint, `final/`, `lm2 export` or released InternLM2 / Llama HF folder -> `InternLM2` (eval mode).

    `dtype=None`: fp32 on CPU, the checkpoint's dtype on a GPU. `config_overrides` (e.g.
    `rope_scaling={"type": "dynamic", "factor": 2.0}`) change the config before the weights load:
    inference-time settings only.
    """
    path = Path(path)
    cfg, model_type = read_config(path)
    files = weight_files(path)
    if config_overrides:
        cfg = dataclasses.replace(cfg, **config_overrides)
    device = torch.device(device or "cpu")
    if dtype is None:
        dtype = checkpoint_dtype(path) if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = InternLM2(cfg)
    model = model.to(dtype).to_empty(device=device)
    params = dict(model.named_parameters())
    tensors = _stream_tensors(files)
    if model_type == "llama":
        tensors = _from_llama(tensors, cfg)
    filled, unexpected = set(), []
    with torch.no_grad():
        for name, tensor in tensors:
            p = params.get(name)
            if p is None:
                unexpected.append(name)
                continue
            if p.shape != tensor.shape:
                raise InputError(f"{path}: {name} has shape {tuple(tensor.shape)}, the config implies {tuple(p.shape)}")
            p.copy_(tensor)
            filled.add(name)
    missing = sorted(set(params) - filled)
    if missing or unexpected:
        raise InputError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Writing HF folders


def parse_size(size: int | str | None) -> int | None:
    """5_000_000, "5GB", "200MB", "64KB" -> bytes (decimal units, as transformers)."""
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(size).upper())
    if not m:
        raise InputError(f"shard size {size!r} is not a size like 5GB or 500MB")
    unit = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}[m.group(2)]
    return int(float(m.group(1)) * unit)


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype, max_shard_size: int | None) -> None:
    """One `model.safetensors`, or shards + index when they exceed `max_shard_size` bytes."""
    from safetensors.torch import save_file

    for stale in [*path.glob("model*.safetensors"), path / INDEX]:  # an earlier save's shards must not mix in
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * itemsize
        if max_shard_size and shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    def materialise(names):
        return {n: tensors[n].detach().to("cpu", dtype).contiguous() for n in names}

    if len(shards) == 1:
        save_file(materialise(shards[0]), str(path / WEIGHTS), metadata=meta)
        return
    weight_map, total = {}, 0
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        part = materialise(names)
        save_file(part, str(path / fname), metadata=meta)
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update(dict.fromkeys(names, fname))
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _model_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    return next(iter(state.values())).dtype if state else torch.float32


def write_model_files(path: Path, config: dict, cfg: ModelConfig, stop_ids) -> None:
    """An HF model folder but its weights and tokenizer: config.json, generation_config.json (stopping on
    `stop_ids`) and, where the config's `auto_map` points at it, lm2's InternLM2 modeling code."""
    if "auto_map" in config:
        for name in HF_CODE:
            shutil.copyfile(HF_CODE_DIR / name, path / name)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(stop_ids), "pad_token_id": cfg.pad_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def save_model(model, path: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
               max_shard_size: int | str | None = None, fmt: str = "internlm2") -> Path:
    """Write `model` (anything with `config` and `state_dict()`) as a complete HF folder.

    `fmt`: "internlm2" (fused wqkv, lm2's shipped modeling code) or "llama". `dtype` casts the weights
    (default: as they are); `max_shard_size` ("5GB", bytes) splits them into shards with an index.
    The folder gets config.json, generation_config.json and, given a tokenizer, its files.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = model.state_dict()
    dtype = dtype or _model_dtype(state)
    if fmt == "llama":
        state = to_llama_state(state, cfg)
        config = llama_config(cfg, dtype)
    elif fmt == "internlm2":
        yarn = (cfg.rope_scaling or {}).get("type") == "yarn"
        config = _lm2_only_config(cfg, dtype) if yarn else internlm2_config(cfg, dtype)
    else:
        raise InputError(f"unknown HF folder format {fmt!r}; use internlm2 or llama")
    _write_weights(path, state, dtype, parse_size(max_shard_size))
    write_model_files(path, config, cfg, tokenizer.stop_ids if tokenizer is not None else [cfg.eos_token_id])
    if tokenizer is not None:  # lm2's own files and the HF ones (tokenizer.json, chat template, ...)
        tokenizer.save(path)
    return path


# ---------------------------------------------------------------------------------------------------
# GGUF (llama.cpp)


def bpe_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a tiktoken-backend tokenizer in GGUF's byte-level BPE form.

    Tokens are GPT-2 byte strings at lm2's ids; merges are every split of a token into two tokens, by
    rank (`tokenizer.bpe_merges`, the same list tokenizer.json carries), so llama.cpp's merge-rank
    BPE joins the same pairs as tiktoken.
    """
    import gguf

    from .tokenizer import bpe_merges
    from .tokenizer.hf import bytes_to_unicode

    to_str = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_str[x] for x in b)

    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for tok_bytes, i in tokenizer.mergeable_ranks.items():
        tokens[i], types[i] = text(tok_bytes), gguf.TokenType.NORMAL
    for name, i in tokenizer.special_tokens.items():
        # Spares stay unused, as llama.cpp's InternLM2 converter marks `[UNUSED_TOKEN_*]`.
        tokens[i] = name
        types[i] = gguf.TokenType.UNUSED if name.startswith("[UNUSED") else gguf.TokenType.CONTROL
    merges = [f"{text(a)} {text(b)}" for a, b in bpe_merges(tokenizer)]
    return tokens, [int(t) for t in types], merges


def spm_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a SentencePiece tokenizer as llama.cpp's "llama" vocabulary, as its
    InternLM2 converter builds it: pieces with scores, byte/unknown/control types, `[UNUSED_TOKEN_*]`
    unused, and the chat specials renamed at their ids."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_bytes)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for i in range(min(sp.get_piece_size(), n_vocab)):
        piece = sp.id_to_piece(i)
        tokens[i], scores[i] = piece, sp.get_score(i)
        if sp.is_unknown(i):
            types[i] = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            types[i] = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            types[i] = gguf.TokenType.BYTE
        elif sp.is_unused(i) or piece.startswith("[UNUSED"):
            types[i] = gguf.TokenType.UNUSED
        else:
            types[i] = gguf.TokenType.NORMAL
    for name, i in tokenizer.special_tokens.items():
        if name.startswith("[UNUSED"):
            types[i] = gguf.TokenType.UNUSED
        elif name != tokens[i] or types[i] != gguf.TokenType.UNKNOWN:
            tokens[i], scores[i], types[i] = name, -1000.0, gguf.TokenType.CONTROL
    return tokens, scores, [int(t) for t in types]


def gguf_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tiktoken tokenizer's split regex."""
    from .tokenizer import CL100K_PAT, SPLIT_DIGITS_PAT

    if tokenizer.pat_str == CL100K_PAT:
        return "dbrx"  # DBRX ships cl100k: llama.cpp splits with the same regex (digit runs of 1..3)
    if tokenizer.pat_str == SPLIT_DIGITS_PAT:
        return "qwen2"  # cl100k's regex with one digit per pre-token
    raise InputError("no llama.cpp pre-tokenizer matches this tokenizer's split regex; GGUF export needs cl100k's "
                     "(with or without split digits)")


def _gguf_vocab(w, tokenizer, n_vocab: int) -> None:
    from .tokenizer import chat_template

    if tokenizer.backend == "tiktoken":
        tokens, types, merges = bpe_vocab(tokenizer, n_vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(gguf_pre_tokenizer(tokenizer))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    elif tokenizer.backend == "sentencepiece":
        tokens, scores, types = spm_vocab(tokenizer, n_vocab)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(bool(tokenizer.proto_spec["add_dummy_prefix"]))
    else:
        raise InputError(f"GGUF export has no vocabulary form for a {tokenizer.backend!r} tokenizer")
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_unk_token_id(tokenizer.unk_id)
    w.add_eot_token_id(tokenizer.im_end_id)  # chat turns end in <|im_end|>: llama.cpp stops on it too
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template())


def _gguf_rope(writer, cfg: ModelConfig) -> int:
    """Write RoPE settings; returns the context length to record."""
    import gguf

    rs = cfg.rope_scaling or {}
    kind = rs.get("type")
    ctx = cfg.max_position_embeddings
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rs["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rs["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rs.get("original_max_position_embeddings", ctx)))
    elif kind == "dynamic":
        # llama.cpp has no dynamic NTK; below its threshold dynamic NTK is plain RoPE, so the GGUF is exact there.
        ctx = int(rs.get("original_max_position_embeddings", ctx))
        from .console import warn

        warn(f"llama.cpp has no dynamic NTK RoPE: the GGUF runs plain RoPE and records a context of {ctx}")
    return ctx


@contextlib.contextmanager
def _atomic_file(final: Path) -> Iterator[Path]:
    """A temporary path beside `final`, moved over it only if the block succeeds (no half-written GGUF)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_gguf(model, tokenizer, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A llama.cpp GGUF (architecture internlm2) of `model` and its tokenizer (byte-level BPE or SentencePiece)."""
    import gguf
    import numpy as np

    qtype = {torch.float32: gguf.GGMLQuantizationType.F32, torch.float16: gguf.GGMLQuantizationType.F16,
             torch.bfloat16: gguf.GGMLQuantizationType.BF16}.get(dtype)
    ftype = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
             torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}.get(dtype)
    if qtype is None:
        raise InputError(f"GGUF export writes f32, f16 or bf16 tensors, not {dtype}")
    cfg = model.config
    out = Path(out)
    with _atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.INTERNLM2])
        w.add_name(out.stem)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_context_length(_gguf_rope(w, cfg))
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(ftype)

        _gguf_vocab(w, tokenizer, cfg.vocab_size)

        for name, t in _renamed(model.state_dict(), cfg, GGUF_NAMES, GGUF_QKV, permute=True):
            data = t.detach().to("cpu", torch.float32).numpy()
            if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:  # norms stay f32, as llama.cpp's converter
                w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, data.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


# ---------------------------------------------------------------------------------------------------
# `lm2 export`


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "internlm2", dtype: str | None = None,
                      max_shard_size: int | str | None = "5GB") -> Path:
    """`lm2 export`: an HF folder (internlm2 or llama layout) or a GGUF file of any model lm2 reads."""
    from .layout import staging_dir, write_manifest
    from .tokenizer import Tokenizer

    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; use {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use f32, f16 or bf16")
    checkpoint, out = Path(checkpoint), Path(out)
    cfg, _ = read_config(checkpoint)
    if fmt == "internlm2":
        internlm2_rope(cfg)  # refuses YaRN before any work
    torch_dtype = DTYPES[dtype] if dtype else checkpoint_dtype(checkpoint)
    model = load_model(checkpoint, dtype=torch_dtype)
    try:
        tokenizer = Tokenizer.load(checkpoint)
    except InputError as e:
        if fmt == "gguf":
            raise
        from .console import warn

        warn(f"{e}: exporting the weights without tokenizer files")
        tokenizer = None
    if fmt == "gguf":
        return write_gguf(model, tokenizer, out, torch_dtype)
    with staging_dir(out) as tmp:
        save_model(model, tmp, tokenizer=tokenizer, dtype=torch_dtype, max_shard_size=max_shard_size, fmt=fmt)
        write_manifest(tmp, "checkpoint", config={"format": fmt, "dtype": _dtype_name(torch_dtype)},
                       inputs=[checkpoint], stats={"params": model.num_params(), "format": fmt})
    return out
