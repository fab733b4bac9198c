"""PPO's pretraining (PTX) text: where it comes from and the batches it becomes (SPEC §8.3).

InternLM2 adds the pre-training cross-entropy (× 0.5) to the actor loss, with pre-training data about
half of PPO's data. `rlhf.ppo.ptx_data` (or `--ptx`) chooses the source:

    ""       the workspace's `data/tokens` train split (packed like pretraining), if it exists;
             else the SFT conversations recorded in the policy's SFT manifest; else none (a warning)
    PATH     a JSONL file: chat records (`messages`, assistant-only loss) or `{"text": ...}` records
             (every token trained)
    "none"   no PTX term

Every source is a resumable iterator of packed `{"input_ids", "labels", "position_ids"}` batches
(`train.data.PackedStream` or `train.finetune.RowBatches`), so PPO's checkpoint records its position.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..chat import Example, build_examples, pack
from ..console import warn
from ..errors import InputError
from ..layout import MANIFEST, Workspace


def _text_examples(tok, lines, max_len: int) -> list[Example]:
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            text = json.loads(line).get("text")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(text, str) and text.strip():
            ids = ([tok.bos_id] + tok.encode(text) + [tok.eos_id])[:max_len]
            out.append(Example(ids, [0] + [1] * (len(ids) - 1)))
    return out


def jsonl_batches(tok, path: Path, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """Packed batches (this rank's) from a chat or text JSONL file; None when it holds nothing usable."""
    from ..train.finetune import RowBatches

    path = Path(path)
    if not path.is_file():
        raise InputError(f"PTX data {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    first = next((json.loads(x) for x in lines if x.strip()), {})
    if isinstance(first, dict) and "messages" in first:
        examples, _, _ = build_examples(tok, lines, seq_len)
    else:
        examples = _text_examples(tok, lines, seq_len)
    if not examples:
        return None
    return RowBatches(pack(examples, seq_len, tok.pad_id, seed), batch_size, rank, world, seed=seed)


def token_batches(ws: Workspace, tok, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    from ..tokens import TokenStore
    from ..train.data import PackedStream

    store = TokenStore(ws.tokens)
    store.require_tokenizer(tok)
    splits = store.splits("train")
    if not splits:
        return None
    return PackedStream(splits, seq_len, batch_size, seed=seed, rank=rank, world=world)


def sft_data_of(policy: Path) -> Optional[Path]:
    """The SFT training file named in the policy checkpoint's manifest inputs, if it still exists."""
    try:
        manifest = json.loads((Path(policy) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for entry in manifest.get("inputs", []):
        p = Path(entry.get("path", ""))
        if p.suffix == ".jsonl" and p.is_file():
            return p
    return None


def ptx_source(ws: Workspace, cfg, tok, policy: Path, override: Optional[str] = None, rank: int = 0, world: int = 1):
    """(this rank's batches or None, a description for logs and the manifest)."""
    choice = override if override is not None else cfg.ptx_data
    if cfg.ptx_coef <= 0 or choice == "none":
        return None, "off"
    if choice:
        return jsonl_batches(tok, Path(choice), cfg.ptx_seq_len, cfg.ptx_batch_size, cfg.seed, rank, world), str(choice)
    if (ws.tokens / MANIFEST).exists():
        batches = token_batches(ws, tok, cfg.ptx_seq_len, cfg.ptx_batch_size, cfg.seed, rank, world)
        if batches is not None:
            return batches, str(ws.tokens)
    sft_file = sft_data_of(policy)
    if sft_file is not None:
        batches = jsonl_batches(tok, sft_file, cfg.ptx_seq_len, cfg.ptx_batch_size, cfg.seed, rank, world)
        if batches is not None:
            return batches, str(sft_file)
    warn("rlhf ppo: no PTX text (no data/tokens, no SFT data recorded, no rlhf.ppo.ptx_data); "
         "training without the PTX term")
    return None, "none found"
