"""Needle grids and pictures: mean score per (depth, length) cell, the heatmap (report Fig. 13's colours)
and the table printed after a run."""

from __future__ import annotations

import math
from pathlib import Path

from .score import METRICS

COLORS = ("#F0496E", "#EBB839", "#0CD79F")  # OpenCompass / report Fig. 13, over 0-100


def grids(records: list[dict], lengths: list[int], depths: list[float]) -> dict[str, list[list[float | None]]]:
    """metric -> [depth][length] mean over repeats, in 0-100."""
    out = {}
    for metric in METRICS:
        cells: dict[tuple, list[float]] = {}
        for r in records:
            cells.setdefault((r["depth"], r["length"]), []).append(float(r[metric]) * (1 if metric == "edit" else 100))
        out[metric] = [[_mean(cells.get((d, n))) for n in lengths] for d in depths]
    return out


def _mean(xs: list[float] | None) -> float | None:
    return round(sum(xs) / len(xs), 2) if xs else None


def needle_cmap():
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("needle", list(COLORS))


def plot_heatmap(grid: list[list[float | None]], lengths: list[int], depths: list[float], path: Path,
                 title: str, trained_length: int | None = None, label: str = "score") -> Path:
    """Lengths on x, depth on y (0 at the top), 0-100 on the report's red-yellow-green scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cmap = needle_cmap()
    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(lengths) + 2.5), max(3.5, 0.38 * len(depths) + 1.8)))
    im = ax.imshow(data, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_fmt_len(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    if len(lengths) * len(depths) <= 400:
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=7, color="#222222")
    if trained_length is not None:
        inside = sum(1 for n in lengths if n <= trained_length)
        if 0 < inside < len(lengths):
            ax.axvline(inside - 0.5, color="white", linestyle="--", linewidth=1.5)
            ax.text(inside - 0.55, len(depths) - 0.6, f"trained length {_fmt_len(trained_length)}", fontsize=7,
                    rotation=90, ha="right", va="bottom", color="white")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_len(n: int) -> str:
    return f"{n / 1000:g}k" if n >= 1000 and n % 1000 == 0 else str(n)


def print_table(grid: list[list[float | None]], lengths: list[int], depths: list[float], title: str) -> None:
    from rich.table import Table

    from ...console import out

    table = Table(title=title, show_lines=False)
    table.add_column("depth %", justify="right")
    for n in lengths:
        table.add_column(str(n), justify="right")
    for d, row in zip(depths, grid):
        table.add_row(f"{d:g}", *[_cell(v) for v in row])
    cols = list(zip(*grid)) if grid else []
    table.add_row("mean", *[_cell(_mean([v for v in col if v is not None])) for col in cols], style="bold")
    out.print(table)


def _cell(v: float | None) -> str:
    if v is None:
        return "-"
    colour = "red" if v < 33.4 else "yellow" if v < 66.7 else "green"
    return f"[{colour}]{v:.0f}[/{colour}]"
