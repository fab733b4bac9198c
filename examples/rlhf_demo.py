"""Demonstration: COOL RLHF on a tiny InternLM2 — a conditional reward model, PPO, and an online round.

    python examples/rlhf_demo.py                   # 5-7 min on 2 CPU cores; workspace in /tmp/lm2-rlhf-demo
    python examples/rlhf_demo.py --workdir DIR --quick

The task: "What is a + b?" (a, b in 1..9). An answer is either *brief* ("7") or *detailed* ("We compute
3 + 4. 3 + 4 = 7. The answer is 7.", optionally with 1–2 "Check: 7 - 4 = 3." sentences). Every check
is programmatic (lm2cli/align/gold.py), so each number below is verifiable.

Steps, each a plain lm2 command on files this script writes:
  0. a random-init 2-layer d=64 InternLM2 and a 768-token vocabulary (no pretraining: the task is small);
     `lm2 sft --from BASE` on conversations whose answer style is a coin flip, whatever the system
     prompt says: the SFT policy knows both styles but ignores the condition.
  1. COOL reward model: `lm2 rlhf reward` on conflicting pairs — under `brief` the bare result beats
     the working, under `detailed` the opposite; the prompt itself is the same. Held-out accuracy per
     condition, and the same run with `rlhf.reward.use_conditions=false` (the report's ablation).
  2. `lm2 rlhf ppo` with that reward model on prompts whose system turn states the condition; the gold
     reward is "correct answer in the requested style". Gold per condition before/after, KL to the
     reference.
  3. Reward hacking: a reward model trained on pairs with a mild taste for thoroughness (working beats
     a bare answer, one check beats none, and in a fifth of the pairs two checks beat one) scores two
     checks highest; PPO pads the answers with a second check, past the gold reward's 20-word budget
     (one check fits). `lm2 rlhf online --rounds 2`: the fast path turns round 1's early-vs-late length
     (and repetition) blow-up into early-beats-late pairs; round 2's reward model stops paying for
     padding, and its PPO run stays within the budget.
Writes examples/results/rlhf_demo.json (numbers and commands) and rlhf_demo.png.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import yaml
from demo_shell import lm2

from lm2cli.synthetic import CONDITION_PROMPTS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONDS = ("brief", "detailed")


# ---------------------------------------------------------------------------------------------------
# Data


def brief(a: int, b: int) -> str:
    return str(a + b)


def detailed(a: int, b: int, checks: int = 0) -> str:
    v = a + b
    return f"We compute {a} + {b}. {a} + {b} = {v}." + f" Check: {v} - {b} = {a}." * checks + f" The answer is {v}."


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def sft_chats(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        a, b, cond = rng.randint(1, 9), rng.randint(1, 9), rng.choice(CONDS)
        answer = brief(a, b) if rng.random() < 0.5 else detailed(a, b, rng.randint(0, 2))
        out.append({"messages": [{"role": "system", "content": CONDITION_PROMPTS[cond]},
                                 {"role": "user", "content": question(a, b)},
                                 {"role": "assistant", "content": answer}]})
    return out


def cool_pairs(rng: random.Random, n: int) -> list[dict]:
    """The conflicting preference: the condition alone decides which of the two wins."""
    out = []
    for i in range(n):
        a, b, cond = rng.randint(1, 9), rng.randint(1, 9), CONDS[i % 2]
        short, long_ = brief(a, b), detailed(a, b, rng.randint(0, 2))
        chosen, rejected = (short, long_) if cond == "brief" else (long_, short)
        out.append({"condition": cond, "prompt": [{"role": "user", "content": question(a, b)}],
                    "chosen": chosen, "rejected": rejected})
    return out


def hackable_pairs(rng: random.Random, n: int) -> list[dict]:
    """Labels with a mild taste for thoroughness: working beats a bare answer (40%), one check beats none
    (40%) and, in a fifth of the pairs, two checks beat one. Nothing in them is wrong as a comparison, but
    the reward model's best answer is now two checks, which is over the gold reward's word budget."""
    out = []
    for _ in range(n):
        a, b, u = rng.randint(1, 9), rng.randint(1, 9), rng.random()
        if u < 0.4:
            chosen, rejected = detailed(a, b, rng.randint(0, 1)), brief(a, b)
        elif u < 0.8:
            chosen, rejected = detailed(a, b, 1), detailed(a, b, 0)
        else:
            chosen, rejected = detailed(a, b, 2), detailed(a, b, 1)
        out.append({"condition": "detailed", "prompt": [{"role": "user", "content": question(a, b)}],
                    "chosen": chosen, "rejected": rejected})
    return out


def prompts(rng: random.Random, n: int, conds=CONDS, max_words: int | None = None) -> list[dict]:
    out = []
    for i in range(n):
        a, b, cond = rng.randint(1, 9), rng.randint(1, 9), conds[i % len(conds)]
        gold = {"answer": str(a + b), "style": cond}
        if max_words:
            gold["max_words"] = max_words
        out.append({"condition": cond, "prompt": [{"role": "system", "content": CONDITION_PROMPTS[cond]},
                                                  {"role": "user", "content": question(a, b)}], "gold": gold})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------
# The base model and the demo recipe


def make_base(path: Path) -> Path:
    """A random-init 2-layer d=64 InternLM2 with a 768-token vocabulary, as a checkpoint folder."""
    import torch

    from lm2cli.config import ModelConfig, TokenizerConfig
    from lm2cli.layout import write_manifest
    from lm2cli.convert import save_model
    from lm2cli.model import InternLM2
    from lm2cli.tokenizer import build_vocab

    tok, _ = build_vocab(TokenizerConfig(n_en=400, n_zh=0, n_spare=17), Counter())
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = InternLM2(cfg)
    save_model(model, path, tokenizer=tok)
    write_manifest(path, "checkpoint", config=cfg, stage="random-init")
    return path


def demo_recipe(path: Path, quick: bool) -> Path:
    """tiny.yaml with the demo's sizes (a recipe is plain YAML: no inheritance, so it is written out)."""
    recipe = yaml.safe_load((HERE.parent / "recipes" / "tiny.yaml").read_text())
    recipe["name"] = "rlhf-demo"
    recipe["sft"] = {"max_len": 256, "train": {"seq_len": 256, "micro_batch_size": 8, "epochs": 2.0 if quick else 4.0,
                                                "lr": 3.0e-3, "warmup_ratio": 0.05, "min_lr_ratio": 0.1,
                                                "weight_decay": 0.01, "save_every": 1000, "eval_every": 1000}}
    recipe["rlhf"] = {
        "reward": {"tokens_per_batch": 2048, "held_out_fraction": 0.1,
                   "train": {"seq_len": 256, "epochs": 1.0, "lr": 1.0e-3, "min_lr_ratio": 0.5, "warmup_ratio": 0.05,
                             "weight_decay": 0.01, "save_every": 1000, "eval_every": 1000}},
        # 128 prompts per iteration and actor LR 2e-4: with 32 prompts at 5e-4 the (unwhitened) advantages
        # were so noisy that Adam's steps eroded the arithmetic faster than PPO learnt the style (gold fell
        # 0.49 -> 0.37 while the RM score rose). KL 0.02 keeps the policy near the reference meanwhile.
        # max_prompt_len 96: the brief condition's system turn + question is 66 tokens in the current
        # 768-token vocabulary (64 rejected every brief prompt).
        "ppo": {"iterations": 15 if quick else 30, "prompts_per_iteration": 128, "max_prompt_len": 96,
                "max_new_tokens": 64, "critic_warmup": 5, "actor_lr": 2.0e-4, "critic_lr": 5.0e-4, "minibatches": 4,
                "kl_coef": 0.02, "ptx_coef": 0.5, "ptx_batch_size": 4, "ptx_seq_len": 128, "save_every": 1000},
        "online": {"rounds": 2, "patch_pairs_min": 20, "patch_pairs_max": 100},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------
# Running and reading


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]


