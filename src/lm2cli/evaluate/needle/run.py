"""`lm2 eval needle` / `lm2 needle`: the command — settings, the checkpoint, the grid, the artefact.

Writes `eval/<run>/needle-<mode>/`: results.jsonl (one line per sample), summary.json (grids per
metric), heatmap.png (the mode's main score: exact for passkey, edit for en/zh) and
heatmap-<metric>.png for the others, manifest.json (kind `eval-needle`).

All samples of the grid are scored together, batched by prompt length (evaluate/parallel.py); with
`--nproc N` the batches are shared among N ranks and the results are the same as one rank's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ...config import NeedleConfig, Recipe
from ...errors import InputError
from ...layout import Workspace
from .haystack import TASKS, LengthTooShort, Sample, build_sample, resolve_haystack
from .plot import grids, plot_heatmap, print_table
from .score import METRICS, score_batch


def resolve_config(base: NeedleConfig, **overrides) -> NeedleConfig:
    """The recipe's `eval.needle` with the command-line overrides that were given (None = not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return dataclasses.replace(base, **given)
    except TypeError as e:
        raise InputError(str(e)) from None


def _counter(cfg: NeedleConfig, model_tok):
    if cfg.token_counter == "model":
        return model_tok
    from ...tokenizer import Tokenizer

    return Tokenizer.default()  # cl100k ids, as CDME counts with tiktoken's gpt-4 encoding


def _rope_overrides(cfg: NeedleConfig, eval_default: dict | None = None) -> dict:
    """--rope-scaling, else eval.needle.rope_scaling, else eval.rope_scaling, else the checkpoint's own."""
    if cfg.rope_scaling is None:
        return {"rope_scaling": dict(eval_default)} if eval_default else {}
    if cfg.rope_scaling == "none":
        return {"rope_scaling": None}
    return {"rope_scaling": {"type": cfg.rope_scaling, "factor": float(cfg.factor)}}


def default_name(cfg: NeedleConfig) -> str:
    name = f"needle-{cfg.mode}"
    if cfg.rope_scaling and cfg.rope_scaling != "none":
        name += f"-{cfg.rope_scaling}{cfg.factor:g}"
    return name


def resolve_template(cfg: NeedleConfig, checkpoint: Path) -> str:
    """raw or chat: `eval.needle.template`, where auto means chat for a chat checkpoint (SFT/RLHF stages,
    or an HF folder whose tokenizer config has a chat template)."""
    from ..common import is_chat_checkpoint

    if cfg.template != "auto":
        return cfg.template
    return "chat" if is_chat_checkpoint(checkpoint) else "raw"


