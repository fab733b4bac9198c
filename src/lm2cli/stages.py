"""Which model a command reads: the one resolver behind every `--from` / `CHECKPOINT` / `--reward`.

A command's model input is one of

    a stage folder          runs/<run>/<stage>/            -> its final/
    an lm2 checkpoint       .../final/, .../checkpoints/step-XXXXXXXX/   (manifest kind `checkpoint`)
    an HF model folder      an `lm2 export`, or a released InternLM2 / Llama folder: config.json and
                            weights, no lm2 manifest

and, with nothing given, the latest finished `final/` among the stages the command follows (pretrain
stage N reads stage N-1; extend-context and sft read the latest pretraining stage; rlhf reads sft; eval,
generate and chat the latest generative stage). `resolve_model` returns a `ModelInput` that says what was
found and carries the fingerprint its output's manifest records for lineage; `would_read` names the
folder the default points at even when it does not exist yet (for `--dry-run`).

The tokenizer travels with the model: `input_tokenizer` prefers the one saved inside the input and falls
back to the workspace's, and `check_same_tokenizer` refuses a model trained with other token ids than
the data it is about to see.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .errors import InputError, WrongArtefact
from .layout import MANIFEST, MODEL_KINDS, STAGES, Workspace, describe_input, read_manifest

PRETRAIN_STAGES = ("pretrain-stage1", "pretrain-stage2", "pretrain-stage3")
STAGE_NAMES = dict(enumerate(PRETRAIN_STAGES, start=1))
# The reward model scores text rather than writing it: never the default model to generate with.
GENERATIVE_STAGES = tuple(s for s in STAGES if s != "rlhf-reward")


@dataclass(frozen=True)
class ModelInput:
    """A resolved model folder. `kind`: "checkpoint" (an lm2 artefact) or "hf" (no lm2 manifest)."""

    path: Path
    kind: str
    manifest: Optional[dict]
    fingerprint: Optional[str]  # the manifest's hash, or the folder's content fingerprint (layout.describe_input)
    stage: Optional[str] = None  # the stage folder it was found in, when known

    def config(self):
        """The model's `ModelConfig` from its config.json (nothing else is read)."""
        return read_model_config(self.path)

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "stage": self.stage, "fingerprint": self.fingerprint}


def read_model_config(path: Path):
    from .convert import read_config

    return read_config(path)[0]


def model_input(path: str | Path, what: str = "--from") -> ModelInput:
    """A model folder given by the user: a stage folder means its final/; an lm2 artefact must be a
    checkpoint; a folder without a manifest must hold an HF config.json."""
    path = Path(path).expanduser().resolve()
    label = f"{what} {path}"
    if not path.exists():
        raise InputError(f"{label} does not exist")
    if (path / MANIFEST).exists():
        manifest = read_manifest(path, what=label)
        stage = manifest.get("kind") if manifest.get("kind") in STAGES else None
        if stage:
            if not (path / "final" / MANIFEST).exists():
                raise InputError(f"{label} is an unfinished {stage} (no final/); finish it or pass a checkpoint")
            path = path / "final"
            manifest = read_manifest(path, kinds=MODEL_KINDS, what=f"{what} {path}")
        else:
            read_manifest(path, kinds=MODEL_KINDS, what=label)
            stage = _stage_of(path)
        return ModelInput(path, "checkpoint", manifest, describe_input(path).get("fingerprint"), stage)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelInput(path, "hf", None, describe_input(path).get("fingerprint"))
    raise WrongArtefact(f"{label} is not an lm2 artefact (no {MANIFEST}) nor an HF model folder (no config.json)")


def _stage_of(checkpoint: Path) -> Optional[str]:
    """runs/<run>/<stage>/final or .../<stage>/checkpoints/step-*: the stage's name."""
    for parent in (checkpoint.parent, checkpoint.parent.parent):
        if parent.name in STAGES:
            return parent.name
    return None


