"""Write the bundled RLHF data: conditional preference pairs and PPO prompts with a gold reward.

    python examples/rlhf/make_data.py            # examples/rlhf/{pairs,prompts}.jsonl (the defaults)
    python examples/rlhf/make_data.py --pairs 3000 --prompts 512 --out DIR

pairs.jsonl (`lm2 rlhf reward`): `lm2cli.synthetic.preference_pairs` over the conditions `brief`
(the bare result beats the result with its working), `detailed` (the opposite) and `default` (a
correct answer beats a wrong one), as `{"condition", "prompt": [user turn], "chosen", "rejected"}`.
The prompt carries no hint: only the condition's system prompt, which the reward model prepends,
tells the two conflicting preferences apart (SPEC §8.1).

prompts.jsonl (`lm2 rlhf ppo`): arithmetic questions under `brief` or `detailed`, whose system turn
(the same text as the condition) tells the actor what is wanted, each with a verifiable gold reward
`{"answer", "style"}` (lm2cli/align/gold.py). The output is a pure function of the arguments.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lm2cli.synthetic import CONDITION_PROMPTS, preference_pairs

HERE = Path(__file__).resolve().parent


def pairs(n: int, seed: int) -> list[dict]:
    out = []
    for p in preference_pairs(random.Random(seed), n, conditions=("brief", "detailed", "default")):
        out.append({"condition": p["condition"], "prompt": [{"role": "user", "content": p["prompt"]}],
                    "chosen": p["chosen"], "rejected": p["rejected"]})
    return out


def prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cond = ("brief", "detailed")[i % 2]
        a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append({"condition": cond,
                    "prompt": [{"role": "system", "content": CONDITION_PROMPTS[cond]},
                               {"role": "user", "content": f"What is {a} {op} {b}?"}],
                    "gold": {"answer": str(val), "style": cond}})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=450)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    write_jsonl(args.out / "pairs.jsonl", pairs(args.pairs, args.seed))
    write_jsonl(args.out / "prompts.jsonl", prompts(args.prompts, args.seed + 1))
    print(f"wrote {args.pairs} pairs and {args.prompts} prompts to {args.out}")


if __name__ == "__main__":
    main()
