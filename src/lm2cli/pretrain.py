"""`lm2 pretrain --stage 1|2|3`: InternLM2's three pretraining stages (SPEC §5) on the shared engine.

    stage 1  runs/<run>/pretrain-stage1/  a fresh model (InternEvo init), short context, RoPE base 50,000
    stage 2  runs/<run>/pretrain-stage2/  from stage 1's final/: long context, RoPE base 1,000,000, half
                                          the tokens from documents longer than stage 1's context
    stage 3  runs/<run>/pretrain-stage3/  from stage 2's final/: the recipe's capability mixture, lower LR

Each stage reads `data/tokens` (and the tokenizer stored beside it), defaults its input to the previous
stage's `final/` in the same run (`--from` takes any model folder `stages.model_input` accepts), and
writes its folder through `train.loop.fit` (checkpoints, metrics, `final/`, manifest). The saved
config of stages 2-3 records the new `rope_theta` and `max_position_embeddings` = the trained length.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from .config import ModelConfig, Recipe, TrainConfig, to_yaml
from .console import log, print_json, warn
from .errors import InputError, Lm2Error
from .layout import MANIFEST, Workspace, atomic_write_text
from .stages import STAGE_NAMES, ModelInput, previous_stage_model, validation_batches


def stage_config(recipe: Recipe, stage: int) -> TrainConfig:
    """The stage's TrainConfig; "long" documents default to those longer than stage 1's context."""
    if stage not in STAGE_NAMES:
        raise InputError(f"--stage must be 1, 2 or 3, got {stage}")
    cfg = getattr(recipe.pretrain, f"stage{stage}")
    if cfg.long_fraction > 0 and cfg.long_min_tokens == 0:
        cfg = dataclasses.replace(cfg, long_min_tokens=recipe.pretrain.stage1.seq_len)
    return cfg


def model_config(recipe: Recipe, cfg: TrainConfig, tok=None, source: Optional[ModelConfig] = None) -> ModelConfig:
    """Stage 1: the recipe's model sized for the tokenizer (`tok` None: the recipe's own vocabulary);
    later stages: the source's config under the stage's RoPE base and context length."""
    if source is not None:
        return dataclasses.replace(source, rope_theta=cfg.rope_theta or source.rope_theta,
                                   max_position_embeddings=max(cfg.seq_len, source.max_position_embeddings))
    mc = recipe.model
    if tok is None:
        from .plan import recipe_vocab

        return dataclasses.replace(mc, vocab_size=recipe_vocab(recipe), rope_theta=cfg.rope_theta or mc.rope_theta,
                                   max_position_embeddings=cfg.seq_len)
    if mc.vocab_size and mc.vocab_size < tok.vocab_size:
        raise InputError(f"model.vocab_size {mc.vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
                         f"({tok.name}, the token shards'); build the recipe's vocabulary with "
                         "`lm2 tokenize build-vocab`, then retokenize with `lm2 tokenize --force`")
    return dataclasses.replace(mc, vocab_size=mc.vocab_size or tok.vocab_size,
                               rope_theta=cfg.rope_theta or mc.rope_theta, max_position_embeddings=cfg.seq_len,
                               bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def build_model(recipe: Recipe, cfg: TrainConfig, tok, source: Optional[ModelInput], dist, ds_config=None):
    """Stage 1: a new InternLM2 sized by the recipe; later stages: the source weights under the stage's
    RoPE base and context length. Built by `train.engine.build_model`: partitioned at construction
    under ZeRO-3, in the run's dtype, the source's weights streamed in tensor by tensor."""
    from .stages import check_same_tokenizer
    from .train.engine import build_model as build

    if source is None:
        return build(model_config(recipe, cfg, tok), cfg, dist, ds_config=ds_config)
    src = source.config()
    check_same_tokenizer(source, tok, src.vocab_size)
    return build(model_config(recipe, cfg, tok, src), cfg, dist, init_from=source.path, ds_config=ds_config)


def run_pretrain(ws: Workspace, recipe: Recipe, stage: int, run: str = "default", resume: str = "auto",
                 nproc: int = 1, from_: Optional[Path] = None, plan: bool = False, json_out: bool = False) -> Path:
    """Train one pretraining stage into runs/<run>/pretrain-stage<N>/; returns that folder."""
    cfg = stage_config(recipe, stage)
    kind = STAGE_NAMES[stage]
    stage_dir = ws.stage_dir(kind, run)
    if not (ws.tokens / MANIFEST).exists():
        raise InputError(f"no token shards at {ws.tokens}; run `lm2 tokenize` first")
    source = previous_stage_model(ws, run, stage, from_)

    from .tokens import TokenStore
    from .train.data import PackedStream
    from .train.engine import init_distributed, launched, relaunch
    from .train.loop import fit

    if nproc > 1 and not launched():
        return _relaunch(ws, recipe, stage, run, resume, nproc, from_, plan, json_out, relaunch)
    dist = init_distributed()
    ds_config = None
    if plan:
        cfg, ds_config = planned(recipe, stage, cfg, dist.world)
    store = TokenStore(ws.tokens)
    tok = store.tokenizer()
    batches = PackedStream.from_store(store, "train", cfg, dist.rank, dist.world)
    if dist.is_main:
        for note in batches.notes:
            warn(f"{kind}: {note}")
    model = build_model(recipe, cfg, tok, source, dist, ds_config)
    inputs = [ws.tokens] + ([ws.tokenizer] if (ws.tokenizer / MANIFEST).exists() else []) + ([source.path] if source else [])
    eval_data, no_eval = validation_batches(store, cfg, dist.rank, dist.world)
    if no_eval and dist.is_main:
        warn(f"{kind}: {no_eval}")
    result = fit(model, cfg, batches, stage_dir, kind=kind, eval_data=eval_data,
                 resume=resume, tokenizer=tok, inputs=inputs, recipe=recipe, dist=dist, ds_config=ds_config)
    if json_out and dist.is_main:
        print_json(dataclasses.asdict(result))
    return stage_dir


def planned(recipe: Recipe, stage: int, cfg: TrainConfig, world: int, cluster=None) -> tuple[TrainConfig, dict]:
    """`--plan`: the planner's fastest layout that fits on `cluster` (default: the one this process runs
    in), as the stage's batch split and DeepSpeed config."""
    from . import plan as planner

    choice = planner.best_layout(recipe, cluster or planner.detect_cluster(), stage)
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
