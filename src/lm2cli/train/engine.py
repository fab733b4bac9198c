"""DeepSpeed for every run: the process group, the ds_config a `TrainConfig` implies, and the engine.

One training path for one process or many (SPEC §10): a lone `lm2 pretrain` is rank 0 of a world of 1
with its own rendezvous; `--nproc N` re-executes through `torch.distributed.run`; multi-node runs start
under DeepSpeed's launcher (`deepspeed --hostfile ... --no_local_rank --module lm2cli.cli ...`), which
sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for us.

InternEvo's sharding modes map onto ZeRO (SPEC §6.2): full-replica → stage 0 (plain data parallel),
partial → stage 2 (or 1 via `zero_stage`), and with `hpz_partition_size` > 1 ZeRO-3 with a ZeRO++ hpZ
secondary parameter shard inside each group of that many ranks; full → stage 3. MiCS would be the exact
match for partial sharding but deepspeed 0.19.8 rejects it (SPEC P16).

The optimizer is torch's AdamW handed to `deepspeed.initialize`, so no DeepSpeed op is JIT-compiled;
on CPU the shared-memory allreduce kernel (also JIT) is skipped and gloo carries the collectives.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..errors import InputError
from .schedule import lr_scheduler, schedule

# DeepSpeed's ZeRO calls the older collective names; torch 2.13 warns on every call.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Set when lm2 made a lone process its own world of 1, so that child processes (which inherit the
# environment) do not mistake those variables for a launcher's.
SOLO = "LM2_SOLO_RANK"
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", SOLO)


def launched() -> bool:
    """True under torch.distributed.run or DeepSpeed's launcher (they set WORLD_SIZE for every rank)."""
    return "WORLD_SIZE" in os.environ and SOLO not in os.environ


def clean_env() -> dict:
    """This process's environment without a lone rank's rendezvous variables, for child processes."""
    env = dict(os.environ)
    if SOLO in env:
        for k in RENDEZVOUS_VARS:
            env.pop(k, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def init_distributed() -> Dist:
    """Join (or, alone, create) the process group; idempotent. The device and backend follow
    DeepSpeed's accelerator: gloo on CPU, the accelerator's own (nccl on CUDA) otherwise."""
    if not launched() and not torch.distributed.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()), **{SOLO: "1"})
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    acc = _accelerator()
    on_cpu = acc.device_name() == "cpu"
    device = torch.device("cpu") if on_cpu else torch.device(acc.device_name(local_rank))
    if not on_cpu:
        acc.set_device(local_rank)
    if not torch.distributed.is_initialized():
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if on_cpu:
            # The shm allreduce op is JIT-compiled (a minute or more) on first use; gloo needs no build.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else acc.communication_backend_name(),
                                   verbose=False)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def relaunch(nproc: int, cli_args: list[str]) -> int:
    """Run `lm2 <cli_args>` as `nproc` local ranks through torch.distributed.run; returns its exit code.
    SIGTERM/SIGINT are passed on, so the ranks save a checkpoint and stop cleanly; after a SIGTERM a
    failed exit reads 143 (torch.distributed.run itself reports any failed rank as 1)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "lm2cli.train.rank"]
    proc = subprocess.Popen(cmd, env={**clean_env(), "LM2_RANK_ARGV": json.dumps(cli_args)})
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
        return 128 + signal.SIGTERM if rc != 0 and signal.SIGTERM in received else rc
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------
# The DeepSpeed config


def zero_section(cfg) -> dict:
    """`zero_optimization` for the run's sharding mode (SPEC §6.2)."""
    stage = cfg.resolved_zero_stage
    if cfg.hpz_partition_size > 1:
        if cfg.sharding == "full-replica" or cfg.zero_stage not in (None, 3):
            raise InputError("hpz_partition_size > 1 is ZeRO++ hpZ, a ZeRO-3 feature: use sharding partial or full "
                             "without a zero_stage other than 3")
        return {"stage": 3, "zero_hpz_partition_size": cfg.hpz_partition_size}
    return {"stage": stage}


def clips_in_deepspeed(cfg) -> bool:
    """DeepSpeed clips (and reports the norm) inside its ZeRO and bf16 optimizers; for plain fp32 data
    parallel it clips but drops the norm, so there lm2 clips itself and logs the norm it gets."""
    return cfg.precision == "bf16" or zero_section(cfg)["stage"] > 0


