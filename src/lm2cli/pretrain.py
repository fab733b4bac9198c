"""`lm2 pretrain --stage 1|2|3`: InternLM2's three pretraining stages (SPEC §5) on the shared engine.

    stage 1  runs/<run>/pretrain-stage1/  a fresh model (InternEvo init), short context, RoPE base 50,000
    stage 2  runs/<run>/pretrain-stage2/  from stage 1's final/: long context, RoPE base 1,000,000, half
                                          the tokens from documents longer than stage 1's context
    stage 3  runs/<run>/pretrain-stage3/  from stage 2's final/: the recipe's capability mixture, lower LR

Each stage reads `data/tokens` (and the tokenizer stored beside it), defaults its input to the previous
stage's `final/` in the same run (`--from` takes any `checkpoint` artefact or a stage folder), and
writes its folder through `train.loop.fit` (checkpoints, metrics, `final/`, manifest). The saved
config of stages 2-3 records the new `rope_theta` and `max_position_embeddings` = the trained length.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Optional

from .config import Recipe, TrainConfig, to_yaml
from .console import log, print_json, warn
from .errors import InputError, Lm2Error
from .layout import MANIFEST, STAGES, Workspace, atomic_write_text, read_manifest

STAGE_NAMES = {1: "pretrain-stage1", 2: "pretrain-stage2", 3: "pretrain-stage3"}


def stage_config(recipe: Recipe, stage: int) -> TrainConfig:
    """The stage's TrainConfig; "long" documents default to those longer than stage 1's context."""
    cfg = getattr(recipe.pretrain, f"stage{stage}")
    if cfg.long_fraction > 0 and cfg.long_min_tokens == 0:
        cfg = dataclasses.replace(cfg, long_min_tokens=recipe.pretrain.stage1.seq_len)
    return cfg


def source_checkpoint(ws: Workspace, run: str, stage: int, from_: Optional[Path]) -> Optional[Path]:
    """Stage 1: None (fresh weights). Later stages: `--from`, else the previous stage's final/."""
    if stage == 1:
        if from_ is not None:
            raise InputError("stage 1 starts from freshly initialised weights; --from is for stages 2 and 3")
        return None
    prev = STAGE_NAMES[stage - 1]
    if from_ is None:
        final = ws.stage_dir(prev, run) / "final"
        if not (final / MANIFEST).exists():
            raise InputError(f"no finished {prev} in {ws.run_dir(run)} (no final/); run `lm2 pretrain --stage "
                             f"{stage - 1}` first, or pass --from CHECKPOINT")
        return final
    path = Path(from_)
    manifest = read_manifest(path, what=f"--from {path}")
    if manifest.get("kind") in STAGES:  # a stage folder: take its final weights
        path = path / "final"
    read_manifest(path, kinds=("checkpoint",), what=f"--from {path}")
    return path


