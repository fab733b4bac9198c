"""Write the bundled SFT data: ChatML conversations with checkable answers (`lm2cli.synthetic.chat_examples`).

    python examples/make_sft_data.py                      # examples/sft/{train,test}.jsonl (the defaults)
    python examples/make_sft_data.py --kinds reverse --train 4000 --test 200 --tools-fraction 0 --out DIR

Each line is `{"messages": [...], "task", "answer"}`: arithmetic, copy, word reversal and key-value
recall, a share of the arithmetic answered through a calculator tool call (`<|action_start|><|plugin|>`
then an `environment` turn). The output is a pure function of the arguments; no test question also
appears in train. `--prompts` also writes `test.prompts.jsonl`: the test conversations without their
last assistant turn, ready for `lm2 generate`, with `answer` kept for scoring.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lm2cli.synthetic import chat_examples

HERE = Path(__file__).resolve().parent


def question(example: dict) -> str:
    return next(m["content"] for m in example["messages"] if m["role"] == "user")


def make(n_train: int, n_test: int, kinds: tuple[str, ...], tools_fraction: float, seed: int) -> tuple[list, list]:
    train = chat_examples(random.Random(seed), n_train, tools_fraction=tools_fraction, kinds=kinds)
    seen = {question(e) for e in train}
    test, rng = [], random.Random(seed + 1)
    while len(test) < n_test:
        for e in chat_examples(rng, n_test, tools_fraction=tools_fraction, kinds=kinds):
            if question(e) not in seen and len(test) < n_test:
                seen.add(question(e))
                test.append(e)
    return train, test


def as_prompt(example: dict) -> dict:
    """Everything before the final assistant turn: what the model must answer."""
    return {"messages": example["messages"][:-1], "task": example["task"], "answer": example["answer"]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "sft")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--kinds", nargs="+", default=["add", "sub", "mul", "copy", "reverse", "kv"])
    ap.add_argument("--tools-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", action="store_true", help="also write test.prompts.jsonl for lm2 generate")
    args = ap.parse_args()
    train, test = make(args.train, args.test, tuple(args.kinds), args.tools_fraction, args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    if args.prompts:
        write_jsonl(args.out / "test.prompts.jsonl", [as_prompt(e) for e in test])
    print(f"wrote {len(train)} train and {len(test)} test conversations to {args.out}")


if __name__ == "__main__":
    main()
