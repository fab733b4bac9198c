"""`--dry-run`: everything a training command settles before its first step, with nothing allocated.

One entry per command (`pretrain`, `extend_context`, `sft`, `rlhf_reward`, `rlhf_ppo`). Each resolves

    recipe      the stage's training config after the command's own overrides
    inputs      what the real run would read (`stages.py`), each found or "input missing: would read X"
    model       the model at full shape on the meta device: parameter count, config, weights' shapes
                checked against the input's safetensors header (no tensor is read)
    deepspeed   the config `train.engine.deepspeed_config` writes for the world size (`pretrain --plan`:
                the layout `lm2 plan` picks on `--gpu`)
    batch       the first global batch: from the real token store / data file when present (shapes,
                tokens, target tokens, documents, long/short mix), else from the config alone
    memory      per-rank memory from `lm2 plan`'s model for that layout (PPO: its four-model model),
                checked against `--gpu PRESET` or the local GPU
    writes      the artefact folders the run would create

and keeps going after a problem, so one dry run lists everything that would stop the real run. The
world size is `--nproc`, else the slots of a DeepSpeed `--hostfile`, else the launcher's WORLD_SIZE.
`Report.finish` prints the report (rich, or `--json`) and raises `InputError` with the first problem
when the real run could not start: exit 0 means it could.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .config import ModelConfig, Recipe, TrainConfig
from .errors import InputError
from .layout import MANIFEST, Workspace
from .stages import (PRETRAIN_STAGES, STAGE_NAMES, ModelInput, model_input, read_model_config, would_read)

GiB = 2**30


@dataclass
class Report:
    command: str
    recipe: str
    world: int
    inputs: list = field(default_factory=list)
    models: list = field(default_factory=list)
    deepspeed: dict = field(default_factory=dict)
    batch: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    writes: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    gpu: str = ""  # the device memory is checked against: --gpu's preset, else the local GPU, else none
    capacity_gib: Optional[float] = None
    per_node: int = 1

    @classmethod
    def start(cls, command: str, recipe: Recipe, nproc: Optional[int] = None, hostfile: Optional[Path] = None,
              gpu: Optional[str] = None) -> "Report":
        world, per_node = world_size(nproc, hostfile)
        report = cls(command, recipe.name, world, per_node=per_node)
        report.gpu, report.capacity_gib = gpu_memory(gpu)
        if report.capacity_gib is None:
            report.notes.append("memory per rank not checked against a device (no GPU here; pass --gpu)")
        return report

    @property
    def ok(self) -> bool:
        return not self.problems

    def attempt(self, fn: Callable[[], Any], what: str = "") -> Any:
        """Run one check; an `InputError` becomes a problem instead of stopping the dry run."""
        try:
            return fn()
        except InputError as e:
            self.problems.append(f"{what}: {e}" if what else str(e))
            return None

    def read(self, what: str, path: Path, found: bool, detail: str = "", hint: str = "") -> bool:
        self.inputs.append({"what": what, "path": str(path), "found": found, "detail": detail})
        if not found:
            self.problems.append(f"input missing: would read {what} {path}" + (f" ({hint})" if hint else ""))
        return found

    def to_json(self) -> dict:
        return {"command": self.command, "recipe": self.recipe, "world_size": self.world,
                "could_start": self.ok, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                          if f.name not in ("command", "recipe", "world", "per_node")}}

    def finish(self, json_out: bool = False) -> "Report":
        if json_out:
            from .console import print_json

            print_json(self.to_json())
        else:
            show(self)
        if self.problems:
            more = f" (and {len(self.problems) - 1} more above)" if len(self.problems) > 1 else ""
            raise InputError(f"dry run: the real run could not start: {self.problems[0]}{more}")
        return self


# ---------------------------------------------------------------------------------------------------
# World size


def world_size(nproc: Optional[int] = None, hostfile: Optional[Path] = None) -> tuple[int, int]:
    """(ranks, ranks per node): `--nproc` on one node, a DeepSpeed hostfile's `host slots=N` lines, or the
    launcher's WORLD_SIZE / LOCAL_WORLD_SIZE; 1 rank by default."""
    if hostfile is not None:
        slots = parse_hostfile(Path(hostfile))
        return sum(slots.values()), max(slots.values())
    if nproc:
        return nproc, nproc
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def gpu_memory(gpu: Optional[str]) -> tuple[str, Optional[float]]:
    """(name, GiB) of `--gpu`'s preset (`lm2 plan`'s table), else of the local GPU, else ("", None)."""
    from . import plan

    if gpu:
        for name, preset in plan.GPUS.items():
            if name.lower() == gpu.lower():
                return name, preset.memory_gib
        raise InputError(f"unknown --gpu {gpu!r}; known: {', '.join(plan.GPUS)}")
    import torch

    if not torch.cuda.is_available():
        return "", None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory / GiB


