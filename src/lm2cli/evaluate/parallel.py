"""Evaluation at scale: batches by length, and the same evaluation sharded over `--nproc` ranks.

Batching. Items (documents' windows, needle prompts) are sorted longest first and cut into batches of
`batch_size`, so a batch pads only to its own longest item; results are keyed by item index, so the
caller sees them in input order.

Sharding. `lm2 eval ppl|needle --nproc N` re-executes the same command as N local ranks through lm2's
launcher (`train.engine.relaunch`, torch.distributed.run; under DeepSpeed's or torchrun's launcher the
ranks are already there and multi-node works the same way). Each rank loads the whole model, takes every
N-th batch of the global batch list (batch b goes to rank b mod N) and scores it; the per-item results
are gathered so that every rank holds all of them, and rank 0 writes the artefact. A batch is scored
by exactly the same call, with the same padding, as in a one-rank run, so the results are identical
to one rank, not merely close.

This is data parallelism: every rank holds a full copy of the weights. A model too large for one
device (a ZeRO-3-sized one) would need its parameters partitioned across the ranks and gathered layer
by layer during the forward (DeepSpeed ZeRO-3 inference, or tensor parallelism), with all ranks of a
group running the same batch in lockstep; the batch list would then be split across groups, not ranks.
lm2 does not do that today: at the recipes' 1.8B and 7B sizes the bf16 weights (3.6 / 15 GB) fit one
80 GB GPU beside the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class World:
    """This process's place among the evaluation ranks (one rank outside a launcher)."""

    rank: int = 0
    size: int = 1
    device: Any = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join(device=None) -> World:
    """The evaluation world: the launcher's ranks when started under one, else a world of one process
    (no process group, no DeepSpeed import)."""
    from ..train.engine import launched

    if not launched():
        from .common import default_device

        return World(0, 1, device or default_device())
    from ..train.engine import init_distributed

    d = init_distributed()
    return World(d.rank, d.world, d.device)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices, longest first (ties in input order), cut into batches of `batch_size`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def my_batches(batches: list[list[int]], world: World) -> list[list[int]]:
    """This rank's share: batch b goes to rank b mod world size (the longest batches spread first)."""
    return batches[world.rank::world.size]


def gather(local: dict[int, T], world: World) -> dict[int, T]:
    """Every rank's {item index: result}, merged, on every rank."""
    if world.size == 1:
        return dict(local)
    import torch.distributed as dist

    parts: list[Any] = [None] * world.size
    dist.all_gather_object(parts, local)
    merged: dict[int, T] = {}
    for part in parts:
        merged.update(part)
    return merged


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def map_batches(items_len: Sequence[int], batch_size: int, world: World,
                score: Callable[[list[int]], dict[int, T]], advance: Callable[[int], None] | None = None) -> list[T]:
    """Score the items batch by batch (this rank's batches only) and return every item's result in
    input order. `score(indices)` returns {index: result} for one batch; `advance(n)` reports progress."""
    results: dict[int, T] = {}
    for batch in my_batches(length_batches(items_len, batch_size), world):
        results.update(score(batch))
        if advance is not None:
            advance(len(batch))
    merged = gather(results, world)
    return [merged[i] for i in range(len(items_len))]


def relaunch_eval(ws, recipe, run: str, nproc: int, command: list[str], name: str) -> None:
    """Re-run `lm2 eval <command>` as `nproc` local ranks with this recipe (written beside the run), so
    every rank sees exactly the settings this process has; raise if a rank fails."""
    from ..config import to_yaml
    from ..console import log
    from ..errors import Lm2Error
    from ..layout import atomic_write_text
    from ..train.engine import relaunch

    recipe_file = ws.run_dir(run) / f".eval-{name}.recipe.yaml"
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(recipe_file, to_yaml(recipe))
    args = ["eval", *command, "--workdir", str(ws.root), "--run", run, "--recipe", str(recipe_file)]
    log(f"eval {command[0]}: starting {nproc} local ranks (torch.distributed.run)")
    rc = relaunch(nproc, args)
    if rc != 0:
        raise Lm2Error(f"eval {command[0]}: the {nproc} ranks exited with status {rc}")


def wants_relaunch(nproc: int) -> bool:
    from ..errors import InputError
    from ..train.engine import launched

    if nproc < 1:
        raise InputError(f"--nproc must be >= 1, got {nproc}")
    return nproc > 1 and not launched()
