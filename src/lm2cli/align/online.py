"""`lm2 rlhf online --rounds N`: COOL RLHF's multi-round loop with the fast-path patch (SPEC §8.2).

Each round n (folder runs/<run>/rlhf-ppo/round-n/, itself a PPO stage folder):

    pairs.jsonl       the reward data of this round: the given pairs + every patch so far
    reward/           the reward model trained on it (a `rlhf-reward` stage folder)
    metrics.jsonl ... PPO from the SFT policy against that reward model (as `lm2 rlhf ppo`)
    patch.json        what the fast path found: each hacking pattern's early vs late statistic
    patch.jsonl       the preference pairs it adds for the next round (early response chosen)

The fast path compares the round's early PPO responses (the critic warm-up and the first `window` of
actor iterations) with its late ones (the last `window`). A pattern is a length blow-up (late mean
length ≥ `length_ratio` × early) or repetition (late repeated-3-gram share ≥ early + `repetition_delta`).
For a pattern present in the round, every prompt answered both early (without the pattern) and late
(with it) gives a pair where the early response beats the late one (of the early answers without the
pattern, the most similar: the longest, least repetitive); 20–100 per pattern are kept
(InternLM2: "20–100 pairs per pattern are enough"), fewer than `patch_pairs_min` patch nothing.
Every round restarts PPO from the SFT policy, so rounds differ only in their reward model.
When all rounds are done, rlhf-ppo/final/ is the last round's actor and rlhf-ppo/manifest.json
summarises every round. A rerun skips rounds that already finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from ..config import Recipe
from ..console import log, print_json
from ..layout import MANIFEST, Workspace, atomic_write_text, staging_dir, write_manifest
from .records import read_jsonl
from .run import PPO_KIND, ROLLOUTS, data_file, policy_checkpoint, run_ppo, run_reward


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def early_late(rollouts: list[dict], iterations: int, warmup: int, window: float) -> tuple[list[dict], list[dict]]:
    """The round's early responses (warm-up + first `window` of actor iterations) and late ones (last `window`)."""
    w = max(1, round(window * max(1, iterations - warmup)))
    early = [r for r in rollouts if r["iteration"] <= warmup + w]
    late = [r for r in rollouts if r["iteration"] > iterations - w]
    return early, late


PATTERNS = ("length", "repetition")


def has_pattern(pattern: str, early: dict, late: dict, cfg) -> bool:
    if pattern == "length":
        return late["tokens"] >= cfg.length_ratio * max(1, early["tokens"])
    return late["repetition"] >= early["repetition"] + cfg.repetition_delta


def detect(early: list[dict], late: list[dict], cfg) -> dict[str, dict]:
    """Each pattern's early and late statistic and whether the round shows it."""
    e_len, l_len = _mean([r["tokens"] for r in early]), _mean([r["tokens"] for r in late])
    e_rep, l_rep = _mean([r["repetition"] for r in early]), _mean([r["repetition"] for r in late])
    return {
        "length": {"early": e_len, "late": l_len, "ratio": l_len / max(e_len, 1e-9),
                   "found": l_len >= cfg.length_ratio * max(e_len, 1e-9)},
        "repetition": {"early": e_rep, "late": l_rep, "delta": l_rep - e_rep,
                       "found": l_rep >= e_rep + cfg.repetition_delta},
    }


