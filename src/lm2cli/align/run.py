"""The `lm2 rlhf reward` and `lm2 rlhf ppo` stages: their inputs, stage folders and manifests.

lm2 rlhf reward
    model   --from (a checkpoint, or a stage folder meaning its final/), else runs/<run>/sft/final;
            a reward folder continues with its head
    data    --data pairs JSONL (records.py), else the bundled examples/rlhf/pairs.jsonl
    writes  runs/<run>/rlhf-reward/: rejected.jsonl, config.yaml, metrics.jsonl, loss.png, checkpoints/,
            final/ (the reward folder: weights, reward_head.safetensors, reward.json, tokenizer),
            eval.json and manifest.json (kind rlhf-reward; stats.eval = held-out accuracy per condition)
    Training is the shared `fit` with the pairwise loss; a batch is n chosen + n rejected sequences,
    each rank training its own batches; every rank then evaluates its share of the held-out pairs.

lm2 rlhf ppo
    policy  --from, else runs/<run>/sft/final (actor and frozen reference)
    reward  --reward, else runs/<run>/rlhf-reward/final (frozen RM; the critic = its backbone + a zero head)
    data    --data prompts JSONL, else examples/rlhf/prompts.jsonl; PTX text per ptx.py
    writes  runs/<run>/rlhf-ppo/: rejected.jsonl, config.yaml, metrics.jsonl (one row per iteration),
            rollouts.jsonl (every response with score, gold, KL), ppo.png, checkpoints/ (actor),
            critic/checkpoints/, final/ (the actor) and manifest.json (kind rlhf-ppo)
    `--resume auto` continues from the newest iteration whose actor and critic checkpoints are both whole.
    Every rank runs the whole loop on its share of each iteration's prompts (ppo.py).

Both take `--nproc N` (re-executed as N local ranks through `relaunch_ranks`) or run under a launcher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

from ..config import Recipe, examples_dir, to_yaml
from ..console import log, print_json, progress, warn
from ..errors import InputError, Lm2Error, WrongArtefact
from ..layout import MANIFEST, Workspace, atomic_write_text, staging_dir, write_manifest
from .records import load_records, parse_pair, parse_prompt
from .reward_model import is_reward_folder

REWARD_KIND, PPO_KIND = "rlhf-reward", "rlhf-ppo"
REJECTED, ROLLOUTS, METRICS = "rejected.jsonl", "rollouts.jsonl", "metrics.jsonl"


# ---------------------------------------------------------------------------------------------------
# Inputs


def _checkpoint(path: Path, what: str) -> Path:
    """A model folder (a stage folder means its final/), refusing anything else by name."""
    from ..stages import model_input

    return model_input(path, what).path


def policy_checkpoint(ws: Workspace, run: str, from_: Optional[Path], allow_reward: bool = False) -> Path:
    if from_ is None:
        final = ws.stage_dir("sft", run) / "final"
        if not (final / MANIFEST).exists():
            raise InputError(f"no SFT model in {ws.stage_dir('sft', run)} (no final/); run `lm2 sft` first, "
                             "or pass --from CHECKPOINT")
        from_ = final
    path = _checkpoint(from_, f"--from {from_}")
    if is_reward_folder(path) and not allow_reward:
        raise WrongArtefact(f"--from {path} is a reward model; the policy starts from an SFT checkpoint")
    return path


def reward_checkpoint(ws: Workspace, run: str, reward: Optional[Path]) -> Path:
    if reward is None:
        final = ws.stage_dir(REWARD_KIND, run) / "final"
        if not (final / MANIFEST).exists():
            raise InputError(f"no reward model in {ws.stage_dir(REWARD_KIND, run)} (no final/); run "
                             "`lm2 rlhf reward` first, or pass --reward CHECKPOINT")
        reward = final
    path = _checkpoint(reward, f"--reward {reward}")
    if not is_reward_folder(path):
        raise WrongArtefact(f"--reward {path} is a plain checkpoint (no reward head); expected the output "
                            "of `lm2 rlhf reward`")
    return path


def bundled(name: str) -> Path:
    return examples_dir() / "rlhf" / name


def data_file(data: Optional[Path], default: str, what: str) -> Path:
    path = Path(data) if data is not None else bundled(default)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist (expected a .jsonl file)")
    return path


def _write_rejected(stage_dir: Path, rejected: list[dict], total: int, what: str) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage_dir / REJECTED, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
    if rejected:
        reasons: dict[str, int] = {}
        for r in rejected:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        warn(f"{what}: {len(rejected)} of {total} records not used "
             f"({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}); see {stage_dir / REJECTED}")


def _merge_stats(stage_dir: Path, extra: dict) -> dict:
    """`fit` wrote the stage manifest; our numbers join its stats (rewritten atomically)."""
    path = stage_dir / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.setdefault("stats", {}).update(extra)
    atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------------
# lm2 rlhf reward


def run_reward(ws: Workspace, recipe: Recipe, run: str = "default", data: Optional[Path] = None,
               from_: Optional[Path] = None, resume: str = "auto", json_out: bool = False,
               stage_dir: Optional[Path] = None, nproc: int = 1) -> Path:
    """Train the conditional reward model into runs/<run>/rlhf-reward/ (or `stage_dir`); returns the folder.

    The shared `fit` on the shared engine: the recipe's `rlhf.reward.train` precision, sharding (ZeRO
    stage), grad_accum; every rank trains its own batches of the pair stream. `nproc` > 1 re-executes as
    that many local ranks; under a launcher (DeepSpeed's, with a hostfile) every rank runs this."""
    from ..train.engine import init_distributed, launched
    from ..stages import input_tokenizer
    from ..train.loop import fit
    from .frozen import barrier, frozen
    from .models import frozen_config, reward_model
    from .reward_model import (PairStream, encode_pairs, evaluate_distributed, make_loss_fn, pair_batches,
                               reward_exporter, split_held_out)

    cfg = recipe.rlhf.reward
    source = policy_checkpoint(ws, run, from_, allow_reward=True)
    data_path = data_file(data, "pairs.jsonl", "preference data")
    stage_dir = Path(stage_dir) if stage_dir else ws.stage_dir(REWARD_KIND, run)
    if nproc > 1 and not launched():
        return relaunch_ranks(ws, recipe, run, nproc, ["rlhf", "reward", "--data", data_path, "--from", source,
                                                       "--resume", resume, "--stage-dir", stage_dir], json_out,
                              "rlhf reward", stage_dir)
    dist = init_distributed()
    tok = input_tokenizer(ws, source)
    conditions = dict(recipe.rlhf.conditions)
    pairs, rejected = load_records(data_path, parse_pair, conditions)
    encoded, too_long = encode_pairs(tok, pairs, conditions, cfg.train.seq_len, cfg.use_conditions)
    rejected += too_long
    if dist.is_main:
        _write_rejected(stage_dir, rejected, len(pairs) + len(rejected) - len(too_long), "rlhf reward")
    if not encoded:
        raise InputError(f"{data_path} has no usable preference pair ({len(rejected)} rejected; see "
                         f"{stage_dir / REJECTED})")
    train_pairs, held = split_held_out(encoded, cfg.held_out_fraction, cfg.train.seed)
    stream = PairStream(train_pairs, cfg.tokens_per_batch, tok.pad_id, cfg.train.seed, dist.rank, dist.world)
    train = reward_train_config(cfg, stream.batches_per_epoch(), dist.world)
    steps = train.max_steps
    by_cond: dict[str, int] = {}
    for p in encoded:
        by_cond[p.condition] = by_cond.get(p.condition, 0) + 1
    data_stats = {"records": len(pairs) + len(rejected) - len(too_long), "pairs": len(encoded),
                  "train_pairs": len(train_pairs), "held_out_pairs": len(held), "rejected": len(rejected),
                  "by_condition": dict(sorted(by_cond.items())), "use_conditions": cfg.use_conditions,
                  "batches_per_epoch": stream.batches_per_epoch(), "rejected_file": REJECTED}
    if dist.is_main:
        log(f"rlhf reward: {len(encoded)} pairs ({', '.join(f'{k} {v}' for k, v in data_stats['by_condition'].items())}"
            f"), {len(held)} held out, {steps} steps of {train.grad_accum} x {dist.world} batches of <= "
            f"{cfg.tokens_per_batch} tokens from {source}"
            + ("" if cfg.use_conditions else "; condition prompts OFF (ablation)"))

    # A reward folder continues with its head; a policy gets a zero head (every score 0 at the start).
    model = reward_model(source, train, dist, train.seq_len, tok, head="trained" if is_reward_folder(source) else "zero")
    info = {"reward_id": tok.reward_id, "conditions": conditions, "use_conditions": cfg.use_conditions,
            "bound": cfg.barrier_bound, "initialised_from": str(source),
            "head_init": "zero" if not is_reward_folder(source) else "continued"}
    held_batches = pair_batches(held, cfg.tokens_per_batch, tok.pad_id)
    result = fit(model, train, stream, stage_dir, kind=REWARD_KIND,
                 loss_fn=make_loss_fn(cfg.gamma, cfg.barrier_lambda, cfg.barrier_bound),
                 eval_data=(lambda: iter(held_batches)) if held_batches else None,  # same count on every rank
                 resume=resume, tokenizer=tok, inputs=[source, data_path], recipe=recipe, dist=dist,
                 export=reward_exporter(info))
    # Every rank scores its share of the pairs with the trained weights (final/), sharded as in training.
    del model
    _, ds = frozen_config(train.precision, dist.world, zero3=train.resolved_zero_stage == 3)
    scorer = frozen(reward_model(result.final, train, dist, train.seq_len, tok, head="trained", ds_config=ds), dist, ds)
    ev = evaluate_distributed(scorer, held_batches, dist) if held_batches else {}
    train_ev = evaluate_distributed(scorer, pair_batches(train_pairs[:1024], cfg.tokens_per_batch, tok.pad_id), dist)
    del scorer
    if dist.is_main:
        report = {"held_out": ev, "train": train_ev}
        atomic_write_text(stage_dir / "eval.json", json.dumps(report, indent=2) + "\n")
        _merge_stats(stage_dir, {"data": data_stats, "eval": ev, "train_accuracy": train_ev.get("accuracy")})
        if ev:
            per = ", ".join(f"{c} {s['accuracy']:.3f}" for c, s in ev["per_condition"].items())
            log(f"rlhf reward: held-out accuracy {ev['accuracy']:.3f} ({per}); scores in "
                f"[{ev['score_min']:.2f}, {ev['score_max']:.2f}]; reward model in {result.final}")
        if json_out:
            print_json({"stage_dir": stage_dir, "final": result.final, "steps": result.steps, "data": data_stats,
                        "eval": ev, "train_accuracy": train_ev.get("accuracy")})
    barrier(dist)
    return stage_dir


def reward_train_config(cfg, batches_per_epoch: int, world: int):
    """`rlhf.reward.train` with its step count: `epochs` of the pair stream, `grad_accum` batches per rank and
    step. A batch is a token budget, not a row count; micro_batch_size only makes the logged tokens/step
    roughly right."""
    train = cfg.train
    steps = max(1, math.ceil(train.epochs * batches_per_epoch / (train.grad_accum * world))) if train.epochs \
        else train.max_steps
    return dataclasses.replace(train, max_steps=steps, micro_batch_size=max(1, cfg.tokens_per_batch // train.seq_len))


def relaunch_ranks(ws: Workspace, recipe: Recipe, run: str, nproc: int, args: list, json_out: bool, what: str,
                   stage_dir: Path) -> Path:
    """`--nproc N` on one machine: the same command as N ranks under torch.distributed.run (train.engine)."""
    from ..train.engine import relaunch
    from ..train.loop import Stopped

    recipe_file = ws.run_dir(run) / f".{what.replace(' ', '-')}.recipe.yaml"
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(recipe_file, to_yaml(recipe))
    argv = [str(a) for a in args] + ["--workdir", str(ws.root), "--run", run, "--recipe", str(recipe_file)]
    argv += ["--json"] if json_out else []
    log(f"{what}: starting {nproc} local ranks (torch.distributed.run)")
    rc = relaunch(nproc, argv)
    if rc == Stopped.exit_code:
        raise Stopped(f"{what} stopped by SIGTERM; rerun the same command to resume")
    if rc != 0:
        raise Lm2Error(f"{what}: the {nproc} ranks exited with status {rc}")
    return stage_dir


# ---------------------------------------------------------------------------------------------------
# lm2 rlhf ppo


def _common_resume(actor_root: Path, critic_root: Path, resume: str, dist) -> Optional[int]:
    """The newest iteration whose actor and critic checkpoints are both whole (auto), or None."""
    from ..train.checkpoint import list_steps, verify
    from .frozen import barrier

    if resume == "never":
        import shutil

        if dist.is_main:
            for root in (actor_root, critic_root):
                shutil.rmtree(root, ignore_errors=True)
        barrier(dist)
        return None
    if resume != "auto":
        name = Path(resume).name
        if not name.startswith("step-") or verify(Path(resume)) or verify(critic_root / name):
            raise InputError(f"--resume {resume}: not a whole PPO checkpoint (actor and critic/ with DONE)")
        return int(name[len("step-"):])
    whole = lambda root: {s for s, p in list_steps(root) if verify(p) is None}  # noqa: E731
    both = whole(actor_root) & whole(critic_root)
    return max(both) if both else None


def _keep_rows(path: Path, iteration: int) -> None:
    if path.exists():
        keep = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["iteration"] <= iteration]
        atomic_write_text(path, "".join(x + "\n" for x in keep))


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def run_ppo(ws: Workspace, recipe: Recipe, run: str = "default", data: Optional[Path] = None,
            from_: Optional[Path] = None, reward: Optional[Path] = None, ptx: Optional[str] = None,
            resume: str = "auto", json_out: bool = False, stage_dir: Optional[Path] = None, nproc: int = 1,
            plan: bool = False) -> Path:
    """PPO into runs/<run>/rlhf-ppo/ (or `stage_dir`); returns the folder. Every rank runs this (`nproc` > 1
    re-executes as that many local ranks); `plan` takes the ZeRO stage and micro-batch sizes from
    `lm2 plan`'s RLHF layout for this cluster."""
    from ..convert import save_model
    from ..tokenizer import Tokenizer
    from ..train.checkpoint import AsyncCheckpointer, restore, step_name
    from ..train.engine import Engine, init_distributed, launched
    from ..stages import input_tokenizer
    from .frozen import barrier, frozen, frozen_hash, whole
    from .models import frozen_config, policy_model, reward_model
    from .ppo import PPOTrainer, encode_prompts, engine_config
    from .ptx import ptx_source
    from .reward_model import INFO_FILE, reward_exporter
    from .rollout import require_backend, rollout_backend

    t_start = time.perf_counter()
    require_backend(recipe.rlhf.ppo)  # before any rank starts or any model loads
    policy = policy_checkpoint(ws, run, from_)
    reward_path = reward_checkpoint(ws, run, reward)
    data_path = data_file(data, "prompts.jsonl", "PPO prompts")
    stage_dir = Path(stage_dir) if stage_dir else ws.stage_dir(PPO_KIND, run)
    if nproc > 1 and not launched():
        args = ["rlhf", "ppo", "--data", data_path, "--from", policy, "--reward", reward_path, "--resume", resume,
                "--stage-dir", stage_dir] + (["--ptx", ptx] if ptx is not None else []) + (["--plan"] if plan else [])
        return relaunch_ranks(ws, recipe, run, nproc, args, json_out, "rlhf ppo", stage_dir)
    dist = init_distributed()
    if plan:
        recipe = planned_ppo(recipe, dist.world)
    cfg = recipe.rlhf.ppo
    tok = input_tokenizer(ws, policy)
    if Tokenizer.load(reward_path).fingerprint != tok.fingerprint:
        raise InputError(f"the reward model {reward_path} uses another tokenizer than the policy {policy}")
    info = json.loads((reward_path / INFO_FILE).read_text()) if (reward_path / INFO_FILE).is_file() else {}
    conditions = info.get("conditions") or dict(recipe.rlhf.conditions)
    prompts, rejected = load_records(data_path, parse_prompt, conditions)
    encoded, too_long = encode_prompts(tok, prompts, conditions, info.get("use_conditions", True), cfg.max_prompt_len)
    if dist.is_main:
        _write_rejected(stage_dir, rejected + too_long, len(prompts) + len(rejected), "rlhf ppo")
    if not encoded:
        raise InputError(f"{data_path} has no usable prompt; see {stage_dir / REJECTED}")

    updates = cfg.ppo_epochs * min(cfg.minibatches, cfg.prompts_per_iteration // dist.world)
    actor_cfg = engine_config(cfg, cfg.actor_lr, (cfg.iterations - cfg.critic_warmup) * updates)
    critic_cfg = engine_config(cfg, cfg.critic_lr, cfg.iterations * updates)
    seq_len = cfg.max_prompt_len + cfg.max_new_tokens
    # Every model streamed from its folder into the layout it runs in (align/models.py).
    actor = policy_model(policy, actor_cfg, dist, seq_len, tok)
    # The critic: the reward model's backbone with a fresh (zero) value head; see ppo.py's docstring.
    critic = reward_model(reward_path, critic_cfg, dist, seq_len, tok, head="zero")
    zero3 = actor_cfg.resolved_zero_stage == 3
    frozen_cfg, frozen_ds = frozen_config(cfg.precision, dist.world, zero3 or cfg.frozen_offload, cfg.frozen_offload)
    ref = frozen(policy_model(policy, frozen_cfg, dist, seq_len, tok, frozen_ds), dist, frozen_ds)
    rm = frozen(reward_model(reward_path, frozen_cfg, dist, seq_len, tok, "trained", frozen_ds), dist, frozen_ds)
    ref_hash = frozen_hash(ref, dist)
    ptx_batches, ptx_desc = ptx_source(ws, cfg, tok, policy, ptx, dist.rank, dist.world)
    actor_engine = Engine(actor, actor_cfg, actor_cfg.max_steps, dist)
    critic_engine = Engine(critic, critic_cfg, critic_cfg.max_steps, dist)
    trainer = PPOTrainer(actor_engine, ref, critic_engine, rm, tok, encoded, cfg, ptx_batches, dist,
                         rollout_backend(cfg, tok))

    config_yaml = to_yaml(recipe)
    inputs = [policy, reward_path, data_path]
    actor_root, critic_root = stage_dir / "checkpoints", stage_dir / "critic" / "checkpoints"
    critic_info = {**info, "critic_of": str(reward_path), "head_init": "zero"}
    savers = [AsyncCheckpointer(actor_root, actor_engine, dist, keep_last=cfg.keep_last, model_config=actor.config,
                                tokenizer=tok, config_yaml=config_yaml, inputs=inputs),
              AsyncCheckpointer(critic_root, critic_engine, dist, keep_last=cfg.keep_last, model_config=critic.config,
                                tokenizer=tok, export=reward_exporter(critic_info), config_yaml=config_yaml,
                                inputs=inputs)]
    start = _common_resume(actor_root, critic_root, resume, dist)
    metrics_path, rollouts_path = stage_dir / METRICS, stage_dir / ROLLOUTS
    if start is not None:
        _, data_state = restore(actor_root / step_name(start), actor_engine, dist)
        restore(critic_root / step_name(start), critic_engine, dist)
        trainer.load_state_dict(data_state)
        if dist.is_main:
            log(f"rlhf ppo: resuming at iteration {start}/{cfg.iterations}")
    elif dist.is_main:
        for p in (metrics_path, rollouts_path):
            p.unlink(missing_ok=True)
    if dist.is_main:
        _keep_rows(metrics_path, trainer.iteration_done)
        _keep_rows(rollouts_path, trainer.iteration_done)
        atomic_write_text(stage_dir / "config.yaml", config_yaml)
        log(f"rlhf ppo: {len(encoded)} prompts, {cfg.iterations} iterations x {cfg.prompts_per_iteration} "
            f"(critic-only for {cfg.critic_warmup}) on {dist.world} rank(s), ZeRO-{actor_engine.zero_stage} "
            f"{cfg.precision}, reference/reward {'ZeRO-3 sharded' if zero3 or cfg.frozen_offload else 'whole'}"
            f"{' in CPU memory' if cfg.frozen_offload else ''}; policy {policy}, reward {reward_path}, PTX {ptx_desc}")

    with (progress("rlhf ppo", total=cfg.iterations) if dist.is_main else contextlib.nullcontext()) as bar:
        if bar is not None:
            bar.advance(trainer.iteration_done)
        while trainer.iteration_done < cfg.iterations:
            row, samples = trainer.iteration()
            it = trainer.iteration_done
            if dist.is_main:
                _append(metrics_path, [row])
                _append(rollouts_path, samples)
                gold = f" gold {row['gold_mean']:.3f}" if row.get("gold_mean") is not None else ""
                bar.advance(1, info=f"reward {row['reward_mean']:.3f}{gold} kl {row['kl']:.2f} "
                                    f"len {row['response_len']:.1f}")
            if it % cfg.save_every == 0 or it == cfg.iterations:
                state = trainer.state_dict()
                for saver in savers:
                    saver.save(it, state, {"step": it, "world": dist.world, "zero_stage": actor_engine.zero_stage})
    for saver in savers:
        saver.wait()

    if frozen_hash(ref, dist) != ref_hash:
        raise Lm2Error("the reference model changed during PPO; this is a bug")
    final = stage_dir / "final"
    stats = None
    if dist.is_main:
        history = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        stats = ppo_stats(history)
        stats.update(prompts=len(encoded), rejected=len(rejected) + len(too_long), ptx=ptx_desc,
                     reference_sha256=ref_hash, train_seconds=round(time.perf_counter() - t_start, 2),
                     world=dist.world, zero_stage=actor_engine.zero_stage, precision=cfg.precision,
                     critic_head_init="zero")
    with whole(actor_engine.ds) as module:  # collective under ZeRO-3
        if dist.is_main:
            with staging_dir(final) as tmp:
                save_model(module, tmp, tokenizer=tok)
                write_manifest(tmp, "checkpoint", config=actor.config, inputs=inputs, stats=stats, stage=PPO_KIND)
    if dist.is_main:
        plot_ppo(history, stage_dir / "ppo.png")
        write_manifest(stage_dir, PPO_KIND, config={"ppo": cfg, "conditions": conditions}, inputs=inputs,
                       stats=stats, final="final")
        log(f"rlhf ppo: reward {stats['reward_first']:.3f} -> {stats['reward_last']:.3f}"
            + (f", gold {stats['gold_first']:.3f} -> {stats['gold_last']:.3f}" if stats.get("gold_last") is not None
               else "") + f", KL {stats['kl_last']:.2f} nats/response; actor in {final}")
        if json_out:
            print_json({"stage_dir": stage_dir, "final": final, **stats})
    barrier(dist)
    return stage_dir


def planned_ppo(recipe: Recipe, world: int) -> Recipe:
    """`--plan`: the recipe with `lm2 plan`'s RLHF layout for this cluster (ZeRO stage, frozen-model
    sharding, micro-batch sizes)."""
    from .. import plan as planner

    choice = planner.best_rlhf_layout(recipe, planner.detect_cluster())
    if choice.layout.dp != world:
        raise InputError(f"the plan is for {choice.layout.dp} ranks but this run has {world}")
    log(f"--plan: {choice.layout.describe()}")
    return planner.apply_rlhf_layout(recipe, choice.layout)


def _window_mean(history: list[dict], key: str, first: bool, n: int = 5) -> Optional[float]:
    rows = [r for r in history if r.get(key) is not None]
    rows = rows[:n] if first else rows[-n:]
    return sum(r[key] for r in rows) / len(rows) if rows else None


def ppo_stats(history: list[dict]) -> dict:
    """First/last means (over 5 iterations) of reward, gold, KL and length, overall and per condition."""
    out = {"iterations": len(history)}
    for key, name in (("reward_mean", "reward"), ("gold_mean", "gold"), ("kl", "kl"), ("response_len", "length")):
        out[f"{name}_first"] = _window_mean(history, key, True)
        out[f"{name}_last"] = _window_mean(history, key, False)
    per = sorted({k.split("/", 1)[1] for r in history for k in r if k.startswith(("reward/", "gold/"))})
    out["per_condition"] = {
        c: {f"{m}_{w}": _window_mean(history, f"{m}/{c}", w == "first") for m in ("reward", "gold")
            for w in ("first", "last")}
        for c in per
    }
    return out


def plot_ppo(history: list[dict], png: Path) -> Optional[Path]:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    axes[0].plot(its, [r["reward_mean"] for r in history], label="RM reward")
    if any(r.get("gold_mean") is not None for r in history):
        axes[0].plot(its, [r.get("gold_mean") for r in history], label="gold reward")
    axes[0].set_title("reward")
    axes[1].plot(its, [r["kl"] for r in history])
    axes[1].set_title("KL to reference (nats/response)")
    axes[2].plot(its, [r["response_len"] for r in history])
    axes[2].set_title("response length (tokens)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
