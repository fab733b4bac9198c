"""`fit`: the one training loop every stage runs (pretrain, SFT, reward model), written out in full.

    engine = DeepSpeed(model, cfg)                 engine.py
    resume (auto | never | <checkpoint>)           checkpoint.py: weights, optimizer, LR, RNG, data position
    for step in range(start, max_steps):
        for each of grad_accum micro-batches:
            loss, metrics = loss_fn(model, batch); backward; engine.step()
        log metrics.jsonl; eval every eval_every (and at step 0); async checkpoint every save_every;
        SIGTERM → save and stop
    final/ (HF format, manifest kind "checkpoint"), loss.png, the stage's manifest.json

Nothing here knows about pretraining: the caller brings the model, a stateful batch iterator (with
`state_dict()`/`load_state_dict()`, e.g. `data.PackedStream`), a `loss_fn(model, batch) -> (loss,
metrics)` and, optionally, `eval_data()` returning fresh validation batches.

Stage folder:

    <stage>/config.yaml        the resolved recipe          <stage>/deepspeed.json   the DeepSpeed config
    <stage>/metrics.jsonl      one line per step            <stage>/loss.png         loss curve
    <stage>/checkpoints/       see checkpoint.py            <stage>/final/           HF-format weights
    <stage>/manifest.json      kind = the stage, written last
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from ..config import to_yaml
from ..console import log, progress
from ..errors import InputError, Lm2Error
from ..layout import atomic_write_text, staging_dir, write_manifest
from .checkpoint import AsyncCheckpointer, find_resume, restore, verify
from .data import IGNORE_INDEX
from .engine import Dist, Engine, init_distributed, measure_peak_flops

METRICS = "metrics.jsonl"
CURVE = "loss.png"


class Stopped(Lm2Error):
    """SIGTERM arrived: a checkpoint was saved and the run stopped; rerunning the command resumes it."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a process it terminated


@dataclass
class FitResult:
    stage_dir: Path
    final: Path
    steps: int
    tokens: int
    first_loss: Optional[float]
    final_loss: Optional[float]
    eval_loss: Optional[float]
    seconds: float
    resumed_from: Optional[Path]


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over labelled positions (labels already shifted, -100 ignored), from
    the model's chunked head (train/loss.py): the B×T×V logits are never held in fp32."""
    labels = batch["labels"]
    total = model(batch["input_ids"], position_ids=batch.get("position_ids"), labels=labels)
    return total / target_tokens(batch).clamp(min=1), {}


def target_tokens(batch: dict) -> torch.Tensor:
    """How many positions of a micro-batch carry a label (the loss's denominator)."""
    return (batch["labels"] != IGNORE_INDEX).sum()