def would_read(ws: Workspace, run: str, given: Optional[Path], stages: Iterable[str]) -> Path:
    """The folder the command reads: the given one, the latest finished final/ among `stages`, or, when
    none has finished, the final/ of the last of them (what a finished pipeline would hold)."""
    if given is not None:
        return Path(given).expanduser().resolve()
    stages = tuple(stages)
    return ws.latest_model(run, stages=stages) or ws.stage_dir(stages[-1], run) / "final"


def resolve_model(ws: Workspace, run: str, given: Optional[Path], *, stages: Iterable[str], missing: str,
                  what: str = "--from") -> ModelInput:
    """`given` (see `model_input`), else the latest finished `final/` among `stages` in the run; with
    neither, InputError(`missing`)."""
    if given is not None:
        return model_input(given, what)
    found = ws.latest_model(run, stages=tuple(stages))
    if found is None:
        raise InputError(missing)
    return model_input(found, what)


def previous_stage_model(ws: Workspace, run: str, stage: int, given: Optional[Path]) -> Optional[ModelInput]:
    """`lm2 pretrain --stage N`: None for stage 1 (fresh weights); later stages `--from`, else stage N-1's final/."""
    if stage == 1:
        if given is not None:
            raise InputError("stage 1 starts from freshly initialised weights; --from is for stages 2 and 3")
        return None
    prev = STAGE_NAMES[stage - 1]
    return resolve_model(ws, run, given, stages=(prev,),
                         missing=f"no finished {prev} in {ws.run_dir(run)} (no final/); run `lm2 pretrain --stage "
                                 f"{stage - 1}` first, or pass --from CHECKPOINT")


def latest_pretrained(ws: Workspace, run: str, given: Optional[Path]) -> ModelInput:
    """extend-context and sft: `--from`, else the run's latest pretraining final/ (stage 3, else 2, else 1)."""
    return resolve_model(ws, run, given, stages=PRETRAIN_STAGES,
                         missing=f"no finished pretraining stage in {ws.run_dir(run)} (no pretrain-stage*/final/); "
                                 "run `lm2 pretrain` first, or pass --from CHECKPOINT")


# ---------------------------------------------------------------------------------------------------
# The tokenizer that goes with a model


def input_tokenizer(ws: Workspace, model: ModelInput | Path):
    """The tokenizer saved with the model, else the workspace's (its built tokenizer/, else cl100k)."""
    from .tokenizer import Tokenizer

    try:
        return Tokenizer.load(getattr(model, "path", model))
    except InputError:
        return Tokenizer.from_workspace(ws)


def check_same_tokenizer(model: ModelInput, tok, vocab_size: Optional[int] = None) -> None:
    """Refuse a model whose vocabulary or saved tokenizer differs from `tok`, the one the data uses.
    `vocab_size`: the model's, when the caller has read its config already."""
    from .tokenizer import Tokenizer

    vocab = vocab_size if vocab_size is not None else model.config().vocab_size
    if vocab != tok.vocab_size:
        raise InputError(f"{model.path} has a vocabulary of {vocab}; the token shards use {tok.vocab_size} "
                         "(a different tokenizer)")
    try:
        theirs = Tokenizer.load(model.path)
    except InputError:
        return  # a checkpoint without tokenizer files: the vocabulary size check is all we have
    if theirs.fingerprint != tok.fingerprint:
        raise InputError(f"{model.path} was trained with tokenizer {theirs.fingerprint[:19]}…, the token shards use "
                         f"{tok.fingerprint[:19]}…; retokenize or pick the matching checkpoint")


# ---------------------------------------------------------------------------------------------------
# The token data a stage reads


def validation_batches(store, cfg, rank: int, world: int) -> tuple[Optional[object], Optional[str]]:
    """(zero-arg callable giving the same `cfg.eval_batches` validation batches each time, or None; why
    there is no evaluation, or None)."""
    import itertools

    from .train.data import PackedStream

    if cfg.eval_batches <= 0:
        return None, None
    try:
        PackedStream.from_store(store, "val", cfg, rank, world)
    except InputError as e:
        return None, f"no evaluation ({e})"
    return (lambda: itertools.islice(PackedStream.from_store(store, "val", cfg, rank, world), cfg.eval_batches)), None
