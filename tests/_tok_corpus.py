"""A tiny deterministic prepared corpus (zh, en, code, mixed) for the tokenizer and token-shard tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lm2cli.layout import write_manifest

ZH = [
    "书生·浦语是上海人工智能实验室发布的大语言模型。",
    "我们在大量中文和英文语料上进行了预训练。",
    "数据清洗包括去重、过滤低质量文本和安全检查。",
    "模型采用分组查询注意力和旋转位置编码。",
    "长文本能力通过逐步扩展上下文长度来获得。",
    "人类反馈强化学习让模型与人类的偏好对齐。",
    "今天天气很好，我们一起去公园散步吧！",
    "这个问题的答案是四十二，你知道为什么吗？",
    "北京是中国的首都，也是一座历史悠久的城市。",
    "学习编程需要耐心，也需要大量的练习。",
    "他说：“我明天会把报告发给你。”",
    "条件奖励模型可以根据不同的系统提示给出不同的分数。",
    "在线强化学习会不断修补奖励模型的漏洞。",
    "评测覆盖了考试、语言、知识、推理和代码等维度。",
    "中文分词与英文不同，词与词之间没有空格。",
    "训练过程中我们记录损失曲线和学习率的变化。",
]
EN = [
    "The quick brown fox jumps over the lazy dog.",
    "InternLM2 was pretrained on trillions of tokens of text and code.",
    "Deduplication removes near-identical documents with MinHash and LSH.",
    "Rotary position embeddings encode relative positions in attention.",
    "We evaluate the model on reasoning, knowledge and coding benchmarks.",
    "It's 3:45 pm and the meeting has been moved to room 1207.",
    "Don't forget: the reward model reads its score at a special token!",
    "Long-context training extends the window from 4k to 32k tokens.",
]
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
    "import numpy as np\nx = np.arange(12).reshape(3, 4)\nprint(x.sum(axis=0))\n",
    "fn main() {\n    let v: Vec<u32> = (1..=5).collect();\n    println!(\"{:?}\", v);\n}\n",
]
ADVERSARIAL = [
    "",
    " ",
    "\n\n\n",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇨🇳 and more 🤖",
    "combining: e\u0301 a\u0300\u0316 Z\u0351\u0364\u0337 ñ vs n\u0303, Hangul 한국어, Thai ภาษาไทย",
    "control \x00\x01\x02\x07\x1b[31m\x7f\x85 chars \u200b\u200d\ufeff and \u2028 \u2029",
    "specials in text: <|im_start|>user\nhi<|im_end|> <s> </s> <unk> [UNUSED_TOKEN_3] <|endoftext|>",
    "a" * 5000,
    "中" * 3000,
    " " * 4000 + "x",
    "1234567890" * 300,
    "\t\r\n" * 500,
    "🤖" * 1000,
    "mixed 中文English混合123文本，标点。!?",
    "\ufffd replacement and private use \ue000 \U000f0000 and max \U0010ffff",
    "full-width ＡＢＣ１２３ —— …… 「引号」",
]


def _docs(rng: random.Random, pool: list[str], n: int, lo: int, hi: int, sep: str) -> list[str]:
    return [sep.join(rng.choice(pool) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def records(seed: int = 0, n_zh: int = 240, n_en: int = 80, n_code: int = 40, n_mixed: int = 30) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for lang, ctype, texts in (
        ("zh", "web", _docs(rng, ZH, n_zh, 4, 14, "")),
        ("en", "book", _docs(rng, EN, n_en, 3, 10, " ")),
        ("code", "code", _docs(rng, CODE, n_code, 1, 4, "\n")),
        ("mixed", "web", [z + " " + e for z, e in zip(_docs(rng, ZH, n_mixed, 2, 5, ""), _docs(rng, EN, n_mixed, 1, 3, " "))]),
    ):
        out += [{"id": f"{lang}-{i:05d}", "text": t, "source": "test", "content_type": ctype, "lang": lang, "meta": {}}
                for i, t in enumerate(texts)]
    return out


def write_prepared(root: Path, recs: list[dict], shards: int = 2, extra_lines: list[str] = ()) -> Path:
    """`root/kept/part-XXXXX.jsonl` + a `prepared` manifest; `extra_lines` go verbatim into the last shard."""
    kept = Path(root) / "kept"
    kept.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in recs[s::shards]]
        if s == shards - 1:
            lines += [x + "\n" for x in extra_lines]
        (kept / f"part-{s:05d}.jsonl").write_text("".join(lines), encoding="utf-8")
    write_manifest(root, "prepared", stats={"kept": len(recs)})
    return Path(root)
