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
from typing import Any, Mapping, Optional

from .config import Recipe, examples_dir
from .console import log, print_json, warn
from .errors import InputError
from .layout import MANIFEST, Workspace, atomic_write_text
from .stages import ModelInput, input_tokenizer, latest_pretrained

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


class RowBatches:
    """Micro-batches of packed rows: rank r of W takes rows [k + r·B, k + (r+1)·B) of the global order,
    where k counts rows consumed by all ranks; each epoch is a fresh seeded permutation."""

    def __init__(self, rows: Mapping[str, list], micro_batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        import torch

        self.data = {k: torch.tensor(v, dtype=torch.long) for k, v in rows.items()}
        self.n = len(rows["input_ids"])
        if self.n == 0:
            raise InputError("no packed rows to train on")
        self.batch, self.rank, self.world, self.seed = micro_batch_size, rank, world, seed
        self.consumed = 0
        self._epoch, self._order = -1, None

    def _row(self, j: int) -> int:
        import torch

        epoch, i = divmod(j, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=g)
        return int(self._order[i])

    def __iter__(self) -> "RowBatches":
        return self

    def __next__(self) -> dict:
        first = self.consumed + self.rank * self.batch
        idx = [self._row(j) for j in range(first, first + self.batch)]
        self.consumed += self.batch * self.world
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"rows_consumed": self.consumed, "rows": self.n, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("rows") != self.n or state.get("seed") != self.seed:
            raise InputError(f"the checkpoint was trained on {state.get('rows')} packed rows (seed {state.get('seed')}), "
                             f"this data packs into {self.n} (seed {self.seed}); resume with the same data and "
                             "recipe, or pass --resume never")
        self.consumed = int(state["rows_consumed"])


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


def build_model(source: Path, max_len: int, tok):
    """The source weights with a context of at least `max_len` (RoPE settings unchanged)."""
    import torch

    from .convert import load_model
    from .model import InternLM2

    src = load_model(source)
    if tok.vocab_size > src.config.vocab_size:
        raise InputError(f"{source}: the tokenizer has {tok.vocab_size} ids, the model only {src.config.vocab_size}")
    # SPEC P1: an HF-initialised `padding_idx = eos` leaves the EOS embedding at zero, and SFT must teach it.
    if not bool(src.model.tok_embeddings.weight[tok.eos_id].any()):
        warn(f"{source}: the </s> embedding row is all zeros (padding_idx = eos at init?); it trains from zero")
    cfg = dataclasses.replace(src.config, max_position_embeddings=max(max_len, src.config.max_position_embeddings),
                              bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    with torch.device("meta"):
        model = InternLM2(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(src.state_dict())
    return model


def load_tokenizer(ws: Workspace, source: ModelInput | Path):
    """Kept for align/run.py until it imports `stages.input_tokenizer` itself."""
    return input_tokenizer(ws, source)


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
    model = build_model(source.path, cfg.max_len, tok)
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