def parse_hostfile(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise InputError(f"--hostfile {path} does not exist")
    slots: dict[str, int] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not m or int(m.group(2)) < 1:
            raise InputError(f"--hostfile {path} line {n}: expected `hostname slots=N`, got {line!r}")
        if m.group(1) in slots:
            raise InputError(f"--hostfile {path} line {n}: host {m.group(1)} is listed twice")
        slots[m.group(1)] = int(m.group(2))
    if not slots:
        raise InputError(f"--hostfile {path} lists no hosts")
    return slots


# ---------------------------------------------------------------------------------------------------
# Pieces shared by the commands


def meta_model(cfg: ModelConfig, role: str = "model") -> tuple[dict, dict]:
    """(summary, {name: shape}) of the model built on the meta device: shapes only, no storage."""
    import torch

    from .model import InternLM2

    with torch.device("meta"):
        model = InternLM2(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    embedding = model.model.tok_embeddings.weight.numel()
    summary = {"role": role, "params": params, "params_b": round(params / 1e9, 2),
               "non_embedding_params": params - 2 * embedding, "config": dataclasses.asdict(cfg)}
    return summary, shapes


def check_weights(report: Report, source: ModelInput, expected: dict[str, tuple]) -> None:
    """The input's weights must have the names and shapes the config promises (lm2 / HF InternLM2 names)."""
    from .convert import folder_model_type

    if folder_model_type(source.path) == "llama":
        report.notes.append(f"{source.path}: Llama-format weights; names are mapped at load, shapes not checked here")
        return
    found = report.attempt(lambda: weight_shapes(source.path))
    if found is None:
        return
    wrong = [k for k, shape in expected.items() if k in found and tuple(found[k]) != tuple(shape)]
    missing = [k for k in expected if k not in found]
    if wrong:
        k = wrong[0]
        report.problems.append(f"{source.path}: {k} is {list(found[k])}, the config says {list(expected[k])} "
                               f"({len(wrong)} tensors differ)")
    elif missing:
        report.problems.append(f"{source.path}: weights lack {missing[0]} ({len(missing)} tensors missing)")


def weight_shapes(folder: Path) -> dict[str, tuple]:
    """{name: shape} from the safetensors headers of the files the run would load (`convert.weight_files`:
    model.safetensors or an index's shards). Only each header is read (8-byte length + JSON): no tensor,
    and no mmap of a 40 GB file."""
    from .convert import weight_files

    shapes = {}
    for f in weight_files(folder):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
        except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{f}: unreadable safetensors header ({e}); the checkpoint is corrupt or partial") from None
    return shapes


def deepspeed_for(report: Report, cfg: TrainConfig, ds: Optional[dict] = None) -> None:
    """The DeepSpeed config (`ds`: one `--plan` chose) and whether the world size can run it."""
    from .train.engine import deepspeed_config

    ds = ds or report.attempt(lambda: deepspeed_config(cfg, report.world), "deepspeed")
    if ds is None:
        return
    report.deepspeed = ds
    hpz = int(ds["zero_optimization"].get("zero_hpz_partition_size", 1))
    if hpz > 1 and report.world % hpz:
        report.problems.append(f"world size {report.world} is not a multiple of hpz_partition_size {hpz} (ZeRO++ "
                               f"hpZ groups of {hpz} ranks); run on a multiple of {hpz} ranks or change it")


def memory_for(report: Report, cfg: ModelConfig, train: TrainConfig, role: str = "train") -> None:
    """`lm2 plan`'s per-rank memory for this run's layout; on a GPU, compared with its memory."""
    from . import plan

    ds = report.deepspeed
    stage = int(ds.get("zero_optimization", {}).get("stage", train.resolved_zero_stage)) if ds else \
        train.resolved_zero_stage
    hpz = int(ds.get("zero_optimization", {}).get("zero_hpz_partition_size", 1)) if ds else 1
    shape = plan.ModelShape.from_config(cfg)
    tokens = train.seq_len * train.micro_batch_size * train.grad_accum * report.world
    work = plan.Workload(shape, train.seq_len, tokens, train.precision)
    layout = plan.Layout(report.world, stage, train.micro_batch_size, train.grad_accum,
                         train.activation_checkpointing, hpz, bucket=min(plan.REDUCE_BUCKET, shape.params))
    mem = plan.memory(work, layout)
    entry = {"layout": layout.describe(), "gib": mem.gib()}
    report.memory[role] = entry
    fits(report, role, layout.describe(), mem.total)


def fits(report: Report, role: str, layout: str, nbytes: float) -> None:
    capacity = report.capacity_gib
    if capacity is not None and nbytes / GiB > capacity:
        report.problems.append(f"{role}: {layout} needs {nbytes / GiB:.1f} GiB per rank, the {report.gpu} has "
                               f"{capacity:g} GiB (`lm2 plan` finds a layout that fits)")


def token_store(report: Report, ws: Workspace):
    """The token store and its tokenizer, or (None, None) reported as missing."""
    from .tokens import TokenStore

    if not report.read("token shards", ws.tokens, (ws.tokens / MANIFEST).exists(), hint="run `lm2 tokenize` first"):
        return None, None
    store = report.attempt(lambda: TokenStore(ws.tokens), "token shards")
    tok = report.attempt(store.tokenizer, "token shards' tokenizer") if store is not None else None
    if tok is not None:
        report.inputs[-1]["detail"] = f"tokenizer {tok.fingerprint[:19]}…, vocabulary {tok.vocab_size:,}"
    return store, tok


def packed_batch(report: Report, store, cfg: TrainConfig) -> None:
    """The first global batch of the packed stream (all ranks' micro-batches of one optimizer step): the
    same samples the ranks draw, since sample k's source and contents depend on k alone."""
    from .train.data import IGNORE_INDEX, PackedStream

    per_step = cfg.micro_batch_size * cfg.grad_accum * report.world
    batch = {"micro_batch_per_rank": [cfg.micro_batch_size, cfg.seq_len], "grad_accum": cfg.grad_accum,
             "sequences": per_step, "tokens": per_step * cfg.seq_len, "long_fraction": cfg.long_fraction,
             "long_min_tokens": cfg.long_min_tokens}
    if store is None:
        report.batch = {**batch, "source": "config (no token shards)"}
        return
    stream = report.attempt(lambda: PackedStream.from_store(store, "train", cfg, 0, 1,
                                                            micro_batch_size=cfg.micro_batch_size * report.world),
                            "data stream")
    if stream is None:
        return
    report.notes += stream.notes
    targets = docs = long_ = 0
    for _ in range(cfg.grad_accum):
        first = stream.sample
        b = next(stream)
        targets += int((b["labels"] != IGNORE_INDEX).sum())
        docs += int((b["position_ids"] == 0).sum())
        long_ += sum(stream.is_long(k) for k in range(first, stream.sample))
    batch.update(source=str(store.path), target_tokens=targets, document_pieces=docs, long_sequences=long_,
                 short_sequences=per_step - long_)
    report.batch = batch


def source_model(report: Report, ws: Workspace, run: str, given: Optional[Path], stages: tuple,
                 what: str = "--from", hint: str = "") -> Optional[ModelInput]:
    """The model input the command would read, or None reported as missing / wrong."""
    path = would_read(ws, run, given, stages)
    if given is None and not (path / MANIFEST).exists():
        report.read("model", path, False, hint=hint)
        return None
    found = report.attempt(lambda: model_input(path, what))
    if found is not None:
        report.read("model", found.path, True, f"{found.kind}" + (f" from {found.stage}" if found.stage else ""))
    return found


def input_config(report: Report, source: Optional[ModelInput]) -> Optional[ModelConfig]:
    return report.attempt(lambda: read_model_config(source.path), "model config") if source else None


# ---------------------------------------------------------------------------------------------------
# The commands


def pretrain(ws: Workspace, recipe: Recipe, stage: int, run: str = "default", from_: Optional[Path] = None,
             nproc: Optional[int] = None, hostfile: Optional[Path] = None, gpu: Optional[str] = None,
             plan: bool = False) -> Report:
    from .pretrain import model_config, stage_config
    from .stages import check_same_tokenizer

    cfg = stage_config(recipe, stage)
    report = Report.start(f"pretrain --stage {stage}", recipe, nproc, hostfile, gpu)
    ds_config = None
    if plan:
        cfg, ds_config = report.attempt(lambda: _planned(report, recipe, stage, cfg), "--plan") or (cfg, None)
    store, tok = token_store(report, ws)
    source = None
    if stage > 1:
        if from_ is None:
            prev = STAGE_NAMES[stage - 1]
            source = source_model(report, ws, run, None, (prev,), hint=f"run `lm2 pretrain --stage {stage - 1}` first")
        else:
            source = source_model(report, ws, run, from_, ())
    elif from_ is not None:
        report.problems.append("stage 1 starts from freshly initialised weights; --from is for stages 2 and 3")
    src_cfg = input_config(report, source)
    if stage > 1 and src_cfg is None:
        # What the previous stage would hand over: the recipe's model at its context.
        src_cfg = model_config(recipe, stage_config(recipe, 1))
        if stage == 3:
            src_cfg = model_config(recipe, stage_config(recipe, 2), source=src_cfg)
        report.notes.append("model shape from the recipe (the input is missing)")
    if source is not None and tok is not None:
        report.attempt(lambda: check_same_tokenizer(source, tok, src_cfg.vocab_size))
    mc = report.attempt(lambda: model_config(recipe, cfg, tok, src_cfg if stage > 1 else None), "model")
    if mc is None:
        mc = model_config(recipe, cfg, None, src_cfg if stage > 1 else None)
    _finish_training(report, mc, cfg, source, store, writes=[ws.stage_dir(STAGE_NAMES[stage], run)],
                     ds_config=ds_config)
    return report


def _planned(report: Report, recipe: Recipe, stage: int, cfg: TrainConfig):
    """`--plan`'s layout for this world size on `--gpu`'s preset (a dry run has no device to detect)."""
    from . import plan
    from .pretrain import planned

    if report.gpu not in plan.GPUS:
        raise InputError("a dry run with --plan needs --gpu PRESET to plan for")
    return planned(recipe, stage, cfg, report.world, plan.cluster(report.world, report.per_node, report.gpu))


def extend_context(ws: Workspace, recipe: Recipe, run: str = "default", from_: Optional[Path] = None,
                   nproc: Optional[int] = None, hostfile: Optional[Path] = None, gpu: Optional[str] = None,
                   **overrides) -> Report:
    from .extend_context import KIND, extended_model_config, refuse_other_setting, resolve_config, train_config
    from .pretrain import model_config, stage_config
    from .stages import check_same_tokenizer

    ec = resolve_config(recipe.extend_context, **overrides)
    report = Report.start("extend-context", recipe, nproc, hostfile, gpu)
    source = source_model(report, ws, run, from_, PRETRAIN_STAGES, hint="run `lm2 pretrain` first")
    store, tok = token_store(report, ws)
    src_cfg = input_config(report, source)
    if src_cfg is None:
        src_cfg = model_config(recipe, stage_config(recipe, 1))
        report.notes.append("input shape from the recipe's stage 1 (the input is missing)")
    if source is not None and tok is not None:
        report.attempt(lambda: check_same_tokenizer(source, tok, src_cfg.vocab_size))
    mc = report.attempt(lambda: extended_model_config(src_cfg, ec), "extend_context") or src_cfg
    report.attempt(lambda: refuse_other_setting(ws.stage_dir(KIND, run), mc, "auto"))
    cfg = train_config(ec, src_cfg.max_position_embeddings)
    _finish_training(report, mc, cfg, source, store, writes=[ws.stage_dir(KIND, run)])
    return report


def sft(ws: Workspace, recipe: Recipe, run: str = "default", data: Optional[Path] = None,
        eval_data: Optional[Path] = None, from_: Optional[Path] = None, nproc: Optional[int] = None,
        hostfile: Optional[Path] = None, gpu: Optional[str] = None) -> Report:
    from .sft import KIND, data_paths
    from .stages import input_tokenizer

    cfg = recipe.sft
    report = Report.start("sft", recipe, nproc, hostfile, gpu)
    source = source_model(report, ws, run, from_, PRETRAIN_STAGES, hint="run `lm2 pretrain` first")
    paths = report.attempt(lambda: data_paths(cfg, data, eval_data), "sft data")
    if paths:
        report.read("conversations", paths[0], True)
    src_cfg = input_config(report, source)
    tok = report.attempt(lambda: input_tokenizer(ws, source.path if source else ws.tokenizer), "tokenizer")
    if src_cfg is None:
        from .pretrain import model_config

        src_cfg = model_config(recipe, recipe.pretrain.stage3)
        report.notes.append("model shape from the recipe (the input is missing)")
    elif tok is not None and tok.vocab_size > src_cfg.vocab_size:
        report.problems.append(f"the tokenizer has {tok.vocab_size} ids, the model only {src_cfg.vocab_size}")
    mc = dataclasses.replace(src_cfg, max_position_embeddings=max(cfg.max_len, src_cfg.max_position_embeddings))
    train = cfg.train
    if paths and tok is not None:
        train = _sft_batch(report, tok, paths[0], cfg, train) or train
    _finish_training(report, mc, train, source, None, writes=[ws.stage_dir(KIND, run)], batch_done=True)
    return report


def _sft_batch(report: Report, tok, path: Path, cfg, train: TrainConfig) -> Optional[TrainConfig]:
    """Conversations packed into rows as `lm2 sft` packs them; the first global batch in RowBatches' seeded
    order (all ranks' rows of one step); the step count from the rows."""
    from .chat import pack
    from .sft import load_conversations
    from .train.data import IGNORE_INDEX
    from .train.finetune import RowBatches

    examples, rejected, stats = load_conversations(tok, path, cfg.max_len)
    if not examples:
        report.problems.append(f"{path} has no trainable conversation ({stats.records} records, "
                               f"{len(rejected)} rejected)")
        return None
    rows = RowBatches(pack(examples, cfg.max_len, tok.pad_id, train.seed), train.micro_batch_size * report.world,
                      seed=train.seed)
    per_step = train.micro_batch_size * train.grad_accum * report.world
    steps = max(1, math.ceil(train.epochs * rows.n / per_step))
    targets = sum(int((next(rows)["labels"] != IGNORE_INDEX).sum()) for _ in range(train.grad_accum))
    report.batch = {"source": str(path), "micro_batch_per_rank": [train.micro_batch_size, cfg.max_len],
                    "grad_accum": train.grad_accum, "sequences": per_step, "tokens": per_step * cfg.max_len,
                    "target_tokens": targets, "conversations": len(examples), "rejected": len(rejected),
                    "rows": rows.n, "steps": steps}
    return dataclasses.replace(train, max_steps=steps)


def rlhf_reward(ws: Workspace, recipe: Recipe, run: str = "default", data: Optional[Path] = None,
                from_: Optional[Path] = None, nproc: Optional[int] = None, hostfile: Optional[Path] = None,
                gpu: Optional[str] = None) -> Report:
    from .align.run import REWARD_KIND, data_file, reward_train_config
    from .stages import input_tokenizer

    cfg = recipe.rlhf.reward
    report = Report.start("rlhf reward", recipe, nproc, hostfile, gpu)
    source = source_model(report, ws, run, from_, ("sft",), hint="run `lm2 sft` first")
    path = report.attempt(lambda: data_file(data, "pairs.jsonl", "preference data"))
    if path:
        report.read("preference pairs", path, True)
    src_cfg = input_config(report, source) or _recipe_chat_model(report, recipe)
    tok = report.attempt(lambda: input_tokenizer(ws, source.path if source else ws.tokenizer), "tokenizer")
    mc = dataclasses.replace(src_cfg, max_position_embeddings=max(cfg.train.seq_len, src_cfg.max_position_embeddings))
    batches = _pairs_batch(report, tok, path, recipe, cfg.train) if path and tok is not None else None
    train = reward_train_config(cfg, batches or 1, report.world)
    if batches:
        report.batch["steps"] = train.max_steps
    _finish_training(report, mc, train, source, None, writes=[ws.stage_dir(REWARD_KIND, run)], batch_done=True,
                     role="reward model", extra_params=mc.hidden_size)
    return report


def _pairs_batch(report: Report, tok, path: Path, recipe: Recipe, train: TrainConfig) -> Optional[int]:
    """The first batch of the pair stream; returns the batches per epoch."""
    from .align.records import load_records, parse_pair
    from .align.reward_model import encode_pairs, token_budget_groups

    cfg = recipe.rlhf.reward
    pairs, rejected = load_records(path, parse_pair, dict(recipe.rlhf.conditions))
    encoded, too_long = encode_pairs(tok, pairs, dict(recipe.rlhf.conditions), train.seq_len, cfg.use_conditions)
    if not encoded:
        report.problems.append(f"{path} has no usable preference pair ({len(rejected) + len(too_long)} rejected)")
        return None
    groups = token_budget_groups(encoded, cfg.tokens_per_batch)
    width = max(p.width for p in groups[0])
    report.batch = {"source": str(path), "pairs": len(encoded), "rejected": len(rejected) + len(too_long),
                    "tokens_per_batch": cfg.tokens_per_batch, "first_batch": [2 * len(groups[0]), width],
                    "batches_per_epoch": len(groups), "grad_accum": train.grad_accum, "ranks": report.world}
    return len(groups)


def rlhf_ppo(ws: Workspace, recipe: Recipe, run: str = "default", data: Optional[Path] = None,
             from_: Optional[Path] = None, reward: Optional[Path] = None, nproc: Optional[int] = None,
             hostfile: Optional[Path] = None, gpu: Optional[str] = None) -> Report:
    from . import plan
    from .align.ppo import engine_config, ppo_layout
    from .align.rollout import require_backend
    from .align.run import PPO_KIND, data_file

    cfg = recipe.rlhf.ppo
    report = Report.start("rlhf ppo", recipe, nproc, hostfile, gpu)
    policy = source_model(report, ws, run, from_, ("sft",), hint="run `lm2 sft` first")
    rm = source_model(report, ws, run, reward, ("rlhf-reward",), what="--reward", hint="run `lm2 rlhf reward` first")
    _check_ppo_models(report, ws, policy, rm)
    path = report.attempt(lambda: data_file(data, "prompts.jsonl", "PPO prompts"))
    if path:
        report.read("prompts", path, True)
    pol_cfg = input_config(report, policy) or _recipe_chat_model(report, recipe)
    rm_cfg = input_config(report, rm) or pol_cfg
    length = cfg.max_prompt_len + cfg.max_new_tokens
    actor = dataclasses.replace(pol_cfg, max_position_embeddings=max(length, pol_cfg.max_position_embeddings))
    train = engine_config(cfg, cfg.actor_lr, cfg.iterations)
    for role, mc, src in (("actor", actor, policy), ("reference", pol_cfg, None), ("critic", rm_cfg, None),
                          ("reward model", rm_cfg, rm)):
        summary, shapes = meta_model(mc, role)
        if role in ("critic", "reward model"):
            summary["params"] += mc.hidden_size  # the scalar head
        report.models.append(summary)
        if src is not None:
            check_weights(report, src, shapes)
    deepspeed_for(report, train)
    report.attempt(lambda: require_backend(cfg))
    per_rank = report.attempt(lambda: ppo_layout(cfg, report.world)) or {}
    report.batch = {"prompts_per_iteration": cfg.prompts_per_iteration, "rollout_tokens": cfg.prompts_per_iteration
                    * length, "iterations": cfg.iterations, **per_rank}
    # lm2 plan's PPO model: the four models' resident states plus the larger of the rollout and update phases.
    layout = plan.RLHFLayout(report.world, per_rank.get("zero_stage", train.resolved_zero_stage),
                             cfg.micro_batch_size, cfg.generate_batch_size, cfg.activation_checkpointing,
                             cfg.frozen_offload)
    mem = plan.rlhf_memory(dataclasses.replace(recipe, model=pol_cfg), layout)
    report.memory["ppo"] = {"layout": layout.describe(), "gib": mem.gib()}
    fits(report, "ppo", layout.describe(), mem.total)
    report.writes = [str(ws.stage_dir(PPO_KIND, run))]
    return report


def _check_ppo_models(report: Report, ws: Workspace, policy: Optional[ModelInput], rm: Optional[ModelInput]) -> None:
    """The refusals `rlhf ppo` makes before building anything: a reward model as the policy, a policy as the
    reward model, and the two on different tokenizers."""
    from .align.reward_model import is_reward_folder
    from .stages import input_tokenizer

    if policy is not None and is_reward_folder(policy.path):
        report.problems.append(f"--from {policy.path} is a reward model; the policy starts from an SFT checkpoint")
    if rm is not None and not is_reward_folder(rm.path):
        report.problems.append(f"--reward {rm.path} is a plain checkpoint (no reward head); expected the output "
                               "of `lm2 rlhf reward`")
    if policy is not None and rm is not None:
        ours = report.attempt(lambda: input_tokenizer(ws, policy), "policy tokenizer")
        theirs = report.attempt(lambda: input_tokenizer(ws, rm), "reward tokenizer")
        if ours is not None and theirs is not None and ours.fingerprint != theirs.fingerprint:
            report.problems.append(f"the reward model {rm.path} uses another tokenizer than the policy {policy.path}")


def _recipe_chat_model(report: Report, recipe: Recipe) -> ModelConfig:
    from .pretrain import model_config

    report.notes.append("model shape from the recipe (the input is missing)")
    return model_config(recipe, recipe.pretrain.stage3, None)


def _finish_training(report: Report, mc: ModelConfig, cfg: TrainConfig, source: Optional[ModelInput], store,
                     writes: list, batch_done: bool = False, role: str = "model", extra_params: int = 0,
                     ds_config: Optional[dict] = None) -> None:
    summary, shapes = meta_model(mc, role)
    summary["params"] += extra_params
    summary["params_b"] = round(summary["params"] / 1e9, 2)
    report.models.append(summary)
    if source is not None:
        check_weights(report, source, shapes)
    deepspeed_for(report, cfg, ds_config)
    memory_for(report, mc, cfg)
    if not batch_done:
        packed_batch(report, store, cfg)
    report.writes = [str(w) for w in writes]
    for w in writes:
        resumes_from(report, Path(w))


def resumes_from(report: Report, stage_dir: Path) -> None:
    """`--resume auto` continues from the stage folder's newest whole checkpoint: say which."""
    from .train.checkpoint import find_resume

    ckpt = find_resume(stage_dir, quiet=True) if stage_dir.is_dir() else None
    if ckpt is not None:
        report.notes.append(f"{stage_dir} has checkpoints: --resume auto continues from {ckpt.name} "
                            "(--resume never starts over)")


# ---------------------------------------------------------------------------------------------------
# Output


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def show(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if os.isatty(1) else 150)
    status = "[green]could start[/green]" if report.ok else "[red]could not start[/red]"
    console.print(f"[bold]lm2 {report.command} --dry-run[/bold] (recipe {report.recipe}, {report.world} rank"
                  f"{'s' if report.world > 1 else ''}): {status}", soft_wrap=True)
    t = Table(show_edge=False, pad_edge=False, title="inputs", title_justify="left")
    for col in ("what", "path", "", "detail"):
        t.add_column(col, overflow="fold")
    for i in report.inputs:
        t.add_row(i["what"], i["path"], "ok" if i["found"] else "[red]missing[/red]", i["detail"])
    console.print(t)
    for m in report.models:
        c = m["config"]
        console.print(f"{m['role']}: [bold]{_count(m['params'])}[/bold] parameters ({m['params']:,}; "
                      f"non-embedding {_count(m['non_embedding_params'])}) on the meta device — hidden "
                      f"{c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']}/"
                      f"{c['num_key_value_heads']} heads, ffn {c['intermediate_size']}, vocab {c['vocab_size']:,}, "
                      f"context {c['max_position_embeddings']:,}, rope_theta {c['rope_theta']:g}", soft_wrap=True)
    if report.deepspeed:
        console.print(f"deepspeed: {json.dumps(report.deepspeed)}", soft_wrap=True, markup=False)
    if report.batch:
        console.print(f"first global batch: {json.dumps(report.batch)}", soft_wrap=True, markup=False)
    for role, m in report.memory.items():
        g = m["gib"]
        cap = f" of {report.capacity_gib:g} GiB ({report.gpu})" if report.capacity_gib else ""
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in g.items() if k not in ("total", "model_states") and v >= 0.05)
        console.print(f"memory per rank ({role}, {m['layout']}): {g['total']:.1f} GiB{cap} — {parts}", soft_wrap=True)
    for w in report.writes:
        console.print(f"would write: {w}", soft_wrap=True, markup=False)
    for n in report.notes:
        console.print(f"note: {n}", soft_wrap=True, markup=False, style="dim")
    for p in report.problems:
        console.print(f"problem: {p}", soft_wrap=True, markup=False, style="red")
