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


def load_checkpoint(checkpoint: Path, rope_scaling: dict | None = None, device=None):
    """(model in eval mode, tokenizer). `rope_scaling` overrides the saved one (e.g. dynamic NTK)."""
    import torch

    from ..convert import load_model

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = {"rope_scaling": dict(rope_scaling)} if rope_scaling else {}
    tok = load_tokenizer(checkpoint)
    model = load_model(checkpoint, device=device, **overrides)
    if tok.vocab_size > model.config.vocab_size:
        raise InputError(f"{checkpoint}: tokenizer has {tok.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}; they do not belong together")
    return model, tok


def is_chat_checkpoint(checkpoint: Path) -> bool:
    """Checkpoints of the chat stages (sft, rlhf-ppo) speak ChatML; earlier ones are base models."""
    parts = Path(checkpoint).resolve().parts
    return any(p in ("sft", "rlhf-ppo") for p in parts[-4:])
