"""A tiny workspace for the training tests: synthetic prepared text, a 640-id tokenizer, token shards.

Splits: en.web (short paragraphs), en.book (long documents), zh.web, code.code. Built once per test
session (`tiny_tokens`) and copied into each test's workspace.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

from lm2cli import synthetic as S
from lm2cli.config import TokenizeConfig, TokenizerConfig
from lm2cli.layout import Workspace, write_manifest

CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
]

# A model small enough that a step takes milliseconds, with the InternLM2 structure (GQA 4q/2kv).
TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
              "model.num_attention_heads=4", "model.num_key_value_heads=2"]


def records(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []

    def add(lang, ctype, text):
        out.append({"id": f"{lang}-{ctype}-{len(out):05d}", "text": text, "source": "test", "content_type": ctype,
                    "lang": lang, "meta": {}})

    for _ in range(160):
        add("en", "web", S.en_paragraph(rng, sentences=(1, 3)))
    for _ in range(24):
        add("en", "book", S.en_document(rng, paragraphs=(2, 3)))
    for _ in range(60):
        add("zh", "web", S.zh_paragraph(rng, sentences=(1, 2)))
    for _ in range(40):
        add("code", "code", "\n".join(rng.choice(CODE) for _ in range(rng.randint(1, 3))))
    return out


def build_tokens(root: Path) -> Path:
    """`root/data/tokens` from synthetic prepared records, through lm2's own tokenizer and writer."""
    from lm2cli.tokenizer import build_vocab
    from lm2cli.tokens import tokenize_dir

    ws = Workspace(Path(root))
    kept = ws.prepared / "kept"
    kept.mkdir(parents=True, exist_ok=True)
    recs = records()
    (kept / "part-00000.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    write_manifest(ws.prepared, "prepared", stats={"kept": len(recs)})
    tok, _ = build_vocab(TokenizerConfig(n_en=256, n_zh=0, n_spare=16, pad_multiple=128), Counter())
    tokenize_dir(ws.prepared, ws.tokens, tok, TokenizeConfig(val_fraction=0.1), workers=1)
    return ws.tokens


def workspace_with_tokens(tokens: Path, root: Path) -> Workspace:
    ws = Workspace(Path(root))
    shutil.copytree(tokens, ws.tokens)
    return ws
