"""A workspace in which every stage of a full-scale recipe could start, built in seconds.

CI has no corpus and no 7B weights, so a dry run of `internlm2-7b` would only report its inputs missing.
This builds real stand-ins that a real run would also accept:

- token shards tokenized by a real tokenizer whose vocabulary is the recipe's (cl100k's top ranks,
  closed under merges, plus lm2's specials and spares: 92,544 ids), with short documents and
  long ones (over 4,096 tokens) so stage 2's long/short mix has both;
- each stage's `final/` as an lm2 checkpoint at the recipe's full shape: config.json, the tokenizer and a
  `model.safetensors` whose header declares every tensor at its shape and dtype and whose data is a
  sparse file of zeros (no disk blocks written, so a 20B checkpoint costs nothing);
- the reward model's head and reward.json beside its backbone.

The dry runs read headers and configs only, which is why zero weights suffice; training on them would
start (and learn from zeros).
"""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from pathlib import Path

from lm2cli import synthetic as S
from lm2cli.config import Recipe, TokenizeConfig, TokenizerConfig
from lm2cli.layout import Workspace, write_manifest

N_SPARE = 147


def tokenizer_with_vocab(vocab_size: int):
    """cl100k's best-ranked tokens and the recipes' spare block, no Chinese BPE (that needs a corpus):
    3 + n_en + 0 + 147 ids, exactly `vocab_size` (tokenizer/vocab.py's arithmetic)."""
    from lm2cli.tokenizer import build_vocab

    cfg = TokenizerConfig(n_en=vocab_size - 3 - N_SPARE, n_zh=0, n_spare=N_SPARE, pad_multiple=128)
    tok, _ = build_vocab(cfg, Counter())
    assert tok.vocab_size == vocab_size, tok.vocab_size
    return tok


def build_tokens(root: Path, tok) -> Path:
    """`root/data/tokens`: 200 short English paragraphs, 40 Chinese ones and 8 documents of > 4,096 tokens."""
    from lm2cli.tokens import tokenize_dir

    rng = random.Random(0)
    ws = Workspace(Path(root))
    recs = [("en", "web", S.en_paragraph(rng, sentences=(2, 5))) for _ in range(200)]
    recs += [("zh", "web", S.zh_paragraph(rng, sentences=(2, 4))) for _ in range(40)]
    recs += [("en", "book", "\n\n".join(S.en_document(rng, paragraphs=(6, 8)) for _ in range(12))) for _ in range(8)]
    kept = ws.prepared / "kept"
    kept.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"doc-{i:05d}", "text": text, "source": "test", "content_type": ctype, "lang": lang,
                         "meta": {}}, ensure_ascii=False) + "\n" for i, (lang, ctype, text) in enumerate(recs)]
    (kept / "part-00000.jsonl").write_text("".join(lines))
    write_manifest(ws.prepared, "prepared", stats={"kept": len(recs)})
    tokenize_dir(ws.prepared, ws.tokens, tok, TokenizeConfig(val_fraction=0.05), workers=1)
    return ws.tokens


def sparse_safetensors(path: Path, shapes: dict[str, tuple], dtype: str = "BF16") -> None:
    """A valid safetensors file of zeros whose data region is a hole: header written, data never."""
    size = {"BF16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = size
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


def placeholder_checkpoint(stage_dir: Path, cfg, tok, reward: bool = False) -> Path:
    """`stage_dir/final/` as a finished stage would leave it, at the config's full shape."""
    import torch

    from lm2cli.model import InternLM2

    final = stage_dir / "final"
    final.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in InternLM2(cfg).state_dict().items()}
    sparse_safetensors(final / "model.safetensors", shapes)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "bfloat16"
    (final / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tok.save(final)
    if reward:
        sparse_safetensors(final / "reward_head.safetensors", {"weight": (1, cfg.hidden_size)}, "F32")
        (final / "reward.json").write_text(json.dumps({"reward_id": tok.reward_id}) + "\n")
    write_manifest(final, "checkpoint", config=hf, stats={"placeholder": "zero weights (sparse file)"})
    write_manifest(stage_dir, stage_dir.name, stats={"placeholder": True})
    return final


def full_scale_workspace(root: Path, recipe: Recipe, tokens: Path, tok) -> Workspace:
    """Token shards plus every stage's final/ for `recipe`, shaped as the real pipeline would shape them."""
    import dataclasses
    import shutil

    from lm2cli.pretrain import model_config, stage_config

    ws = Workspace(Path(root))
    shutil.copytree(tokens, ws.tokens)
    cfg = None
    for stage in (1, 2, 3):
        cfg = model_config(recipe, stage_config(recipe, stage), tok, cfg)
        placeholder_checkpoint(ws.stage_dir(f"pretrain-stage{stage}"), cfg, tok)
    sft = dataclasses.replace(cfg, max_position_embeddings=max(recipe.sft.max_len, cfg.max_position_embeddings))
    placeholder_checkpoint(ws.stage_dir("sft"), sft, tok)
    placeholder_checkpoint(ws.stage_dir("rlhf-reward"), sft, tok, reward=True)
    return ws
