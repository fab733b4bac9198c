"""`lm2 quickstart`: every landed stage, in order, on the bundled examples, into a fresh workspace.

Each step calls the same library function as its command, so the quickstart is the pipeline a user
would type, not a separate code path.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .config import load_recipe
from .console import log, print_json
from .errors import InputError
from .layout import Workspace, read_manifest


def _build_vocab(ws: Workspace, recipe) -> Path:
    from .tokenizer import run_build_vocab

    return run_build_vocab(ws, recipe)


def _tokenize(ws: Workspace, recipe) -> Path:
    from .tokens import run_tokenize

    return run_tokenize(ws, recipe)


def _pretrain(stage: int):
    def step(ws: Workspace, recipe) -> Path:
        from .pretrain import run_pretrain

        return run_pretrain(ws, recipe, stage)

    return step


def _sft(ws: Workspace, recipe) -> Path:
    """Fine-tune the latest pretrained model on the bundled chat data (examples/sft/)."""
    from .sft import run_sft

    return run_sft(ws, recipe)


def _rlhf_reward(ws: Workspace, recipe) -> Path:
    """The conditional reward model from the SFT model, on the bundled pairs (examples/rlhf/pairs.jsonl)."""
    from .align.run import run_reward

    return run_reward(ws, recipe)


def _rlhf_ppo(ws: Workspace, recipe) -> Path:
    """PPO of the SFT model against that reward model, on the bundled prompts (examples/rlhf/prompts.jsonl)."""
    from .align.run import run_ppo

    return run_ppo(ws, recipe)


def _eval(ws: Workspace, recipe) -> Path:
    """The default eval suite on the run's latest model: ppl, the example OpenCompass tasks, a small needle grid."""
    from .evaluate.suite import run_suite

    return run_suite(ws, recipe)


def _prepare(ws, recipe):
    """Train the bundled ad/fluency/toxic classifiers, then run `lm2 prepare` on the examples corpus."""
    from .config import examples_dir
    from .data.pipeline import run_prepare
    from .data.quality import train_classifier

    for name in ("ad", "fluency", "toxic"):
        train_classifier(examples_dir() / "labels" / f"{name}.jsonl", name, ws.root / "data" / "classifiers" / f"{name}.npz")
    run_prepare(None, ws, recipe.prepare, recipe_name=recipe.name)
    return ws.prepared


def _steps():
    """(name, function(ws, recipe) -> artefact path) for each landed stage, in pipeline order."""
    steps = [("prepare", _prepare)]
    steps += [("build-vocab", _build_vocab), ("tokenize", _tokenize)]
    steps += [(f"pretrain-stage{n}", _pretrain(n)) for n in (1, 2, 3)]
    steps += [("sft", _sft)]
    steps += [("rlhf-reward", _rlhf_reward), ("rlhf-ppo", _rlhf_ppo)]
    steps += [("eval", _eval)]  # last: it evaluates whatever the run trained
    return steps


# Summary figure -> (start, end) keys of a stage manifest's stats; reward and kl are PPO's first/last-5 means.
_HEADLINES = {"eval_loss": ("first_eval_loss", "eval_loss"), "loss": ("first_loss", "final_loss"),
              "reward": ("reward_first", "reward_last"), "kl": ("kl_first", "kl_last")}


def _losses(artefact: Path) -> dict:
    """A training stage's loss at its start and end (eval on fixed held-out batches, and train), or PPO's
    reward and KL, so the summary shows each stage learning; empty for artefacts that train nothing."""
    try:
        stats = read_manifest(artefact).get("stats", {})
    except InputError:  # not an artefact folder
        return {}
    return {name: [stats[a], stats[b]] for name, (a, b) in _HEADLINES.items()
            if isinstance(stats.get(a), (int, float)) and isinstance(stats.get(b), (int, float))}


def run_quickstart(workdir, recipe_name: str, overrides: list[str], fresh: bool = True, json_out: bool = False) -> dict:
    ws = Workspace.at(workdir)
    recipe = load_recipe(recipe_name, overrides)
    if fresh and ws.root.exists():
        shutil.rmtree(ws.root)
    ws.root.mkdir(parents=True, exist_ok=True)
    summary = {"workdir": str(ws.root), "recipe": recipe.name, "stages": []}
    t_all = time.perf_counter()
    for name, step in _steps():
        t0 = time.perf_counter()
        log(f"== quickstart: {name}")
        path = step(ws, recipe)
        summary["stages"].append({"stage": name, "artefact": str(Path(path)), "seconds": round(time.perf_counter() - t0, 1),
                                  **_losses(path)})
        log(f"== {name} -> {path} ({time.perf_counter() - t0:.1f}s)")
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    if json_out:
        print_json(summary)
    else:
        for s in summary["stages"]:
            losses = "".join(f"  {k} {s[k][0]:.3f} -> {s[k][1]:.3f}" for k in _HEADLINES if k in s)
            log(f"{s['stage']:<18} {s['artefact']}  ({s['seconds']:.0f}s){losses}")
        log(f"quickstart finished in {summary['seconds']}s; see `lm2 status --workdir {ws.root}`")
    return summary
