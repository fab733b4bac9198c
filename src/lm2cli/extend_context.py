"""`lm2 extend-context`: a checkpoint's context made longer, InternLM2's way or three others (SPEC §2.4, §5.3).

From any checkpoint (default: the run's latest pretraining `final/`), set a new context length
`seq_len` and a RoPE method, then keep training on long packed sequences (the recipe's
`extend_context.train`: `long_fraction` of the tokens from documents longer than the input's context)
through the shared trainer `train.loop.fit`. Writes `runs/<run>/extend-context/` (manifest kind
`extend-context`); its `final/config.json` carries everything later commands need, so generate, eval,
needle and export use the new context without flags.

Methods, with L = the input's `max_position_embeddings` and L' = `seq_len`:

    base     rope_theta -> `rope_theta` (InternLM2: 50,000 -> 1,000,000), positions unchanged; the
             config also gets `inference_rope_scaling` (dynamic NTK 2.0), which only acts past L'
             (SPEC §2.4 "Serving"), so training is unaffected
    linear   positions / f (position interpolation, Chen et al. 2023); a linear input composes: f·f0
    dynamic  base' = base·(f·T/L − (f − 1))^(d/(d−2)) for a call reaching T > L, computed per call
             from that call's length (never cached, SPEC P5); L is kept as
             `original_max_position_embeddings`
    yarn     YaRN (Peng et al. 2023): low frequencies interpolated by f, high ones kept, a ramp between
             (beta_fast 32, beta_slow 1), attention scaled by 0.1·ln f + 1

f = `factor`, by default L'/L. Every method writes `max_position_embeddings` = L', the length it trained at.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from .config import ExtendContextConfig, ModelConfig, Recipe, TrainConfig
from .errors import InputError
from .layout import MANIFEST, Workspace, atomic_write_text
from .stages import check_same_tokenizer, latest_pretrained, read_model_config, validation_batches

KIND = "extend-context"
METHODS = ("base", "linear", "dynamic", "yarn")


def resolve_config(ec: ExtendContextConfig, *, method: Optional[str] = None, seq_len: Optional[int] = None,
                   factor: Optional[float] = None, rope_theta: Optional[float] = None) -> ExtendContextConfig:
    """The recipe's `extend_context` with the command-line values that were given."""
    if method is not None and method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if rope_theta is not None and (method or ec.method) != "base":
        raise InputError(f"--rope-theta sets the base of --method base; {method or ec.method} keeps the input's base")
    given = {k: v for k, v in dict(method=method, seq_len=seq_len, factor=factor, rope_theta=rope_theta).items()
             if v is not None}
    return dataclasses.replace(ec, **given)


def extended_model_config(src: ModelConfig, ec: ExtendContextConfig) -> ModelConfig:
    """The input's config with the new context length and RoPE method (see the module docstring)."""
    old = int(src.max_position_embeddings)
    if ec.seq_len < old:
        raise InputError(f"extend_context.seq_len {ec.seq_len} is shorter than the input's context {old}")
    f = float(ec.factor) if ec.factor is not None else ec.seq_len / old
    theta, prior = float(src.rope_theta), dict(src.rope_scaling or {})
    if ec.method == "base":
        theta = float(ec.rope_theta)
        scaling = dict(ec.inference_rope_scaling) if ec.inference_rope_scaling else None
    elif ec.method == "linear":
        f0 = float(prior.get("factor", 1.0)) if prior.get("type") == "linear" else 1.0
        scaling = {"type": "linear", "factor": f * f0}
    elif ec.method == "dynamic":
        scaling = {"type": "dynamic", "factor": f, "original_max_position_embeddings": old}
    else:
        scaling = {"type": "yarn", "factor": f, "original_max_position_embeddings": old, "beta_fast": 32.0,
                   "beta_slow": 1.0}
    return dataclasses.replace(src, max_position_embeddings=ec.seq_len, rope_theta=theta, rope_scaling=scaling)


def train_config(ec: ExtendContextConfig, old_len: int) -> TrainConfig:
    """Training at the new length; "long" documents are those longer than the input's context."""
    return dataclasses.replace(ec.train, seq_len=ec.seq_len, rope_theta=None,
                               long_min_tokens=ec.train.long_min_tokens or old_len)


