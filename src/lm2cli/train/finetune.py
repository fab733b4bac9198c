"""What the stages that fine-tune a checkpoint share (SFT, the reward model, PPO): the model they start
from at their context length and micro-batches of packed rows (the input's tokenizer: `stages.input_tokenizer`).

    build_model(source, max_len, tok, train, dist)
                                        the source weights, context >= max_len, special ids from `tok`,
                                        streamed into the run's layout (`engine.build_model`)
    RowBatches(rows, micro, rank, world, seed)
                                        a seeded order of packed rows, reshuffled each epoch; rank r of W
                                        takes its own rows of every global micro-batch; position = 1 integer
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from ..console import warn
from ..errors import InputError


class RowBatches:
    """Micro-batches of packed rows: rank r of W takes rows [k + r·B, k + (r+1)·B) of the global order,
    where k counts rows consumed by all ranks; each epoch is a fresh seeded permutation."""

    def __init__(self, rows: Mapping[str, list], micro_batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        import torch

        self.data = {k: torch.tensor(v, dtype=torch.long) for k, v in rows.items()}
        self.n = len(rows["input_ids"])
        if self.n == 0:
            raise InputError("no packed rows to train on")
        self.batch, self.rank, self.world, self.seed = micro_batch_size, rank, world, seed
        self.consumed = 0
        self._epoch, self._order = -1, None

    def _row(self, j: int) -> int:
        import torch

        epoch, i = divmod(j, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=g)
        return int(self._order[i])

    def __iter__(self) -> "RowBatches":
        return self

    def __next__(self) -> dict:
        first = self.consumed + self.rank * self.batch
        idx = [self._row(j) for j in range(first, first + self.batch)]
        self.consumed += self.batch * self.world
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"rows_consumed": self.consumed, "rows": self.n, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("rows") != self.n or state.get("seed") != self.seed:
            raise InputError(f"the checkpoint was trained on {state.get('rows')} packed rows (seed {state.get('seed')}), "
                             f"this data packs into {self.n} (seed {self.seed}); resume with the same data and "
                             "recipe, or pass --resume never")
        self.consumed = int(state["rows_consumed"])


def fitted_config(source: Path, max_len: int, tok):
    """The checkpoint's `ModelConfig` with a context of at least `max_len` (RoPE settings unchanged) and
    `tok`'s special ids; refuses a tokenizer larger than the model's vocabulary."""
    from ..stages import read_model_config

    src = read_model_config(Path(source))
    if tok.vocab_size > src.vocab_size:
        raise InputError(f"{source}: the tokenizer has {tok.vocab_size} ids, the model only {src.vocab_size}")
    return dataclasses.replace(src, max_position_embeddings=max(max_len, src.max_position_embeddings),
                               bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def build_model(source: Path, max_len: int, tok, train, dist):
    """The source weights in `fitted_config`, built for the run's `TrainConfig` by
    `train.engine.build_model`: partitioned at construction under ZeRO-3, in the run's dtype, the
    weights streamed in tensor by tensor (no rank holds a second copy)."""
    from .engine import build_model as build

    cfg = fitted_config(source, max_len, tok)
    if dist.is_main and _zero_embedding_row(Path(source), tok.eos_id):
        # SPEC P1: an HF-initialised `padding_idx = eos` leaves the EOS embedding at zero, and SFT must teach it.
        warn(f"{source}: the </s> embedding row is all zeros (padding_idx = eos at init?); it trains from zero")
    return build(cfg, train, dist, init_from=Path(source))


def _zero_embedding_row(source: Path, row: int) -> bool:
    """Whether row `row` of the checkpoint's token embeddings is all zeros (only that row is read)."""
    from .engine import WeightFiles

    files = WeightFiles(source)
    try:
        name = "model.tok_embeddings.weight"
        return name in files.owner and not bool(files.owner[name].get_slice(name)[row:row + 1].any())
    finally:
        files.close()

