"""`lm2 status`: the workspace's artefacts as a tree, with lineage and headline stats."""

from __future__ import annotations

import json
from pathlib import Path

from rich.tree import Tree

from .console import out, print_json
from .layout import MANIFEST, Workspace, fingerprint


def collect(workdir: str | Path | None) -> dict:
    ws = Workspace.at(workdir)
    by_fp: dict[str, str] = {}
    items = []
    for art in ws.artefacts():
        try:
            m = json.loads((art / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            items.append({"path": str(art.relative_to(ws.root)), "kind": "unreadable", "error": str(e)})
            continue
        rel = str(art.relative_to(ws.root))
        by_fp[fingerprint(art)] = rel
        items.append({
            "path": rel,
            "kind": m.get("kind"),
            "created": m.get("created"),
            "inputs": m.get("inputs", []),
            "headline": _headline(m.get("stats", {})),
        })
    for item in items:
        item["lineage"] = [by_fp.get(i.get("fingerprint"), i.get("path")) for i in item.get("inputs", [])]
        item.pop("inputs", None)
    return {"workdir": str(ws.root), "artefacts": items}


def _headline(stats: dict) -> dict:
    """Scalar stats only: enough for one line per artefact."""
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def show_status(workdir: str | Path | None, json_out: bool = False) -> dict:
    info = collect(workdir)
    if json_out:
        print_json(info)
        return info
    tree = Tree(f"[bold]{info['workdir']}[/bold]")
    nodes: dict[str, Tree] = {}
    for item in info["artefacts"]:
        parts = Path(item["path"]).parts
        parent = tree
        for depth in range(1, len(parts)):
            key = "/".join(parts[:depth])
            if key not in nodes:
                nodes[key] = parent.add(parts[depth - 1] + "/")
            parent = nodes[key]
        stats = ", ".join(f"{k}={_fmt(v)}" for k, v in list(item["headline"].items())[:6])
        label = f"[cyan]{parts[-1]}/[/cyan] [dim]{item['kind']}[/dim]"
        if stats:
            label += f"  {stats}"
        if item.get("lineage"):
            label += f"  [dim]← {', '.join(map(str, item['lineage']))}[/dim]"
        nodes[item["path"]] = parent.add(label)
    if not info["artefacts"]:
        tree.add("[dim](no artefacts yet: try `lm2 quickstart`)[/dim]")
    out.print(tree)
    return info


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