def window(rows: list[dict], key: str, first: bool, n: int = 5) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    vals = vals[:n] if first else vals[-n:]
    return round(sum(vals) / len(vals), 4) if vals else None


def gold_by_check(stage: Path, prompts_path: Path, n: int = 5) -> tuple[dict, dict[int, float]]:
    """From a PPO stage's rollouts, re-checked with the gold checker: the share of responses passing each
    gold check per condition over the first and last `n` iterations, and the share over the word budget
    (the hack) per iteration."""
    from lm2cli.align.gold import gold_checks

    golds = {i: json.loads(x).get("gold") for i, x in enumerate(prompts_path.read_text().splitlines(), 1) if x.strip()}
    rows = [json.loads(x) for x in (stage / "rollouts.jsonl").read_text().splitlines() if x.strip()]
    last = max(r["iteration"] for r in rows)
    windows = {"first5": range(1, n + 1), "last5": range(last - n + 1, last + 1)}
    counts: dict = {}
    over: dict[int, list[bool]] = {}
    for r in rows:
        checks = gold_checks(golds[r["line"]] or {}, r["response"])
        if "max_words" in checks:
            over.setdefault(r["iteration"], []).append(not checks["max_words"])
        for w, its in windows.items():
            if r["iteration"] in its:
                for name, ok in checks.items():
                    c = counts.setdefault(r["condition"], {}).setdefault(name, {}).setdefault(w, [0, 0])
                    c[0], c[1] = c[0] + ok, c[1] + 1
    shares = {cond: {name: {w: round(k / m, 3) for w, (k, m) in ws.items()} for name, ws in checks.items()}
              for cond, checks in sorted(counts.items())}
    return shares, {it: sum(v) / len(v) for it, v in sorted(over.items())}


