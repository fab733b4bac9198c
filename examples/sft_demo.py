"""Demonstration: `lm2 sft` teaches a tiny pretrained InternLM2 a task it cannot do, measured through `lm2 generate`.

    python examples/sft_demo.py                    # in ./lm2-work (or $LM2_WORKDIR)
    python examples/sft_demo.py --base PATH        # fine-tune any checkpoint folder instead
    python examples/sft_demo.py --task copy        # another synthetic task: copy, reverse, kv, add, ...

The default task is word reversal ("Reverse the order of these words: maple salt orbit" → "orbit salt
maple"), from `lm2cli.synthetic.chat_examples(kinds=("reverse",))`, asked as a one-turn chat. Held-out prompts
never appear in the training data. Exact match = the completion, stripped, equals the answer.

The base model is the workspace's pretrain-stage1 final/ (what `lm2 quickstart` trains); without one,
step 0 builds it in the workspace exactly as the quickstart would. Steps, each a plain lm2 command:
  0. (only without a base model) lm2 prepare → tokenize build-vocab → tokenize → pretrain --stage 1
  1. lm2 generate BASE        on the held-out prompts       → exact match before
  2. lm2 sft --from BASE      on the training conversations   → runs/sft-demo/sft/
  3. lm2 generate SFT-FINAL   on the same prompts            → exact match after
Writes examples/results/sft_demo.json (numbers and commands) and sft_demo.png (the figure).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from demo_shell import lm2

from lm2cli.synthetic import chat_examples

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def task_data(task: str, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """One-turn chats of one task (no system prompt: shorter rows, the same template); disjoint splits."""
    def chats(rng, n):
        out = []
        for e in chat_examples(rng, n, tools_fraction=0.0, kinds=(task,)):
            msgs = [m for m in e["messages"] if m["role"] != "system"]
            out.append({"messages": msgs, "answer": e["answer"]})
        return out

    train = chats(random.Random(seed), n_train)
    seen = {c["messages"][0]["content"] for c in train}
    test, rng = [], random.Random(seed + 1)
    while len(test) < n_test:
        for c in chats(rng, n_test):
            if c["messages"][0]["content"] not in seen and len(test) < n_test:
                seen.add(c["messages"][0]["content"])
                test.append(c)
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def exact_match(path: Path) -> tuple[float, list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    hits = [r.get("completion", "").strip() == r["answer"] for r in rows]
    return sum(hits) / len(rows), rows


def base_model(args, log: list) -> Path:
    if args.base:
        return Path(args.base)
    final = args.workdir / "runs" / "default" / "pretrain-stage1" / "final"
    if not (final / "manifest.json").exists():
        print(f"no pretrained tiny model in {args.workdir}; building one as the quickstart does", flush=True)
        w = ["--workdir", args.workdir]
        lm2("prepare", *w, log=log)
        lm2("tokenize", "build-vocab", *w, log=log)
        lm2("tokenize", *w, log=log)
        lm2("pretrain", "--stage", "1", *w, log=log)
    return final


def plot(task: str, before: float, after: float, metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "eval_loss" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    a.bar(["pretrained", "after lm2 sft"], [100 * before, 100 * after], color=["#999999", "#2a7ab9"])
    for x, v in enumerate([before, after]):
        a.text(x, 100 * v + 2, f"{100 * v:.1f}%", ha="center")
    a.set_ylim(0, 110)
    a.set_ylabel("exact match on held-out prompts (%)")
    a.set_title(f"task '{task}', via lm2 generate (greedy)")
    b.plot([r["step"] for r in hist], [r["loss"] for r in hist], lw=1, label="train loss (assistant tokens)")
    ev = [(r["step"], r["eval_loss"]) for r in evals]
    if ev:
        b.plot(*zip(*ev), "o-", ms=3, label="held-out loss")
    b.set_xlabel("SFT step")
    b.set_yscale("log")
    b.legend()
    b.set_title("lm2 sft")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="checkpoint to fine-tune (default: lm2-work's pretrain-stage1, else built)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("LM2_WORKDIR", "lm2-work")))
    ap.add_argument("--task", default="reverse", help="a lm2cli.synthetic chat task: reverse, copy, kv, add, ...")
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--test", type=int, default=200)
    # A nano model forms the attention circuit that copies from the prompt after ~100-150 steps of this
    # data; 4 epochs at 2e-3 leave room to learn the reversal on top (SPEC §10 allows a higher LR). At 2.5
    # epochs it reached 88.5 %, its misses all in 5-word reversals (one word swapped or repeated).
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    log: list[str] = []
    base = base_model(args, log)
    data = args.workdir / "demo" / "sft"
    train, test = task_data(args.task, args.train, args.test, args.seed)
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "test.jsonl", test)
    prompts = write_jsonl(data / "prompts.jsonl", [{"messages": c["messages"][:-1], "answer": c["answer"]} for c in test])
    gen = ["--max-new-tokens", "24", "--batch-size", "32", "--temperature", "0"]
    lm2("generate", base, "-i", prompts, "-o", data / "before.jsonl", *gen, log=log)
    before, _ = exact_match(data / "before.jsonl")
    lm2("sft", "--from", base, "--data", data / "train.jsonl", "--eval-data", data / "test.jsonl",
        "--workdir", args.workdir, "--run", "sft-demo", "--max-len", args.max_len, "--resume", "never",
        "--set", f"sft.train.epochs={args.epochs}", "--set", f"sft.train.lr={args.lr}",
        "--set", "sft.train.micro_batch_size=8", "--set", "sft.train.eval_every=25", log=log)
    final = args.workdir / "runs" / "sft-demo" / "sft" / "final"
    lm2("generate", final, "-i", prompts, "-o", data / "after.jsonl", *gen, log=log)
    after, rows = exact_match(data / "after.jsonl")
    stage = final.parent
    manifest = json.loads((stage / "manifest.json").read_text())
    RESULTS.mkdir(exist_ok=True)
    plot(args.task, before, after, stage / "metrics.jsonl", RESULTS / "sft_demo.png")
    summary = {
        "task": f"{args.task} (lm2cli.synthetic chat_examples kinds=({args.task!r},)), one-turn chat",
        "base": str(base), "train_conversations": len(train), "held_out_prompts": len(test),
        "exact_match_before": round(before, 4), "exact_match_after": round(after, 4),
        "sft_steps": manifest["stats"]["steps"], "sft_train_seconds": manifest["stats"]["train_seconds"],
        "sft_first_loss": manifest["stats"]["first_loss"], "sft_final_loss": manifest["stats"]["final_loss"],
        "sft_eval_loss": manifest["stats"]["eval_loss"], "wall_seconds": round(time.perf_counter() - t0, 1),
        "examples": [{k: r[k] for k in ("messages", "answer", "completion")} for r in rows[:3]],
        "commands": log,
    }
    (RESULTS / "sft_demo.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"exact match on {len(test)} held-out prompts: {before:.1%} before -> {after:.1%} after lm2 sft "
          f"({summary['wall_seconds']:.0f}s); figure: {RESULTS / 'sft_demo.png'}")
    if after < 0.9:
        sys.exit(f"below the 90% target ({after:.1%})")


if __name__ == "__main__":
    main()
