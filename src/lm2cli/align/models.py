"""The RLHF models, built for the DeepSpeed config they will run under, from their checkpoint folders.

Through `train.engine.build_model`: under ZeRO-3 every parameter is partitioned as it is created and
the weights are streamed in one tensor at a time (rank 0 reads, the others receive their slices), so
no rank ever holds a whole 7B model in host or device memory; below ZeRO-3 the model is materialised
on the device in the run's dtype and filled in place. This is what lets PPO start four models of the
policy's size on each rank.

    policy_model(path, cfg, dist, seq_len, tok)            the actor, or the reference (frozen config)
    reward_model(path, cfg, dist, seq_len, tok, head)      backbone + scalar head: the trained RM's head
                                                           (`head="trained"`) or a zero one (the critic's
                                                           value head, a fresh reward model's head)
    frozen_config(precision, world, zero3, offload)        the TrainConfig / DeepSpeed config of a frozen model
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from ..config import TrainConfig
from ..train.finetune import fitted_config


def frozen_config(precision: str, world: int, zero3: bool, offload: bool = False) -> tuple[TrainConfig, dict]:
    """A frozen model's settings: ZeRO-3 inference (optionally with its parameters in CPU memory) or
    a whole copy per rank, in `precision`."""
    from ..train.engine import deepspeed_config

    cfg = TrainConfig(micro_batch_size=1, grad_accum=1, max_steps=1, precision=precision,
                      sharding="full" if zero3 else "full-replica")
    ds = deepspeed_config(cfg, world)
    if zero3 and offload:
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return cfg, ds


def policy_model(path: Path, cfg: TrainConfig, dist, seq_len: int, tok, ds_config: Optional[dict] = None):
    from ..train.engine import build_model

    return build_model(fitted_config(Path(path), seq_len, tok), cfg, dist, init_from=Path(path), ds_config=ds_config)


def reward_model(path: Path, cfg: TrainConfig, dist, seq_len: int, tok, head: str = "zero",
                 ds_config: Optional[dict] = None):
    """A `RewardModel` on the backbone in `path`; `head`: "trained" reads `reward_head.safetensors`,
    "zero" starts the head at zero (every score / value 0)."""
    import deepspeed

    from ..train.engine import build_model, config_zero_stage, deepspeed_config, run_dtype
    from .reward_model import HEAD_FILE, RewardModel

    ds_config = ds_config or deepspeed_config(cfg, dist.world)
    backbone = build_model(fitted_config(Path(path), seq_len, tok), cfg, dist, init_from=Path(path), ds_config=ds_config)
    sharded = config_zero_stage(ds_config) == 3
    # Under ZeRO-3 the head is partitioned as it is made (the backbone's parameters already are).
    with (deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False) if sharded
          else contextlib.nullcontext()):
        model = RewardModel(backbone)
    if not sharded:
        model.head.to(device=dist.device, dtype=run_dtype(ds_config))
    weight = torch.zeros(1, backbone.config.hidden_size)
    if head == "trained":
        from safetensors.torch import load_file

        weight = load_file(str(Path(path) / HEAD_FILE))["weight"]
    _write(model.head.weight, weight, dist)
    return model


@torch.no_grad()
def _write(p: torch.nn.Parameter, value: torch.Tensor, dist) -> None:
    """Set a (possibly ZeRO-3-partitioned) parameter to `value` on every rank."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if dist.is_main:
                p.data.copy_(value)
    else:
        p.data.copy_(value)