def run_needle(
    ws: Workspace,
    recipe: Recipe,
    run: str = "default",
    checkpoint: Path | None = None,
    *,
    mode: str | None = None,
    lengths: list[int] | None = None,
    depths: list[float] | None = None,
    repeats: int | None = None,
    rope_scaling: str | None = None,
    factor: float | None = None,
    haystack: str | None = None,
    template: str | None = None,
    name: str | None = None,
    json_out: bool = False,
    nproc: int = 1,
) -> Path:
    """Run the grid on a checkpoint and write eval/<run>/<name>/; returns that folder."""
    import contextlib
    import time

    from ...console import log, print_json, progress, warn
    from ...layout import atomic_write_text, staging_dir, write_manifest
    from ..common import load_checkpoint, resolve_checkpoint
    from ..parallel import barrier, join, map_batches, relaunch_eval, wants_relaunch

    cfg = resolve_config(recipe.eval.needle, mode=mode, lengths=lengths, depths=depths, repeats=repeats,
                         rope_scaling=rope_scaling, factor=factor, haystack=haystack, template=template)
    path = resolve_checkpoint(ws, run, checkpoint)
    out_dir = ws.eval_dir(name or default_name(cfg), run)
    if wants_relaunch(nproc):
        ranks_recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, needle=cfg))
        relaunch_eval(ws, ranks_recipe, run, nproc, ["needle", str(path), "--name", out_dir.name], out_dir.name)
        if json_out:
            summary = json.loads((out_dir / "summary.json").read_text())
            print_json({"out": str(out_dir), **{k: summary[k] for k in ("mode", "main_metric", "mean", "by_length")}})
        return out_dir
    world = join()
    model, tok = load_checkpoint(path, device=world.device, dtype=recipe.eval.dtype,
                                 **_rope_overrides(cfg, recipe.eval.rope_scaling))
    mcfg = model.config
    trained = int(mcfg.max_position_embeddings)  # extend-context writes the length it trained at here
    task = TASKS[cfg.mode]
    counter = _counter(cfg, tok)
    hay = resolve_haystack(ws, cfg.mode, cfg.haystack, seed=cfg.seed)
    tmpl = resolve_template(cfg, path)
    if world.is_main:
        log(f"needle {cfg.mode}: {path} ({_rope_desc(mcfg)}, {str(next(model.parameters()).dtype)[6:]}, {tmpl} "
            f"prompts), haystack {hay.source}, {len(cfg.lengths)} lengths x {len(cfg.depths)} depths x "
            f"{cfg.repeats} repeats{f' on {world.size} ranks' if world.size > 1 else ''}")

    t0 = time.perf_counter()
    samples: list[Sample] = []
    skipped: list[int] = []
    for length in cfg.lengths:
        try:
            samples += [build_sample(task, hay, counter, tok, length, d, r, seed=cfg.seed, buffer=cfg.length_buffer,
                                     n_choices=cfg.choices, bos_id=tok.bos_id, template=tmpl)
                        for d in cfg.depths for r in range(cfg.repeats)]
        except LengthTooShort as e:
            if world.is_main:
                warn(f"{e}; skipping that length")
            skipped.append(length)
    if not samples:
        raise InputError(f"no grid length fits the {cfg.mode} needle's prompt; use longer eval.needle.lengths")

    def score(idx: list[int]) -> dict[int, dict]:
        return dict(zip(idx, score_batch(model, tok, [samples[i] for i in idx], task.mode, cfg.max_new_tokens,
                                         cfg.trim)))

    bar = progress("needle", total=-(-len(samples) // world.size)) if world.is_main else contextlib.nullcontext()
    with bar as task_bar:
        records = map_batches([len(s.ids) for s in samples], recipe.eval.batch_size, world, score,
                              task_bar.advance if task_bar is not None else None)
    if not world.is_main:
        barrier(world)  # rank 0 writes the artefact
        return out_dir

    lengths = [n for n in cfg.lengths if n not in skipped]
    grid = grids(records, lengths, cfg.depths)
    main = "exact" if cfg.mode == "passkey" else "edit"
    summary = _summary(cfg, lengths, path, mcfg, trained, hay, grid, records, main, time.perf_counter() - t0)
    summary.update(skipped_lengths=skipped, template=tmpl, dtype=str(next(model.parameters()).dtype)[6:],
                   ranks=world.size)
    title = f"{cfg.mode} needle · {path.parent.name + '/' if path.name == 'final' else ''}{path.name} · {_rope_desc(mcfg)}"
    with staging_dir(out_dir) as tmp:
        atomic_write_text(tmp / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        for metric in METRICS:
            fname = "heatmap.png" if metric == main else f"heatmap-{metric}.png"
            plot_heatmap(grid[metric], lengths, cfg.depths, tmp / fname,
                         f"{title}\n{_METRIC_LABEL[metric]} (mean {summary['mean'][metric]:.1f})",
                         trained_length=trained, label=_METRIC_LABEL[metric])
        write_manifest(tmp, "eval-needle", config=cfg, inputs=[path],
                       stats={"mean": summary["mean"], "main_metric": main, "samples": len(records),
                              "seconds": summary["seconds"]},
                       model=summary["model"])
    barrier(world)
    if json_out:
        print_json({"out": str(out_dir), **{k: summary[k] for k in ("mode", "main_metric", "mean", "by_length")}})
    else:
        print_table(grid[main], lengths, cfg.depths, f"{title} — {_METRIC_LABEL[main]}")
        log(f"wrote {out_dir} (mean {main} {summary['mean'][main]:.1f}, forced choice "
            f"{summary['mean']['choice']:.1f}, chance {100 / (cfg.choices + 1):.0f})")
    return out_dir


_METRIC_LABEL = {"exact": "exact match %", "edit": "edit-distance score", "choice": "forced choice %"}


def _rope_desc(cfg) -> str:
    rs = cfg.rope_scaling
    scaling = f", {rs['type']} x{float(rs.get('factor', 1)):g}" if rs else ""
    return f"RoPE base {cfg.rope_theta:g}{scaling}, trained {cfg.max_position_embeddings}"


def _summary(cfg, lengths, path, mcfg, trained, hay, grid, records, main, seconds) -> dict:
    def mean_of(rs, metric):
        vals = [float(r[metric]) * (1 if metric == "edit" else 100) for r in rs]
        return round(sum(vals) / len(vals), 2) if vals else None

    inside = [r for r in records if r["length"] <= trained]
    beyond = [r for r in records if r["length"] > trained]
    return {
        "mode": cfg.mode,
        "checkpoint": str(path),
        "model": {"rope_theta": mcfg.rope_theta, "rope_scaling": mcfg.rope_scaling,
                  "max_position_embeddings": mcfg.max_position_embeddings, "trained_length": trained},
        "haystack": hay.source,
        "token_counter": cfg.token_counter,
        "lengths": lengths,
        "depths": cfg.depths,
        "repeats": cfg.repeats,
        "choices": cfg.choices,
        "main_metric": main,
        "mean": {m: mean_of(records, m) for m in METRICS},
        "mean_within_trained_length": {m: mean_of(inside, m) for m in METRICS} if inside else None,
        "mean_beyond_trained_length": {m: mean_of(beyond, m) for m in METRICS} if beyond else None,
        "by_length": {str(n): {m: mean_of([r for r in records if r["length"] == n], m) for m in METRICS}
                      for n in lengths},
        "grids": grid,
        "seconds": round(seconds, 1),
    }
