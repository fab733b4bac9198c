"""Shared fixtures for the RLHF tests: a small built tokenizer and a tiny "SFT" checkpoint in a workspace."""

import functools
import random
from collections import Counter
from pathlib import Path

import torch

from lm2cli.config import ModelConfig, TokenizerConfig
from lm2cli.layout import Workspace, write_manifest
from lm2cli.convert import save_model
from lm2cli.model import InternLM2


@functools.lru_cache(maxsize=1)
def tokenizer():
    from lm2cli.tokenizer import build_vocab

    return build_vocab(TokenizerConfig(n_en=300, n_zh=0, n_spare=17), Counter())[0]


def tiny_config(tok, layers=2, hidden=64) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id)


def tiny_model(tok, seed=0) -> InternLM2:
    torch.manual_seed(seed)
    return InternLM2(tiny_config(tok))


def sft_workspace(root: Path, seed=0) -> Workspace:
    """A workspace whose runs/default/sft/final holds a random tiny model (stands in for an SFT output)."""
    ws = Workspace(Path(root))
    tok = tokenizer()
    stage = ws.stage_dir("sft")
    final = stage / "final"
    model = tiny_model(tok, seed)
    save_model(model, final, tokenizer=tok)
    write_manifest(final, "checkpoint", config=model.config, stage="sft")
    write_manifest(stage, "sft", final="final")
    return ws


def arithmetic_pairs(n, seed=0):
    """Conditional pairs whose preference flips with the condition (brief vs detailed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        short, long_ = str(a + b), f"We compute {a} + {b}. {a} + {b} = {a + b}. The answer is {a + b}."
        cond = ("brief", "detailed")[i % 2]
        chosen, rejected = (short, long_) if cond == "brief" else (long_, short)
        out.append({"condition": cond, "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                    "chosen": chosen, "rejected": rejected})
    return out