def build_model(recipe: Recipe, cfg: TrainConfig, tok, source: Optional[Path]):
    """Stage 1: a new InternLM2 sized by the recipe; later stages: the source weights under the stage's
    RoPE base and context length."""
    import torch

    from .convert import load_model
    from .model import InternLM2

    if source is None:
        mc = recipe.model
        if mc.vocab_size and mc.vocab_size < tok.vocab_size:
            raise InputError(f"model.vocab_size {mc.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
        mc = dataclasses.replace(mc, vocab_size=mc.vocab_size or tok.vocab_size,
                                 rope_theta=cfg.rope_theta or mc.rope_theta, max_position_embeddings=cfg.seq_len,
                                 bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        torch.manual_seed(cfg.seed)
        return InternLM2(mc)
    src = load_model(source)
    if src.config.vocab_size != tok.vocab_size:
        raise InputError(f"{source} has a vocabulary of {src.config.vocab_size}; the token shards use "
                         f"{tok.vocab_size} (a different tokenizer)")
    _check_same_tokenizer(source, tok)
    mc = dataclasses.replace(src.config, rope_theta=cfg.rope_theta or src.config.rope_theta,
                             max_position_embeddings=max(cfg.seq_len, src.config.max_position_embeddings))
    with torch.device("meta"):
        model = InternLM2(mc)
    model = model.to_empty(device="cpu")
    model.load_state_dict(src.state_dict())
    return model


def _check_same_tokenizer(source: Path, tok) -> None:
    from .tokenizer import Tokenizer

    try:
        theirs = Tokenizer.load(source)
    except InputError:
        return  # a checkpoint without tokenizer files: the vocabulary size check is all we have
    if theirs.fingerprint != tok.fingerprint:
        raise InputError(f"{source} was trained with tokenizer {theirs.fingerprint[:19]}…, the token shards use "
                         f"{tok.fingerprint[:19]}…; retokenize or pick the matching checkpoint")


def run_pretrain(ws: Workspace, recipe: Recipe, stage: int, run: str = "default", resume: str = "auto",
                 nproc: int = 1, from_: Optional[Path] = None, plan: bool = False, json_out: bool = False) -> Path:
    """Train one pretraining stage into runs/<run>/pretrain-stage<N>/; returns that folder."""
    if stage not in STAGE_NAMES:
        raise InputError(f"--stage must be 1, 2 or 3, got {stage}")
    kind = STAGE_NAMES[stage]
    stage_dir = ws.stage_dir(kind, run)
    if not (ws.tokens / MANIFEST).exists():
        raise InputError(f"no token shards at {ws.tokens}; run `lm2 tokenize` first")
    source = source_checkpoint(ws, run, stage, from_)

    from .tokens import TokenStore
    from .train.data import PackedStream
    from .train.engine import init_distributed, launched, relaunch
    from .train.loop import fit

    if nproc > 1 and not launched():
        return _relaunch(ws, recipe, stage, run, resume, nproc, from_, plan, json_out, relaunch)
    cfg = stage_config(recipe, stage)
    dist = init_distributed()
    ds_config = None
    if plan:
        cfg, ds_config = _planned(recipe, stage, cfg, dist.world)
    store = TokenStore(ws.tokens)
    tok = store.tokenizer()
    batches = PackedStream.from_store(store, "train", cfg, dist.rank, dist.world)
    if dist.is_main:
        for note in batches.notes:
            warn(f"{kind}: {note}")
    model = build_model(recipe, cfg, tok, source)
    inputs = [ws.tokens] + ([ws.tokenizer] if (ws.tokenizer / MANIFEST).exists() else []) + ([source] if source else [])
    result = fit(model, cfg, batches, stage_dir, kind=kind, eval_data=_eval_data(store, cfg, dist, kind),
                 resume=resume, tokenizer=tok, inputs=inputs, recipe=recipe, dist=dist, ds_config=ds_config)
    if json_out and dist.is_main:
        print_json(dataclasses.asdict(result))
    return stage_dir


def _eval_data(store, cfg: TrainConfig, dist, kind: str):
    """Zero-arg callable giving the same `eval_batches` validation batches each time, or None."""
    from .train.data import PackedStream

    if cfg.eval_batches <= 0:
        return None
    try:
        PackedStream.from_store(store, "val", cfg, dist.rank, dist.world)
    except InputError as e:
        if dist.is_main:
            warn(f"{kind}: no evaluation ({e})")
        return None
    return lambda: itertools.islice(PackedStream.from_store(store, "val", cfg, dist.rank, dist.world), cfg.eval_batches)


def _planned(recipe: Recipe, stage: int, cfg: TrainConfig, world: int) -> tuple[TrainConfig, dict]:
    """`--plan`: the planner's fastest layout that fits, as the stage's batch split and DeepSpeed config."""
    from . import plan as planner

    choice = planner.best_layout(recipe, planner.detect_cluster(), stage)
    lay = choice.layout
    if lay.dp != world:
        raise InputError(f"the plan is for {lay.dp} ranks but this run has {world}")
    log(f"--plan: {lay.describe()}")
    cfg = dataclasses.replace(cfg, micro_batch_size=lay.micro_batch, grad_accum=lay.grad_accum,
                              activation_checkpointing=lay.checkpointing, zero_stage=lay.zero_stage,
                              hpz_partition_size=lay.hpz, sharding="partial" if lay.hpz > 1 else cfg.sharding)
    return cfg, planner.deepspeed_config(lay, cfg)


def _relaunch(ws, recipe, stage, run, resume, nproc, from_, plan, json_out, relaunch) -> Path:
    """`--nproc N` on one machine: the same command as N ranks under torch.distributed.run."""
    recipe_file = ws.run_dir(run) / f".{STAGE_NAMES[stage]}.recipe.yaml"
    atomic_write_text(recipe_file, to_yaml(recipe))
    args = ["pretrain", "--stage", str(stage), "--workdir", str(ws.root), "--run", run, "--recipe", str(recipe_file),
            "--resume", str(resume)]
    args += ["--from", str(from_)] if from_ else []
    args += ["--plan"] if plan else []
    args += ["--json"] if json_out else []
    log(f"{STAGE_NAMES[stage]}: starting {nproc} local ranks (torch.distributed.run)")
    rc = relaunch(nproc, args)
    if rc != 0:
        from .train.loop import Stopped

        if rc == Stopped.exit_code:
            raise Stopped(f"{STAGE_NAMES[stage]} stopped by SIGTERM; rerun the same command to resume")
        raise Lm2Error(f"{STAGE_NAMES[stage]}: the {nproc} ranks exited with status {rc}")
    return ws.stage_dir(STAGE_NAMES[stage], run)