def deepspeed_config(cfg, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world,
        "gradient_clipping": cfg.grad_clip if clips_in_deepspeed(cfg) else 0.0,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": zero_section(cfg),
        "zero_allow_untested_optimizer": True,  # torch AdamW: nothing to JIT-compile
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only, never on norms or biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------------------------------------
# The engine


class Engine:
    """A DeepSpeed engine plus what the loop needs: the step with its grad norm, the LR, full weights."""

    def __init__(self, model: torch.nn.Module, cfg, total_steps: int, dist: Dist, ds_config: Optional[dict] = None):
        import deepspeed

        self.cfg, self.dist, self.total_steps = cfg, dist, total_steps
        self.config = dict(ds_config) if ds_config else deepspeed_config(cfg, dist.world)
        expected = (cfg.micro_batch_size, cfg.grad_accum)
        got = (self.config.get("train_micro_batch_size_per_gpu"), self.config.get("gradient_accumulation_steps"))
        if got != expected:
            raise InputError(f"DeepSpeed config batch (micro {got[0]}, accum {got[1]}) differs from the recipe's "
                             f"(micro {expected[0]}, accum {expected[1]})")
        self.zero_stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        self.clip_here = not (self.zero_stage > 0 or self.config.get("bf16", {}).get("enabled"))
        if self.clip_here:  # see clips_in_deepspeed: DeepSpeed must not clip a second time
            self.config["gradient_clipping"] = 0.0
        if cfg.activation_checkpointing and hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = True
        model.to(dist.device)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        self.schedule = schedule(total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=lr_scheduler(optimizer, self.schedule),
            config=self.config, dist_init_required=False)
        if dist.world == 1 and self.zero_stage == 0:
            # Alone, DeepSpeed would still flatten every gradient and all-reduce it over a world of one.
            self.ds.enable_backward_allreduce = False

    def follow_config_schedule(self) -> None:
        """After a resume: the LR schedule is this run's (a resumed run may set a new max_steps or lr);
        with the config unchanged every LR is the one the saved scheduler would have given."""
        sched = self.scheduler
        # Loading the saved state rewrote the fields of the schedule object in place: build it anew.
        self.schedule = schedule(self.total_steps, self.cfg.warmup_ratio, self.cfg.min_lr_ratio)
        sched.base_lrs = [self.cfg.lr] * len(sched.base_lrs)
        sched.lr_lambdas = [self.schedule] * len(sched.lr_lambdas)
        lrs = [base * self.schedule(sched.last_epoch) for base in sched.base_lrs]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs

    @property
    def model(self):
        """The callable a loss function runs (DeepSpeed's wrapper: ZeRO-3 gathers weights around it)."""
        return self.ds

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def lr(self) -> float:
        """The LR the next optimizer step applies."""
        return float(self.ds.get_lr()[0])

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # scales by 1/grad_accum

    def step(self) -> Optional[float]:
        """Call after every micro-batch's backward; on the last one of a step the update happens and the
        (pre-clip) global grad norm is returned, otherwise None."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        norm = None
        if boundary and self.clip_here and self.cfg.grad_clip > 0:
            # DeepSpeed has all-reduced the gradients in this micro-batch's backward.
            norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip))
        self.ds.step()
        if boundary and norm is None:
            got = self.ds.get_global_grad_norm()
            norm = float(got) if got is not None else float("nan")
        return norm if boundary else None

    def full_state_dict(self) -> Optional[dict]:
        """CPU copies of the whole model's weights on rank 0 (None elsewhere); collective under ZeRO-3."""
        if self.zero_stage == 3:
            sd = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.module.state_dict() if self.dist.is_main else None
        if sd is None:
            return None
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[torch.nn.Module]:
        """The module with every parameter whole (gathered under ZeRO-3) for the duration of the block."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module
        else:
            yield self.module


# ---------------------------------------------------------------------------------------------------
# Peak FLOP/s for MFU


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Best dense matmul FLOP/s of this device in the run's precision, measured once at start."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)  # constant: no RNG draw, no denormals
    b = torch.full((n, n), 0.25, device=device, dtype=dtype)
    sync = _accelerator().synchronize if device.type != "cpu" else (lambda: None)
    best = float("inf")
    for i in range(repeats + 2):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        if i >= 2:  # the first calls pay for thread pools and kernel selection
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best