def rope_report(cfg: ModelConfig, old_len: int) -> dict:
    """Effective RoPE base and position scale at the old length, the new one and 2x/4x beyond."""
    from .model import effective_rope_base

    rs = cfg.rope_scaling or {}
    scale = 1.0 / float(rs["factor"]) if rs.get("type") == "linear" else 1.0
    lengths = sorted({old_len, cfg.max_position_embeddings, 2 * cfg.max_position_embeddings,
                      4 * cfg.max_position_embeddings})
    return {str(n): {"rope_base": round(effective_rope_base(cfg, n), 1), "position_scale": scale} for n in lengths}


def run_extend_context(
    ws: Workspace,
    recipe: Recipe,
    run: str = "default",
    from_: Optional[Path] = None,
    method: Optional[str] = None,
    seq_len: Optional[int] = None,
    factor: Optional[float] = None,
    rope_theta: Optional[float] = None,
    resume: str = "auto",
    json_out: bool = False,
) -> Path:
    """Extend a checkpoint's context and train at it into runs/<run>/extend-context/; returns that folder."""
    from .console import log, print_json, warn
    from .tokens import TokenStore
    from .train.data import PackedStream
    from .train.engine import build_model, init_distributed
    from .train.loop import fit

    ec = resolve_config(recipe.extend_context, method=method, seq_len=seq_len, factor=factor, rope_theta=rope_theta)
    source = latest_pretrained(ws, run, from_)
    if not (ws.tokens / MANIFEST).exists():
        raise InputError(f"no token shards at {ws.tokens}; run `lm2 tokenize` first")
    src_cfg = source.config()
    new_cfg = extended_model_config(src_cfg, ec)
    cfg = train_config(ec, src_cfg.max_position_embeddings)
    stage_dir = ws.stage_dir(KIND, run)
    refuse_other_setting(stage_dir, new_cfg, resume)

    dist = init_distributed()
    store = TokenStore(ws.tokens)
    tok = store.tokenizer()
    check_same_tokenizer(source, tok, src_cfg.vocab_size)
    batches = PackedStream.from_store(store, "train", cfg, dist.rank, dist.world)
    if dist.is_main:
        for note in batches.notes:
            warn(f"{KIND}: {note}")
        log(f"{KIND}: {source.path} -> {ec.method}, context {src_cfg.max_position_embeddings} -> {ec.seq_len}, "
            f"rope_theta {new_cfg.rope_theta:g}, rope_scaling {new_cfg.rope_scaling}")
    # Sharding-aware: partitioned at construction under ZeRO-3, the input's weights streamed in.
    model = build_model(new_cfg, cfg, dist, init_from=source.path)
    eval_data, no_eval = validation_batches(store, cfg, dist.rank, dist.world)
    if no_eval and dist.is_main:
        warn(f"{KIND}: {no_eval}")
    result = fit(model, cfg, batches, stage_dir, kind=KIND, eval_data=eval_data, resume=resume, tokenizer=tok,
                 inputs=[ws.tokens, source.path], recipe=recipe, dist=dist)
    if dist.is_main:
        summary = {"method": ec.method, "from": str(source.path), "old_context": src_cfg.max_position_embeddings,
                   "new_context": ec.seq_len, "old_rope_theta": src_cfg.rope_theta, "rope_theta": new_cfg.rope_theta,
                   "rope_scaling": new_cfg.rope_scaling, "rope": rope_report(new_cfg, src_cfg.max_position_embeddings)}
        _add_to_manifest(stage_dir, summary)
        if json_out:
            print_json({**summary, **dataclasses.asdict(result)})
    return stage_dir


def refuse_other_setting(stage_dir: Path, new_cfg: ModelConfig, resume: str) -> None:
    """Resuming checkpoints trained under another context/RoPE setting would mix two models."""
    if resume != "auto":
        return
    from .train.checkpoint import find_resume

    ckpt = find_resume(stage_dir / "checkpoints", quiet=True)
    if ckpt is None or not (ckpt / "config.json").exists():
        return
    saved = read_model_config(ckpt)  # config.json may hold the released form (dynamic NTK's threshold)
    fields = ("max_position_embeddings", "rope_theta", "rope_scaling")
    mine = {k: getattr(new_cfg, k) for k in fields}
    theirs = {k: getattr(saved, k) for k in fields}
    if json.dumps(mine, sort_keys=True) != json.dumps(theirs, sort_keys=True):
        raise InputError(f"{stage_dir} has checkpoints trained with {theirs}, not {mine}; rerun with --resume never "
                         "to start over with the new setting")


def _add_to_manifest(stage_dir: Path, summary: dict) -> None:
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    manifest["extend_context"] = summary
    atomic_write_text(stage_dir / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
