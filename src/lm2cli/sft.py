"""`lm2 sft`: supervised fine-tuning on ChatML conversations (SPEC §7) through the shared `fit`.

    input model  --from (a checkpoint or stage folder), else the run's latest pretrain final/
                 (stage 3, else 2, else 1)
    data         --data / sft.data JSONL, one `{"messages": [...]}` per line, else the bundled
                 examples/sft/train.jsonl; --eval-data / sft.eval_data for the eval loss
    writes       runs/<run>/sft/: rejected.jsonl (every record not trained on, with its reason),
                 checkpoints/, metrics.jsonl, loss.png, final/ (weights, tokenizer, generation_config.json
                 with eos [</s>, <|im_end|>]), manifest.json (kind `sft`, data counts under stats.data)

Conversations become (ids, loss mask) with `lm2cli.chat` (template, assistant-only loss, turn-boundary
truncation at `max_len`), are packed into rows of `max_len` with positions restarting per conversation,
and are served by `RowBatches`: a seeded order reshuffled each epoch, whose position is one integer,
so `--resume auto` continues on the very next row. Steps = ceil(epochs · rows / global batch).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

from .config import Recipe, examples_dir
from .console import log, print_json, warn
from .errors import InputError
from .layout import MANIFEST, Workspace, atomic_write_text
from .stages import input_tokenizer, latest_pretrained
from .train.finetune import RowBatches, build_model

KIND = "sft"
REJECTED = "rejected.jsonl"


def data_paths(cfg, data: Optional[Path], eval_data: Optional[Path]) -> tuple[Path, Optional[Path]]:
    """The training and (optional) eval JSONL; the bundled pair when nothing is given."""
    bundled = examples_dir() / "sft"
    train = Path(data or cfg.data or bundled / "train.jsonl")
    if eval_data is not None or cfg.eval_data:
        ev = Path(eval_data or cfg.eval_data)
        ev = None if str(ev) == "none" else ev
    else:
        ev = bundled / "test.jsonl" if train.resolve() == (bundled / "train.jsonl").resolve() else None
    for p in (train, ev):
        if p is not None and not p.is_file():
            raise InputError(f"SFT data {p} does not exist (expected a .jsonl file of conversations)")
    return train, ev


def load_conversations(tok, path: Path, max_len: int):
    from .chat import build_examples

    with open(path, encoding="utf-8") as f:
        return build_examples(tok, f, max_len)


def eval_batches(tok, path: Optional[Path], max_len: int, micro_batch_size: int, n_batches: int, seed: int):
    """Zero-arg callable yielding the same packed validation batches each time, or None."""
    from .chat import pack

    if path is None or n_batches <= 0:
        return None
    examples, _, _ = load_conversations(tok, path, max_len)
    if not examples:
        return None
    rows = RowBatches(pack(examples, max_len, tok.pad_id, seed), micro_batch_size)
    count = min(n_batches, math.ceil(rows.n / micro_batch_size))
    fixed = [next(rows) for _ in range(count)]
    return lambda: iter(fixed)


def run_sft(ws: Workspace, recipe: Recipe, run: str = "default", data: Optional[Path] = None,
            from_: Optional[Path] = None, resume: str = "auto", eval_data: Optional[Path] = None,
            json_out: bool = False) -> Path:
    """Fine-tune into runs/<run>/sft/ (see the module docstring); returns that folder."""
    from .chat import pack
    from .train.engine import init_distributed
    from .train.loop import fit

    cfg = recipe.sft
    source = latest_pretrained(ws, run, from_)
    train_path, eval_path = data_paths(cfg, data, eval_data)
    stage_dir = ws.stage_dir(KIND, run)
    dist = init_distributed()
    tok = input_tokenizer(ws, source)
    examples, rejected, stats = load_conversations(tok, train_path, cfg.max_len)
    if dist.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stage_dir / REJECTED, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
        if rejected:
            warn(f"sft: {len(rejected)} of {stats.records} records rejected ({_reasons(stats.rejected)}); "
                 f"see {stage_dir / REJECTED}")
    if not examples:
        raise InputError(f"{train_path} has no trainable conversation ({stats.records} records, "
                         f"{len(rejected)} rejected: {_reasons(stats.rejected) or 'empty file'})")
    train = cfg.train
    rows = pack(examples, cfg.max_len, tok.pad_id, train.seed)
    batches = RowBatches(rows, train.micro_batch_size, dist.rank, dist.world, train.seed)
    steps = max(1, math.ceil(train.epochs * batches.n / (train.micro_batch_size * train.grad_accum * dist.world)))
    train = dataclasses.replace(train, max_steps=steps)
    data_stats = {**dataclasses.asdict(stats), "rows": batches.n, "max_len": cfg.max_len, "epochs": train.epochs,
                  "fill": round(stats.tokens / (batches.n * cfg.max_len), 4), "rejected_file": REJECTED}
    if dist.is_main:
        log(f"sft: {stats.kept} conversations ({stats.truncated} truncated, {len(rejected)} rejected) -> "
            f"{batches.n} rows of {cfg.max_len} ({data_stats['fill']:.0%} full), {stats.loss_tokens:,} trained "
            f"tokens; {steps} steps from {source.path}")
    model = build_model(source.path, cfg.max_len, tok, train, dist)
    inputs = [source.path, train_path] + ([eval_path] if eval_path else [])
    result = fit(model, train, batches, stage_dir, kind=KIND, resume=resume, tokenizer=tok, inputs=inputs,
                 recipe=recipe, dist=dist,
                 eval_data=eval_batches(tok, eval_path, cfg.max_len, train.micro_batch_size, train.eval_batches,
                                        train.seed))
    if dist.is_main:
        _add_data_stats(stage_dir, data_stats)
        if json_out:
            print_json({**dataclasses.asdict(result), "data": data_stats})
    return stage_dir


def _reasons(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _add_data_stats(stage_dir: Path, data_stats: dict) -> None:
    """`fit` wrote the stage manifest; the SFT data counts join its stats (rewritten atomically)."""
    path = stage_dir / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.setdefault("stats", {})["data"] = data_stats
    atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