def ppo_summary(rows: list[dict]) -> dict:
    out = {}
    for key in ["reward_mean", "gold_mean", "kl", "response_len"] + [f"gold/{c}" for c in CONDS]:
        out[key] = {"first5": window(rows, key, True), "last5": window(rows, key, False)}
    out["kl_max"] = round(max(r["kl"] for r in rows), 3)
    return out


def plot(res: dict, ppo_rows: list[dict], online_rows: dict, online_over: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=110)
    ax = axes[0]
    x = range(len(CONDS) + 1)
    acc = {k: [res["reward"][k]["per_condition"][c]["accuracy"] for c in CONDS] + [res["reward"][k]["accuracy"]]
           for k in ("conditional", "no_condition")}
    ax.bar([i - 0.2 for i in x], acc["conditional"], 0.4, label="with condition prompt")
    ax.bar([i + 0.2 for i in x], acc["no_condition"], 0.4, label="without (ablation)")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x), [*CONDS, "all"])
    ax.set_ylim(0, 1.05)
    ax.set_title("reward model: held-out accuracy")
    ax.legend(loc="lower right", fontsize=8)

    ax = axes[1]
    its = [r["iteration"] for r in ppo_rows]
    for c in CONDS:
        ax.plot(its, [r.get(f"gold/{c}") for r in ppo_rows], label=f"gold, {c}")
    ax2 = ax.twinx()
    ax2.plot(its, [r["kl"] for r in ppo_rows], color="grey", lw=0.8, label="KL (nats/response)")
    ax2.set_ylabel("KL to reference")
    ax.set_title("PPO with the conditional RM")
    ax.set_xlabel("iteration")
    ax.set_ylim(0, 1.05)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower right", fontsize=8)

    ax = axes[2]
    for (n, rows), color in zip(online_rows.items(), ("tab:red", "tab:green")):
        over = online_over[n]
        ax.plot(list(over), list(over.values()), color=color, label=f"round {n}: share over the word budget")
        ax.plot([r["iteration"] for r in rows], [r["gold_mean"] for r in rows], color=color, ls=":",
                label=f"round {n}: gold")
    ax.set_ylim(0, 1.05)
    ax.set_title("hackable RM: online round 1 vs 2 (fast-path patch)")
    ax.set_xlabel("iteration")
    ax.legend(loc="center right", fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lm2-rlhf-demo"))
    ap.add_argument("--quick", action="store_true", help="fewer SFT epochs and PPO iterations (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t_start = time.perf_counter()
    ws = args.workdir.resolve()
    shutil.rmtree(ws, ignore_errors=True)
    data = ws / "data"
    rng = random.Random(0)
    write_jsonl(data / "sft.jsonl", sft_chats(rng, 2500))
    write_jsonl(data / "cool_pairs.jsonl", cool_pairs(rng, 800))
    write_jsonl(data / "prompts.jsonl", prompts(rng, 256))
    write_jsonl(data / "hack_pairs.jsonl", hackable_pairs(rng, 400))
    write_jsonl(data / "hack_prompts.jsonl", prompts(rng, 256, conds=("detailed",), max_words=20))
    base = make_base(ws / "base")
    recipe = demo_recipe(ws / "rlhf_demo.yaml", args.quick)
    common = ["--workdir", ws, "--recipe", recipe]
    log: list[str] = []

    lm2("sft", "--from", base, "--data", data / "sft.jsonl", "--eval-data", "none", *common, log=log)
    lm2("rlhf", "reward", "--data", data / "cool_pairs.jsonl", *common, log=log)
    lm2("rlhf", "reward", "--data", data / "cool_pairs.jsonl", "--run", "no-condition",
        "--from", ws / "runs" / "default" / "sft", "--set", "rlhf.reward.use_conditions=false", *common, log=log)
    lm2("rlhf", "ppo", "--data", data / "prompts.jsonl", "--ptx", data / "sft.jsonl", *common, log=log)
    lm2("rlhf", "online", "--rounds", 2, "--run", "hack", "--from", ws / "runs" / "default" / "sft",
        "--data", data / "hack_pairs.jsonl", "--prompts", data / "hack_prompts.jsonl", "--ptx", data / "sft.jsonl",
        *common, log=log)

    runs = ws / "runs"
    ppo_rows = metrics(runs / "default" / "rlhf-ppo")
    ppo_checks, _ = gold_by_check(runs / "default" / "rlhf-ppo", data / "prompts.jsonl")
    online = manifest(runs / "hack" / "rlhf-ppo")["stats"]["rounds"]
    rounds = {r["round"]: runs / "hack" / "rlhf-ppo" / f"round-{r['round']}" for r in online}
    online_rows = {n: metrics(d) for n, d in rounds.items()}
    online_checks = {n: gold_by_check(d, data / "hack_prompts.jsonl") for n, d in rounds.items()}
    online_over = {n: c[1] for n, c in online_checks.items()}
    res = {
        "reward": {"conditional": manifest(runs / "default" / "rlhf-reward")["stats"]["eval"],
                   "no_condition": manifest(runs / "no-condition" / "rlhf-reward")["stats"]["eval"]},
        "ppo": {**ppo_summary(ppo_rows), "gold_checks": ppo_checks},
        "online": [{"round": r["round"], "reward_accuracy": r["reward_accuracy"], "patterns": r["patterns"],
                    "candidates": r["candidates"], "pairs_added": r["pairs_added"],
                    # the hack: the share of responses longer than the gold reward's word budget
                    "over_budget": {w: round(1 - ok, 3) for w, ok in
                                    online_checks[r["round"]][0]["detailed"]["max_words"].items()},
                    "gold_checks": online_checks[r["round"]][0]["detailed"],
                    **{k: v for k, v in ppo_summary(online_rows[r["round"]]).items()
                       if k in ("gold_mean", "response_len", "reward_mean", "kl")}} for r in online],
        "commands": log,
        "seconds": round(time.perf_counter() - t_start, 1),
        "setup": "random-init 2-layer d=64 InternLM2, 768-token vocabulary, SFT on 2500 coin-flip-style chats "
                 "(no pretraining); see the module docstring",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rlhf_demo.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, ppo_rows, online_rows, online_over, args.out / "rlhf_demo.png")
    print(json.dumps({k: res[k] for k in ("reward", "ppo", "online", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