def patch_pairs(early: list[dict], late: list[dict], prompts: dict[int, dict], found: dict[str, dict], cfg,
                round_no: int) -> tuple[list[dict], dict[str, int]]:
    """Early-beats-late pairs for every pattern the round shows, one per prompt and pattern, capped."""
    by_line: dict[int, list[dict]] = {}
    for r in early:
        by_line.setdefault(r["line"], []).append(r)
    out, counts = [], {}
    for pattern in PATTERNS:
        if not found[pattern]["found"]:
            continue
        cands, used = [], set()
        for lr in late:
            if lr["line"] in used or lr["line"] not in prompts:
                continue
            clean = [er for er in by_line.get(lr["line"], []) if er["response"].strip()
                     and er["response"] != lr["response"] and has_pattern(pattern, er, lr, cfg)]
            if clean:
                used.add(lr["line"])
                rec = prompts[lr["line"]]
                # The early answer most like the late one (longest, least repetitive) that lacks the pattern:
                # the pair then teaches the pattern itself, not some other difference.
                best = max(clean, key=lambda er: (er["tokens"], -er["repetition"]))
                cands.append({"condition": lr["condition"], "prompt": rec["prompt"], "chosen": best["response"],
                              "rejected": lr["response"], "source": f"fast-path round {round_no}: {pattern}"})
        counts[pattern] = len(cands)
        if len(cands) >= cfg.patch_pairs_min:
            out += cands[:cfg.patch_pairs_max]
    return out, counts


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def run_online(ws: Workspace, recipe: Recipe, run: str = "default", data: Optional[Path] = None,
               prompts: Optional[Path] = None, from_: Optional[Path] = None, ptx: Optional[str] = None,
               json_out: bool = False, nproc: int = 1) -> Path:
    """`rounds` × (reward model → PPO → fast-path patch) into runs/<run>/rlhf-ppo/; returns that folder.
    The fast path runs in this process; with `nproc` > 1 each round's reward and PPO stages run as that
    many ranks (run from a launcher, this process is one of the ranks: use `--nproc` instead)."""
    from ..errors import InputError
    from ..train.engine import launched
    from .rollout import require_backend

    if launched():
        raise InputError("lm2 rlhf online starts each round's ranks itself: run it as one process with --nproc N")
    cfg, ppo_cfg = recipe.rlhf.online, recipe.rlhf.ppo
    require_backend(ppo_cfg)  # before round 1's reward model trains, not after it
    policy = policy_checkpoint(ws, run, from_)
    pairs_path = data_file(data, "pairs.jsonl", "preference data")
    prompts_path = data_file(prompts, "prompts.jsonl", "PPO prompts")
    prompt_records = {}
    for n, line in read_jsonl(prompts_path):
        try:
            prompt_records[n] = json.loads(line)
        except json.JSONDecodeError:
            pass  # run_ppo reports it in rejected.jsonl
    root = ws.stage_dir(PPO_KIND, run)
    base = "".join(line if line.endswith("\n") else line + "\n" for _, line in read_jsonl(pairs_path))
    patches: list[dict] = []
    summary = []
    for n in range(1, cfg.rounds + 1):
        rdir = root / f"round-{n}"
        if (rdir / MANIFEST).exists() and (rdir / "patch.jsonl").exists():
            log(f"rlhf online: round {n} already finished; reusing {rdir}")
            patches += [json.loads(x) for x in (rdir / "patch.jsonl").read_text().splitlines() if x.strip()]
            summary.append(json.loads((rdir / "patch.json").read_text()))
            continue
        log(f"== rlhf online: round {n}/{cfg.rounds} ({len(patches)} patch pairs so far)")
        rdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rdir / "pairs.jsonl", base + _jsonl(patches))
        reward_dir = run_reward(ws, recipe, run, data=rdir / "pairs.jsonl", from_=policy, stage_dir=rdir / "reward",
                                nproc=nproc)
        run_ppo(ws, recipe, run, data=prompts_path, from_=policy, reward=reward_dir / "final", ptx=ptx, stage_dir=rdir,
                nproc=nproc)
        rollouts = [json.loads(x) for x in (rdir / ROLLOUTS).read_text().splitlines() if x.strip()]
        early, late = early_late(rollouts, ppo_cfg.iterations, ppo_cfg.critic_warmup, cfg.window)
        found = detect(early, late, cfg)
        new, counts = patch_pairs(early, late, prompt_records, found, cfg, n)
        reward_eval = json.loads((reward_dir / MANIFEST).read_text())["stats"].get("eval", {})
        ppo_stats = json.loads((rdir / MANIFEST).read_text())["stats"]
        report = {"round": n, "patterns": found, "candidates": counts, "pairs_added": len(new),
                  "reward_accuracy": reward_eval.get("accuracy"), "ppo": ppo_stats,
                  "gold_late": _mean([r["gold"] for r in late if r.get("gold") is not None]) if late else None,
                  "length_late": found["length"]["late"], "reward_late": _mean([r["score"] for r in late])}
        atomic_write_text(rdir / "patch.jsonl", _jsonl(new))
        atomic_write_text(rdir / "patch.json", json.dumps(report, indent=2) + "\n")
        patches += new
        summary.append(report)
        shown = [f"{p} x{found[p].get('ratio', found[p].get('delta')):.2f}" for p in PATTERNS if found[p]["found"]]
        log(f"rlhf online: round {n}: hacking patterns {', '.join(shown) or 'none'}; {len(new)} patch pairs "
            f"(candidates {counts or 0}); late length {found['length']['late']:.1f}, late gold {report['gold_late']}")

    last = root / f"round-{cfg.rounds}"
    with staging_dir(root / "final") as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(last / "final", tmp)
        write_manifest(tmp, "checkpoint", config=json.loads((last / "final" / "config.json").read_text()),
                       inputs=[last / "final"], stats=summary[-1]["ppo"], stage=PPO_KIND, round=cfg.rounds)
    plot_rounds(root, cfg.rounds, root / "online.png")
    stats = {"rounds": summary, "patch_pairs": len(patches)}
    write_manifest(root, PPO_KIND, config={"online": cfg, "ppo": ppo_cfg}, inputs=[policy, pairs_path, prompts_path],
                   stats=stats, final="final", online=True)
    if json_out:
        print_json({"stage_dir": root, "final": root / "final", **stats})
    return root


def plot_rounds(root: Path, rounds: int, png: Path) -> Optional[Path]:
    """RM reward, gold reward and response length per iteration, one line per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    for n in range(1, rounds + 1):
        path = root / f"round-{n}" / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        its = [r["iteration"] for r in rows]
        for ax, key in zip(axes, ("reward_mean", "gold_mean", "response_len")):
            ax.plot(its, [r.get(key) for r in rows], label=f"round {n}")
    for ax, title in zip(axes, ("RM reward", "gold reward", "response length (tokens)")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
