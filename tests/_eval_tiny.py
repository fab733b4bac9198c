"""Tiny tokenizer and models for the eval tests: a ~1.4k-id vocabulary built by `build_vocab` (the full
cl100k head would dominate a model this small) and 2-layer models, random or trained to memorise texts."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from lm2cli.config import ModelConfig, TokenizerConfig
from lm2cli.layout import write_manifest
from lm2cli.convert import save_model
from lm2cli.model import InternLM2

ZH_TEXT = ("今天天气很好，我们去公园散步。北京是中国的首都，上海是一座大城市。一加一等于二，二加三等于五。"
           "问题：请重复这个词。答案：苹果、河流、蜡烛、橙子、窗户、花园。日本的首都是东京。草是绿色的。") * 3


@functools.lru_cache(maxsize=1)
def tokenizer():
    from lm2cli.tokenizer import build_vocab, count_pretokens, pretokenizer_pattern

    cfg = TokenizerConfig(n_en=1000, n_zh=80, n_spare=17)
    tok, _ = build_vocab(cfg, count_pretokens([ZH_TEXT], pretokenizer_pattern(cfg)))
    return tok


def model(seed: int = 0, max_len: int = 256) -> InternLM2:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tokenizer().vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len)
    return InternLM2(cfg).eval()


def plain_tokenizer():
    """The 1.2k-id English-only vocabulary of the needle tests (no Chinese merges)."""
    from collections import Counter

    from lm2cli.tokenizer import build_vocab

    return build_vocab(TokenizerConfig(n_en=1000, n_zh=0, n_spare=17, pad_multiple=128), Counter())[0]


def spread_model(vocab_size: int, max_len: int) -> InternLM2:
    """A random 2-layer model with its matrices scaled ×5: spread logits put greedy answers and forced
    choices far from ties, so batched and unbatched paths must agree exactly."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len)
    m = InternLM2(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    return m


def memorise(m: InternLM2, seqs: list[list[int]], steps: int = 150, lr: float = 3e-3, seed: int = 0) -> InternLM2:
    """Full-batch next-token training on `seqs` (every token is a target), enough to recite them."""
    torch.manual_seed(seed)
    width = max(map(len, seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        labels[r, :len(s)] = torch.tensor(s)
    mask = (labels != -100).long()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    m.train()
    for _ in range(steps):
        logits = m(ids, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def save_checkpoint(m: InternLM2, path: Path) -> Path:
    save_model(m, path, tokenizer())
    write_manifest(path, "checkpoint", stats={"params": m.num_params()})
    return path