def fit(
    model: torch.nn.Module,
    cfg,
    batches: Iterator[dict],
    stage_dir: Path,
    *,
    kind: str,
    loss_fn: Callable[[Any, dict], tuple[torch.Tensor, dict]] = lm_loss,
    eval_data: Optional[Callable[[], Iterable[dict]]] = None,
    resume: str = "auto",
    tokenizer=None,
    inputs: Iterable[Path] = (),
    recipe: Any = None,
    dist: Optional[Dist] = None,
    ds_config: Optional[dict] = None,
    export: Optional[Callable] = None,
) -> FitResult:
    """Train `model` for `cfg.max_steps` optimizer steps into `stage_dir` (see the module docstring);
    callers that count in epochs turn them into `max_steps` first.

    `cfg` is a `TrainConfig`. `resume`: "auto" continues from the newest whole checkpoint in
    `stage_dir/checkpoints` (if any), "never" clears them and starts over, a path resumes from that
    checkpoint. `export(model, dir, tokenizer)` writes weights in HF form (default
    `lm2cli.model.save_model`); it may use only `model.config` and `model.state_dict()`.
    Raises `Stopped` after saving when SIGTERM arrives.
    """
    dist = dist or init_distributed()
    stage_dir = Path(stage_dir)
    ckpt_root = stage_dir / "checkpoints"
    metrics_path = stage_dir / METRICS
    t_start = time.perf_counter()
    start_ckpt = _resume_point(resume, ckpt_root, metrics_path, dist)

    engine = Engine(model, cfg, cfg.max_steps, dist, ds_config)
    module = engine.module
    config_yaml = to_yaml(recipe if recipe is not None else cfg)
    inputs = [Path(p) for p in inputs]
    saver = AsyncCheckpointer(ckpt_root, engine, dist, keep_last=cfg.keep_last, tokenizer=tokenizer, export=export,
                              model_config=getattr(module, "config", None), config_yaml=config_yaml, inputs=inputs)
    step, tokens, elapsed = 0, 0, 0.0
    if start_ckpt is not None:
        train_state, data_state = restore(start_ckpt, engine, dist)
        batches.load_state_dict(data_state)
        step, tokens, elapsed = train_state["step"], train_state["tokens"], train_state.get("elapsed", 0.0)
        if dist.is_main:
            log(f"{kind}: resuming from {start_ckpt} (step {step}/{cfg.max_steps})")
    if dist.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stage_dir / "config.yaml", config_yaml)
        atomic_write_text(stage_dir / "deepspeed.json", json.dumps(engine.config, indent=2) + "\n")
        _keep_metrics_until(metrics_path, step)

    dtype = torch.bfloat16 if engine.config.get("bf16", {}).get("enabled") else torch.float32
    peak = measure_peak_flops(dist.device, dtype)
    tokens_per_step = cfg.micro_batch_size * cfg.seq_len * cfg.grad_accum * dist.world
    flops_per_token = _flops_per_token(module, cfg.seq_len)
    if dist.is_main:
        log(f"{kind}: {_count(module):,} parameters, ZeRO-{engine.zero_stage} on {dist.world} rank(s) "
            f"({dist.device.type}), {tokens_per_step:,} tokens/step, matmul peak {peak / 1e9:.1f} GFLOP/s "
            f"({str(dtype).replace('torch.', '')})")

    if eval_data is not None and step == 0:  # where the stage starts from, on the same batches as later evals
        start_eval = round(evaluate(engine, eval_data, loss_fn, dist), 6)
        if dist.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": 0, "eval_loss": start_eval}) + "\n")
    stop = _StopFlag()
    segment_start = time.perf_counter()
    with stop.installed(), (progress(kind, total=cfg.max_steps) if dist.is_main else nullcontext()) as bar:
        if bar is not None and step:
            bar.advance(step)
        module.train()
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = engine.lr()
            micro = [_to_device(next(batches), dist.device) for _ in range(cfg.grad_accum)]
            mean, extras, grad_norm = train_step(engine, micro, loss_fn, dist)
            step += 1
            stopping = stop.agreed(dist)
            tps = tokens_per_step / (time.perf_counter() - t0)
            tokens += tokens_per_step
            record = {"step": step, "loss": round(float(mean), 6), "lr": lr, "grad_norm": _round(grad_norm),
                      "tokens": tokens, "tokens_per_s": round(tps, 1),
                      "mfu": round(tps / dist.world * flops_per_token / peak, 5)}
            record.update({k: round(float(v), 6) for k, v in extras.items()})
            if eval_data is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                record["eval_loss"] = round(evaluate(engine, eval_data, loss_fn, dist), 6)
            record["elapsed"] = round(elapsed + time.perf_counter() - segment_start, 3)
            if dist.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.advance(1, info=f"loss {record['loss']:.4f} lr {lr:.2e} {tps:,.0f} tok/s")
            if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
                train_state = {"step": step, "tokens": tokens, "elapsed": record["elapsed"], "loss": record["loss"],
                               "world": dist.world, "zero_stage": engine.zero_stage}
                saver.save(step, batches.state_dict(), train_state)
            if stopping:
                saver.wait()
                raise Stopped(f"{kind} stopped by SIGTERM at step {step}/{cfg.max_steps}; checkpoint "
                              f"{saver.root / f'step-{step:08d}'} saved; rerun the same command to resume")
    saver.wait()
    return _finish(engine, cfg, stage_dir, kind, dist, tokenizer, inputs, export, start_ckpt, step, tokens,
                   elapsed + time.perf_counter() - segment_start, t_start)


# ---------------------------------------------------------------------------------------------------
# Pieces of the loop


def train_step(engine: Engine, micro: list[dict], loss_fn, dist: Dist) -> tuple[torch.Tensor, dict, Optional[float]]:
    """One optimizer step over this rank's micro-batches; returns (the step's loss, mean metrics, grad norm).

    The gradient is that of one big batch: the mean over every target token of the step, on every rank.
    Each micro-batch's mean loss is weighted by its share of the step's target tokens (counted across
    micro-batches and ranks, so short SFT rows or packed tails weigh what their tokens weigh). DeepSpeed
    then divides each backward by grad_accum (`engine.backward` scales by 1/gradient_accumulation_steps)
    and averages gradients over the data-parallel ranks (ZeRO 0-3 all divide the reduced gradient by the
    world size), which the factor grad_accum × world undoes. Batches without labels (reward pairs) keep
    equal weights. The returned loss is the step's true mean per target token over all ranks."""
    k = len(micro)
    if all("labels" in b for b in micro):
        counts = torch.stack([target_tokens(b) for b in micro]).float()
        total = _all_sum(counts.sum().reshape(1), dist)[0]
        weights = (counts / total.clamp(min=1)).tolist()
    else:
        weights = [1.0 / (k * dist.world)] * k
    loss_sum, extras, grad_norm = torch.zeros(()), {}, None
    for batch, w in zip(micro, weights):
        loss, metrics = loss_fn(engine.model, batch)
        engine.backward(loss * (w * k * dist.world))
        grad_norm = engine.step()
        loss_sum = loss_sum + loss.detach().float().cpu() * w
        for name, v in metrics.items():
            extras[name] = extras.get(name, 0.0) + float(v) / k
    if extras:
        extras = dict(zip(extras, _all_mean(torch.tensor(list(extras.values())), dist).tolist()))
    return _all_sum(loss_sum.reshape(1), dist)[0], extras, grad_norm


