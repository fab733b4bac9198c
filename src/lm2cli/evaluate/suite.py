"""`lm2 eval` with no subcommand: the recipe's default suite into one report (`eval/<run>/report/`).

Parts (`eval.suite`): `ppl` on the validation split (`eval/<run>/ppl/`), `opencompass` on the recipe's
datasets, by default the bundled example tasks (`eval/<run>/opencompass/`), and a small needle grid —
the recipe's lengths × 5 depths × 2 repeats (`eval/<run>/needle-small/`; `lm2 eval needle` runs the
full grid). Each part writes its own artefact as its command would. A part that cannot run here (no
validation split, OpenCompass not installed) is reported as skipped with the reason, and the others
still run; when none runs, that is an error.

The report folder holds `report.md` and `report.json` (each part's headline numbers and where its
artefact is) and the plots: `bpb.png` (bits per byte by split), `opencompass.png` (score by dataset)
and `needle.png` (the needle heatmap, copied).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError

SMALL_NEEDLE = dict(depths=[0, 25, 50, 75, 100], repeats=2, name="needle-small")


def _ppl(ws, recipe, checkpoint, run) -> dict:
    from .ppl import run_ppl

    out = run_ppl(ws, recipe, checkpoint, run=run)
    res = json.loads((out / "results.json").read_text())
    return {"path": str(out), "all": res["all"], "split": res["split"], "lang": res["lang"]}


def _opencompass(ws, recipe, checkpoint, run) -> dict:
    from .opencompass_runner import run_opencompass

    out = run_opencompass(ws, recipe, checkpoint, run=run)
    summary = json.loads((out / "summary.json").read_text())
    return {"path": str(out), "template": summary["template"],
            "datasets": {k: {f: d[f] for f in ("mode", "n", "metric", "score")} for k, d in summary["datasets"].items()}}


def _needle(ws, recipe, checkpoint, run) -> dict:
    from .needle import run_needle

    out = run_needle(ws, recipe, run, checkpoint, **SMALL_NEEDLE)
    s = json.loads((out / "summary.json").read_text())
    return {"path": str(out), "mode": s["mode"], "main_metric": s["main_metric"], "mean": s["mean"],
            "by_length": s["by_length"], "heatmap": str(out / "heatmap.png")}


PARTS: dict[str, Callable] = {"ppl": _ppl, "opencompass": _opencompass, "needle": _needle}


def run_suite(ws, recipe, checkpoint: Path | None = None, *, run: str = "default", name: str = "report") -> Path:
    """Run `recipe.eval.suite` on a checkpoint and write `eval/<run>/<name>/`; returns that folder."""
    from ..console import log, warn
    from ..layout import now_iso, staging_dir, write_manifest
    from .common import resolve_checkpoint

    checkpoint = resolve_checkpoint(ws, run, checkpoint)
    parts: dict[str, dict] = {}
    for part in recipe.eval.suite:
        log(f"== lm2 eval: {part}")
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the parts' tables are for people; stdout is --json's
                parts[part] = {"status": "ok", **PARTS[part](ws, recipe, checkpoint, run)}
        except InputError as e:
            warn(f"eval {part} skipped: {e}")
            parts[part] = {"status": "skipped", "reason": str(e)}
    if not any(p["status"] == "ok" for p in parts.values()):
        raise InputError("no part of the eval suite could run: "
                         + "; ".join(f"{k}: {p['reason']}" for k, p in parts.items()))
    report = {"checkpoint": str(checkpoint), "created": now_iso(), "parts": parts}
    out = ws.eval_dir(name, run)
    with staging_dir(out) as tmp:
        report["plots"] = draw_plots(parts, tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        (tmp / "report.md").write_text(report_markdown(report))
        write_manifest(tmp, "eval-report", config=recipe.eval,
                       inputs=[checkpoint, *(Path(p["path"]) for p in parts.values() if p["status"] == "ok")],
                       stats={k: p["status"] for k, p in parts.items()})
    log(f"wrote {out / 'report.md'}")
    return out


# ---------------------------------------------------------------------------------------------------
# Plots and Markdown


def draw_plots(parts: dict, folder: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    ppl = parts.get("ppl", {})
    if ppl.get("status") == "ok":
        names = list(ppl["split"])
        fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(names) + 2), 3.2))
        ax.bar(names, [ppl["split"][n]["bpb"] for n in names], color="#4C72B0")
        ax.axhline(ppl["all"]["bpb"], color="#C44E52", ls="--", label=f"all: {ppl['all']['bpb']:.3f}")
        ax.set_ylabel("bits per byte")
        ax.set_title("validation bits per byte by split")
        ax.legend()
        ax.tick_params(axis="x", rotation=30)
        _save(fig, folder / "bpb.png")
        plots["bpb"] = "bpb.png"
    oc = parts.get("opencompass", {})
    if oc.get("status") == "ok":
        names = list(oc["datasets"])
        fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(names) + 2), 3.2))
        ax.bar(names, [oc["datasets"][n]["score"] or 0 for n in names], color="#55A868")
        ax.set_ylim(0, 100)
        ax.set_ylabel("score")
        ax.set_title(f"OpenCompass ({oc['template']} template)")
        ax.tick_params(axis="x", rotation=30)
        _save(fig, folder / "opencompass.png")
        plots["opencompass"] = "opencompass.png"
    needle = parts.get("needle", {})
    if needle.get("status") == "ok" and Path(needle["heatmap"]).exists():
        shutil.copy2(needle["heatmap"], folder / "needle.png")
        plots["needle"] = "needle.png"
    return plots


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_markdown(report: dict) -> str:
    parts, plots = report["parts"], report.get("plots", {})
    lines = [f"# lm2 eval — {report['checkpoint']}", "", f"created {report['created']}", ""]
    for name, p in parts.items():
        lines.append(f"## {name}")
        lines.append("")
        if p["status"] != "ok":
            lines += [f"skipped: {p['reason']}", ""]
            continue
        lines += [f"artefact: `{p['path']}`", ""]
        if name == "ppl":
            lines += ["| split | tokens | loss | ppl | bits/byte |", "|---|---:|---:|---:|---:|"]
            for split, s in [("all", p["all"]), *p["split"].items()]:
                lines.append(f"| {split} | {s['tokens']} | {s['loss']:.4f} | {s['ppl']:.2f} | {s['bpb']:.4f} |")
        elif name == "opencompass":
            lines += [f"template: {p['template']}", "", "| dataset | mode | n | metric | score |", "|---|---|---:|---|---:|"]
            for abbr, d in p["datasets"].items():
                score = "—" if d["score"] is None else f"{d['score']:.2f}"
                lines.append(f"| {abbr} | {d['mode']} | {d['n']} | {d['metric']} | {score} |")
        elif name == "needle":
            lines += [f"mode {p['mode']}, mean {p['main_metric']} {p['mean'][p['main_metric']]}", "",
                      "| length | " + " | ".join(p["mean"]) + " |", "|---:|" + "---:|" * len(p["mean"])]
            for length, m in p["by_length"].items():
                lines.append(f"| {length} | " + " | ".join(f"{m[k]}" for k in p["mean"]) + " |")
        if name in ("ppl", "opencompass", "needle") and (plot := plots.get("bpb" if name == "ppl" else name)):
            lines += ["", f"![{name}]({plot})"]
        lines.append("")
    return "\n".join(lines)
