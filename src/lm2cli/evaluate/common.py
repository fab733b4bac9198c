"""What every evaluation does first: find the checkpoint and load it with its tokenizer.

A checkpoint is any folder `load_model` reads (a stage's `final/`, a `checkpoints/step-*` folder, an HF
export); with none given, the run's latest finished stage. Its tokenizer travels inside it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..layout import STAGES, Workspace
from ..stages import GENERATIVE_STAGES, resolve_model


def resolve_checkpoint(ws: Workspace, run: str, checkpoint: Path | None) -> Path:
    """The given checkpoint, else the run's latest generative `final/` (see `stages.resolve_model`)."""
    return resolve_model(ws, run, checkpoint, stages=GENERATIVE_STAGES, what="checkpoint",
                         missing=f"no checkpoint given and {ws.run_dir(run)} has no finished stage; "
                                 "train one (lm2 pretrain) or pass CHECKPOINT").path


def load_tokenizer(checkpoint: Path):
    from ..tokenizer import Tokenizer

    return Tokenizer.load(checkpoint)


def load_model_fn():
    """`convert.load_model` (lazily imported: torch and safetensors load only when a model does)."""
    from ..convert import load_model

    return load_model


EVAL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_dtype(name: str, checkpoint: Path, device):
    """The torch dtype to evaluate in. `auto`: on CUDA the checkpoint's half dtype (its config.json's
    `torch_dtype`), else bf16 (fp16 where the GPU has no bf16); on CPU fp32 (half-precision matmuls there
    are slow and lossy). fp32/bf16/fp16 force one."""
    import torch

    from ..convert import checkpoint_dtype

    if name != "auto":
        if name not in EVAL_DTYPES:
            raise InputError(f"dtype must be auto, fp32, bf16 or fp16, got {name!r}")
        return getattr(torch, EVAL_DTYPES[name])
    if torch.device(device).type != "cuda":
        return torch.float32
    saved = checkpoint_dtype(checkpoint)
    if saved in (torch.bfloat16, torch.float16):
        return saved
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_checkpoint(checkpoint: Path, rope_scaling: dict | None = None, device=None, dtype: str = "auto",
                    **config_overrides):
    """(model in eval mode, tokenizer). `rope_scaling` overrides the saved one (e.g. dynamic NTK), as do
    `config_overrides` (`rope_scaling=None` switches it off); `dtype` is auto|fp32|bf16|fp16 (`resolve_dtype`)."""
    device = device or default_device()
    overrides = {"rope_scaling": dict(rope_scaling)} if rope_scaling else {}
    overrides.update(config_overrides)
    tok = load_tokenizer(checkpoint)
    model = load_model_fn()(checkpoint, dtype=resolve_dtype(dtype, checkpoint, device), device=device, **overrides)
    if tok.vocab_size > model.config.vocab_size:
        raise InputError(f"{checkpoint}: tokenizer has {tok.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}; they do not belong together")
    return model, tok


CHAT_KINDS = ("sft", "rlhf-reward", "rlhf-ppo", "rlhf-online")


def checkpoint_kind(checkpoint: Path, _depth: int = 0) -> str | None:
    """The stage that wrote a checkpoint: its manifest's `stage`, else the enclosing stage folder's `kind`
    (a `final/` or `checkpoints/step-*` folder), else that of the checkpoint it was made from (an
    `lm2 export` records its source); None when nothing says."""
    path = Path(checkpoint).resolve()
    manifest = _manifest(path)
    if isinstance(manifest.get("stage"), str):
        return manifest["stage"]
    for folder in (path.parent, path.parent.parent):
        kind = _manifest(folder).get("kind")
        if isinstance(kind, str) and (kind in STAGES or kind.startswith("rlhf-")):
            return kind
    if manifest.get("kind") == "checkpoint" and _depth < 3:
        for entry in manifest.get("inputs") or []:
            src = Path(entry.get("path", "")) if isinstance(entry, dict) else None
            if src is not None and (src / "config.json").is_file():
                return checkpoint_kind(src, _depth + 1)
    return None


def _manifest(folder: Path) -> dict:
    import json

    try:
        raw = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def has_chat_template(checkpoint: Path) -> bool:
    """An HF folder's tokenizer_config.json carries a `chat_template` (a chat model's export)."""
    import json

    try:
        raw = json.loads((Path(checkpoint) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(raw, dict) and raw.get("chat_template"))


def is_chat_checkpoint(checkpoint: Path) -> bool:
    """A chat model (SFT or RLHF stages) speaks ChatML; earlier stages are base models. lm2's own folders
    say which stage wrote them (`checkpoint_kind`); a foreign HF folder (no manifest) is a chat model when
    its tokenizer config has a chat template. (lm2 writes InternLM2's template into every tokenizer
    config, base models' too, as the released base models do, so for lm2 folders the stage decides.)"""
    kind = checkpoint_kind(checkpoint)
    if kind is not None:
        return kind in CHAT_KINDS or kind.startswith("rlhf-")
    path = Path(checkpoint).resolve()
    if any(p in ("sft", "rlhf-ppo") for p in path.parts[-4:]):  # a copied stage folder: its name
        return True
    return not (path / "manifest.json").exists() and has_chat_template(path)