def _resume_point(resume: str, ckpt_root: Path, metrics_path: Path, dist: Dist) -> Optional[Path]:
    if resume == "never":
        if dist.is_main and ckpt_root.exists():
            log(f"--resume never: removing the old checkpoints in {ckpt_root}")
            import shutil

            shutil.rmtree(ckpt_root)
        if dist.is_main:
            metrics_path.unlink(missing_ok=True)
        _barrier(dist)
        return None
    if resume == "auto":
        return find_resume(ckpt_root, quiet=not dist.is_main)
    path = Path(resume)
    reason = verify(path) if path.is_dir() else "no such folder"
    if reason:
        raise InputError(f"--resume {resume}: not a whole checkpoint ({reason})")
    return path


def _keep_metrics_until(path: Path, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint, so the curve has each step once."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


@torch.no_grad()
def evaluate(engine: Engine, eval_data: Callable[[], Iterable[dict]], loss_fn, dist: Dist) -> float:
    """Mean loss over the validation batches `eval_data()` yields (the same batches every time), per target
    token where batches carry labels (as the training loss), else per batch."""
    engine.module.eval()
    sums = torch.zeros(2)
    for batch in eval_data():
        batch = _to_device(batch, dist.device)
        weight = target_tokens(batch).float().cpu() if "labels" in batch else torch.tensor(1.0)
        sums += torch.stack([loss_fn(engine.model, batch)[0].detach().float().cpu() * weight, weight])
    engine.module.train()
    total, weight = _all_sum(sums, dist).tolist()
    return total / weight if weight > 0 else float("nan")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _all_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    t = t.detach().float().to(dist.device)
    if dist.world > 1:
        torch.distributed.all_reduce(t)
    return t.cpu()


def _all_mean(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    t = t.detach().float().to(dist.device)
    if dist.world > 1:
        torch.distributed.all_reduce(t)
        t = t / dist.world
    return t.cpu()


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isnan(x) else round(x, 6)


def _count(module: torch.nn.Module) -> int:
    fn = getattr(module, "num_params", None)
    return fn() if callable(fn) else sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def _flops_per_token(module: torch.nn.Module, seq_len: int) -> float:
    fn = getattr(module, "flops_per_token", None)
    return float(fn(seq_len)) if callable(fn) else 6.0 * _count(module)


class _StopFlag:
    """SIGTERM sets a flag; the loop saves and stops at the end of the step, on every rank together."""

    def __init__(self):
        self.requested = False

    @contextmanager
    def installed(self):
        def handler(signum, frame):
            self.requested = True

        try:
            old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no signal handling
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, old)

    def agreed(self, dist: Dist) -> bool:
        if dist.world == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=dist.device)
        torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)


# ---------------------------------------------------------------------------------------------------
# The end of a stage


def _finish(engine: Engine, cfg, stage_dir: Path, kind: str, dist: Dist, tokenizer, inputs: list[Path],
            export, start_ckpt, step: int, tokens: int, train_seconds: float, t_start: float) -> FitResult:
    from ..convert import save_model

    final = stage_dir / "final"
    history = read_metrics(stage_dir / METRICS) if dist.is_main else []
    losses = [r["loss"] for r in history if "loss" in r]
    first, last = (losses[0], losses[-1]) if losses else (None, None)
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    stats = {"steps": step, "tokens": tokens, "first_loss": first, "final_loss": last,
             "first_eval_loss": evals[0] if evals else None, "eval_loss": evals[-1] if evals else None,
             "train_seconds": round(train_seconds, 2),
             "tokens_per_s": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
             "mfu": _mean([r.get("mfu") for r in history]), "world": dist.world,
             "zero_stage": engine.zero_stage}
    weights = engine.exportable()  # rank 0 only: gathered module by module, never whole on a device
    if dist.is_main:
        with staging_dir(final) as tmp:
            (export or save_model)(weights, tmp, tokenizer)
            write_manifest(tmp, "checkpoint", config=weights.config, inputs=inputs, stats=stats, stage=kind)
    if dist.is_main:
        plot_losses(history, stage_dir / CURVE, title=kind)
        stats["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        config = {"train": cfg, "model": getattr(engine.module, "config", None), "deepspeed": engine.config}
        write_manifest(stage_dir, kind, config=config, inputs=inputs, stats=stats, final="final",
                       resumed_from=str(start_ckpt) if start_ckpt else None)
        ev = f" (eval {evals[0]} -> {evals[-1]})" if evals else ""
        log(f"{kind}: {step} steps, loss {first} -> {last}{ev}, {tokens:,} tokens; final weights in {final}")
    _barrier(dist)
    return FitResult(stage_dir, final, step, tokens, first, last, stats["eval_loss"], train_seconds,
                     start_ckpt)


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 5) if xs else None


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(history: list[dict], png: Path, title: str = "") -> Optional[Path]:
    """Training loss per step and eval loss where measured, as a PNG (matplotlib's Agg backend)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    ev = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
