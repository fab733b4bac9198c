"""Models that score but never train (PPO's reference and reward model, the reward model's evaluation),
and how the ranks of an RLHF run share work.

`frozen(model, dist, ds_config)` puts a model (built by `models.py` for `models.frozen_config`) in the
run's precision and either keeps a whole copy per rank (ZeRO 0–2 runs: the forward is local) or hands
it to DeepSpeed's ZeRO-3 inference engine (no optimizer: parameters stay partitioned over the ranks and
each layer is gathered for its forward, optionally from CPU memory with `offload_param`). A ZeRO-3 frozen model is called *collectively*:
every rank must run the same number of forwards, which is why work is split into equal shares.

    share(n, dist)              this rank's contiguous slice of n items (n must divide evenly)
    padded_share(items, dist)   this rank's items of a list, padded (by repeating) to an equal count
    gather_objects(x, dist)     every rank's x, in rank order, on every rank
    frozen_hash(model, dist)    sha256 of a frozen model's weights as it computes (one tensor gathered at a time)

`frozen` is `train.engine.frozen_model`, which `Engine(..., trainable=False)` also uses: below ZeRO-3 a
frozen model stays a plain module (no DeepSpeed wrapper, no ZeRO-1/2 optimizer it would never use).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from ..errors import InputError
from ..train.engine import frozen_model


# The one implementation lives with the engine; RLHF calls it by its own name.
frozen = frozen_model


def module_of(model) -> torch.nn.Module:
    """The plain module behind a frozen model or a DeepSpeed engine."""
    return getattr(model, "module", model)


def is_sharded(model) -> bool:
    return any(hasattr(p, "ds_id") for p in module_of(model).parameters())


@contextlib.contextmanager
def whole(model) -> Iterator[torch.nn.Module]:
    """The module with every parameter gathered for the block (collective under ZeRO-3)."""
    module = module_of(model)
    if is_sharded(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module
    else:
        yield module


def frozen_hash(model, dist) -> str:
    """sha256 over the weights (names and bytes, in name order, as `ppo.state_hash`) as the model computes
    with them; under ZeRO-3 each tensor is gathered alone, so no rank holds the whole model. Collective;
    the digest is rank 0's (other ranks return "")."""
    import hashlib

    module = module_of(model)
    tensors = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    h = hashlib.sha256()
    for name in sorted(module.state_dict().keys()):
        t = tensors[name]
        with whole_tensor(t):
            if dist.is_main:
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest() if dist.is_main else ""


@contextlib.contextmanager
def whole_tensor(t: torch.Tensor) -> Iterator[None]:
    if hasattr(t, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------------
# Splitting work across ranks


def share(n: int, dist, what: str = "items") -> slice:
    """This rank's contiguous share of n items; n must be a multiple of the world size."""
    if n % dist.world:
        raise InputError(f"{n} {what} do not split evenly over {dist.world} ranks; use a multiple of {dist.world}")
    k = n // dist.world
    return slice(dist.rank * k, (dist.rank + 1) * k)


def padded_share(items: list, dist) -> tuple[list, int]:
    """(this rank's items, how many of them are real): item i goes to rank i mod world; shorter shares
    repeat their last item (or the list's first) so every rank runs the same number of forwards."""
    mine = items[dist.rank::dist.world]
    count = -(-len(items) // dist.world) if items else 0
    real = len(mine)
    filler = (mine or items)[-1:] if items else []
    return mine + filler * (count - real), real


def gather_objects(obj: Any, dist) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if dist.world == 1:
        return [obj]
    out: list[Optional[Any]] = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out


def all_sum(values: list[float], dist) -> list[float]:
    """Element-wise sum over ranks."""
    if dist.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def barrier(dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()
