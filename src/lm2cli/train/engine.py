"""DeepSpeed for every run: the process group, the ds_config a `TrainConfig` implies, and the engine.

One training path for one process or many (SPEC §10): a lone `lm2 pretrain` is rank 0 of a world of 1
with its own rendezvous; `--nproc N` re-executes through `torch.distributed.run`; multi-node runs start
under DeepSpeed's launcher (`deepspeed --hostfile ... --no_local_rank --module lm2cli.cli ...`), which
sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for us.

InternEvo's sharding modes map onto ZeRO (SPEC §6.2): full-replica → stage 0 (plain data parallel; 1 in bf16),
partial → stage 2 (or 1 via `zero_stage`), and with `hpz_partition_size` > 1 ZeRO-3 with a ZeRO++ hpZ
secondary parameter shard inside each group of that many ranks; full → stage 3. MiCS would be the exact
match for partial sharding but deepspeed 0.19.8 rejects it (SPEC P16).

The optimizer is torch's AdamW handed to `deepspeed.initialize`, so no DeepSpeed op is JIT-compiled;
on CPU the shared-memory allreduce kernel (also JIT) is skipped and gloo carries the collectives.

What a command does with it, in order (pretrain, sft, extend-context, rlhf alike):

    dist = init_distributed()
    model = build_model(model_config, train_cfg, dist, init_from=None | checkpoint folder)
    engine = Engine(model, train_cfg, total_steps, dist)         # trainable: AdamW, LR schedule, ZeRO
    frozen = Engine(model, train_cfg, 0, dist, trainable=False)  # reference / reward model: no optimizer

`build_model` never holds the whole model on one rank under ZeRO-3: parameters are partitioned as
they are created (`deepspeed.zero.Init`), initialised or loaded one tensor at a time (each whole
tensor exists only while it is written), and kept in the run's dtype (a bf16 run holds no fp32 copy
of the model; DeepSpeed keeps the fp32 master partitions). Below ZeRO-3 every rank needs the whole
model anyway: it is built on the meta device and materialised straight on the accelerator in the
run's dtype, then filled the same way. Either way the fresh init is drawn on the host from one seeded
generator in parameter order, so a model starts from the same weights on any number of ranks at any
ZeRO stage.
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
from pathlib import Path
from typing import Callable, Iterator, Optional

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
    """bf16 runs keep fp32 master weights (every ZeRO stage's optimizer and BF16_Optimizer hold them) and
    accumulate gradients in fp32 (`data_types.grad_accum_dtype`). deepspeed 0.19.8 does the latter for bf16
    weights only under ZeRO (without it the mix raises NotImplementedError), so a bf16 full-replica run is
    ZeRO-1 — BF16_Optimizer: the same data-parallel update, with optimizer states sharded over the ranks."""
    bf16 = cfg.precision == "bf16"
    zero = zero_section(cfg)
    if bf16 and zero["stage"] == 0:
        zero = {**zero, "stage": 1}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world,
        "gradient_clipping": cfg.grad_clip if clips_in_deepspeed(cfg) else 0.0,
        "bf16": {"enabled": bf16},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: nothing to JIT-compile
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def run_dtype(ds_config: dict) -> torch.dtype:
    """The dtype the model's parameters live in on the accelerator (fp32 master weights are DeepSpeed's)."""
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32


def config_zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only, never on norms or biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------------------------------------
# Building the model: partitioned at construction, filled one tensor at a time


def build_model(model_config, cfg, dist: Dist, init_from: Optional[Path] = None, *, ds_config: Optional[dict] = None,
                factory: Optional[Callable] = None, strict: bool = True) -> torch.nn.Module:
    """The model a run trains (or, for `Engine(..., trainable=False)`, serves), built for its DeepSpeed
    config: under ZeRO-3 partitioned as it is created, otherwise materialised on `dist.device`; in the
    run's dtype (bf16 or fp32); then filled with a fresh init (`init_from` None: `init_weights` with
    `cfg.seed`) or with the weights of the checkpoint folder `init_from` (`load_weights`, streamed).

    `model_config` is the final `ModelConfig` (the caller applies a stage's RoPE base and context
    length first). `cfg` is the run's `TrainConfig`; `ds_config` the DeepSpeed config the `Engine` will
    get (default `deepspeed_config(cfg, dist.world)`; `--plan` passes its own). `factory(model_config)`
    builds the module (default `InternLM2`); it must be cheap to call on the meta device. `strict`:
    every parameter must be in `init_from` (False keeps the fresh init of the missing ones, e.g. a new
    head). Every rank must call this together under ZeRO-3 (it gathers each parameter once).
    """
    import deepspeed

    from ..model import InternLM2

    factory = factory or InternLM2
    ds_config = ds_config or deepspeed_config(cfg, dist.world)
    dtype = run_dtype(ds_config)
    if config_zero_stage(ds_config) == 3:
        # Each submodule's parameters are partitioned as soon as it is built; the init they get inside
        # zero.Init (torch's defaults) is thrown away below. The dtype comes from the config's bf16
        # flag (deepspeed 0.19.8 ignores an explicit dtype on accelerators without fp16, CPU included);
        # F.linear is left alone (mem_efficient_linear would replace it process-wide).
        with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False,
                                 zero_param_parallel_group=_hpz_group()):
            model = factory(model_config)
    else:
        with torch.device("meta"):
            model = factory(model_config)
        model = model.to(dtype).to_empty(device=dist.device)
    if init_from is None or not strict:
        init_weights(model, cfg.seed, dist)
    if init_from is not None:
        load_weights(model, init_from, dist, strict=strict)
    return model


def _hpz_group():
    """The hpZ group of an earlier ZeRO-3 model in this process (RLHF builds four): zero.Init creates it
    only once per process and asserts if asked again; None lets the first one create it."""
    from deepspeed.utils import groups

    return groups._ZERO_PARAM_INTRA_PARALLEL_GROUP


def is_partitioned(model: torch.nn.Module) -> bool:
    """True if the parameters are ZeRO-3 partitions (made under `zero.Init` or by a ZeRO-3 engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def _whole(p: torch.nn.Parameter, dist: Dist) -> Iterator[bool]:
    """The parameter whole for the block; yields whether this rank writes it. ZeRO-3: gathered, rank 0's
    writes are scattered back as everyone's partition on exit; otherwise the local tensor, written here."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            yield dist.is_main
    else:
        yield True


def _shape(p: torch.nn.Parameter) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, dist: Dist) -> None:
    """A fresh init independent of the world size, ZeRO stage and device: each parameter drawn whole on
    the host in fp32, in `named_parameters` order, from one generator seeded with `seed`, then cast into
    the parameter. The rule for a parameter is `init_weight(name, tensor, generator)` of the deepest
    module above it that has one (InternLM2's; a wrapper such as a reward model adds its own for its
    head), with `name` relative to that module. Under ZeRO-3 only rank 0 draws (the others receive their
    partitions), so only one tensor at a time is ever whole.

    Inits written in a module's `__init__` after its children exist (e.g. `nn.init.zeros_(self.head
    .weight)`) never reach a partitioned parameter: put them in `init_weight`."""
    generator = torch.Generator().manual_seed(int(seed))
    rules = _init_rules(model)
    missing = [name for name, _ in model.named_parameters() if name not in rules]
    if missing:
        raise InputError(f"{type(model).__name__} has no init rule (an init_weight method above them) for "
                         f"{', '.join(missing[:3])}")
    for name, p in model.named_parameters():
        with _whole(p, dist) as writer:
            if writer:
                init, local = rules[name]
                if p.device.type == "cpu" and p.dtype == torch.float32:
                    init(local, p.data, generator)  # already the host fp32 tensor: draw in place
                else:
                    host = torch.empty(_shape(p), dtype=torch.float32)
                    init(local, host, generator)
                    p.data.copy_(host)


def _init_rules(model: torch.nn.Module) -> dict:
    """Parameter name -> (the deepest `init_weight` above it, its name relative to that module)."""
    rules = {}
    for prefix, module in model.named_modules():  # parents first: a deeper rule overwrites
        init = getattr(module, "init_weight", None)
        if callable(init):
            for local, _ in module.named_parameters():
                rules[f"{prefix}.{local}" if prefix else local] = (init, local)
    return rules


class WeightFiles:
    """Tensors by name from a model folder's safetensors, read one at a time (`model.safetensors`, or
    the shards an HF `model.safetensors.index.json` names); only headers are read up front."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        folder = Path(folder)
        from ..convert import weight_files  # index order; refuses pickles by name

        self._stack = contextlib.ExitStack()
        self.owner: dict[str, object] = {}
        try:
            for file in weight_files(folder):
                handle = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                for key in handle.keys():
                    self.owner.setdefault(key, handle)
        except InputError:
            self._stack.close()
            raise
        except Exception as e:  # safetensors raises its own types for a truncated or foreign file
            self._stack.close()
            raise InputError(f"{folder}: unreadable weights ({e}); the checkpoint is corrupt or partial") from None

    def shape(self, name: str) -> tuple:
        return tuple(self.owner[name].get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self.owner[name].get_tensor(name)

    def close(self) -> None:
        self._stack.close()


@torch.no_grad()
def load_weights(model: torch.nn.Module, folder: Path, dist: Dist, strict: bool = True) -> None:
    """Fill `model` from the checkpoint folder's safetensors, one tensor at a time: no rank ever holds
    a second copy of the model, and a bf16 file goes into bf16 parameters without an fp32 step. Under
    ZeRO-3 rank 0 reads each tensor and the others receive their partitions. Names and shapes are
    checked (from the headers) on every rank before anything is read, so a mismatch fails cleanly on
    all of them. Llama-format folders are converted through `convert` in memory instead (their fused
    `wqkv` is assembled from three tensors)."""
    folder = Path(folder)
    params = dict(model.named_parameters())
    from ..convert import folder_model_type

    if folder_model_type(folder) != "internlm2":
        _load_converted(model, folder, params, dist, strict)
        return
    files = WeightFiles(folder)
    try:
        _check_names(folder, params, {k: files.shape(k) for k in files.owner}, strict)
        for name, p in params.items():
            if name in files.owner:
                with _whole(p, dist) as writer:
                    if writer:
                        p.data.copy_(files.tensor(name))
    finally:
        files.close()


def _check_names(folder: Path, params: dict, shapes: dict, strict: bool) -> None:
    missing = [n for n in params if n not in shapes]
    unexpected = [n for n in shapes if n not in params]
    if strict and (missing or unexpected):
        raise InputError(f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    wrong = [f"{n} {shapes[n]} vs {_shape(p)}" for n, p in params.items() if n in shapes and shapes[n] != _shape(p)]
    if wrong:
        raise InputError(f"{folder}: weight shapes differ from the model's config: {'; '.join(wrong[:3])}")


def _load_converted(model, folder: Path, params: dict, dist: Dist, strict: bool) -> None:
    from ..convert import load_model as load_any

    partitioned = is_partitioned(model)
    state, error = {}, None
    if dist.is_main or not partitioned:  # a foreign layout: converted whole on the host, by one rank
        try:
            state = load_any(folder).state_dict()
            _check_names(folder, params, {k: tuple(v.shape) for k, v in state.items()}, strict)
        except InputError as e:
            error = str(e)
    if partitioned and dist.world > 1:  # the other ranks must not wait in a gather rank 0 never joins
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise InputError(error)
    for name, p in params.items():
        with _whole(p, dist) as writer:
            if writer and name in state:
                p.data.copy_(state[name])


# ---------------------------------------------------------------------------------------------------
# The engine


def frozen_model(model: torch.nn.Module, dist: Dist, ds_config: dict):
    """A model that scores but never trains, under `ds_config`: eval mode, no gradients; a ZeRO-3
    inference engine when the config is ZeRO-3 (callable like the module; `.module` is the module), else
    the module itself on the device in the config's dtype (DeepSpeed's ZeRO-1/2 need an optimizer; a
    frozen model needs no wrapper at all)."""
    import deepspeed

    model.requires_grad_(False)
    model.eval()
    if config_zero_stage(ds_config) != 3:
        return model.to(device=dist.device, dtype=run_dtype(ds_config))
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
    engine.eval()
    return engine


class Engine:
    """A DeepSpeed engine plus what the loop needs: the step with its grad norm, the LR, full weights.

    Trainable (default): AdamW (decay on matrices only, `param_groups`), warmup + cosine over
    `total_steps`, ZeRO and precision from `cfg` (or `ds_config`). Call `backward(loss)` then `step()`
    after every micro-batch; `step()` returns the grad norm on the last micro-batch of a step.

    `trainable=False` (a frozen model: PPO's reference and reward models): no optimizer, parameters
    frozen, the module in eval mode; under ZeRO-3 the weights stay partitioned and are gathered layer
    by layer around each forward (ZeRO-Inference), so a frozen 7B model costs 1/world of its bf16
    weights per rank; below ZeRO-3 it is the plain module on the device in the run's dtype (`ds` is
    None). `total_steps` is ignored; `backward`/`step` refuse.

    Both: `model` is what a loss function calls (DeepSpeed's wrapper), `module` the bare module,
    `full_state_dict()` the whole weights on rank 0 (collective), `full_weights()` the module with
    every parameter gathered for a block (collective; for generation or export).
    """

    def __init__(self, model: torch.nn.Module, cfg, total_steps: int, dist: Dist, ds_config: Optional[dict] = None,
                 *, trainable: bool = True):
        import deepspeed

        self.cfg, self.dist, self.total_steps, self.trainable = cfg, dist, total_steps, trainable
        self.config = dict(ds_config) if ds_config else deepspeed_config(cfg, dist.world)
        if not trainable:
            self.zero_stage = config_zero_stage(self.config)
            self.clip_here = False
            self.optimizer = self.scheduler = self.schedule = None
            served = frozen_model(model, dist, self.config)
            self.ds, self._module = (served, None) if self.zero_stage == 3 else (None, served)
            return
        expected = (cfg.micro_batch_size, cfg.grad_accum)
        got = (self.config.get("train_micro_batch_size_per_gpu"), self.config.get("gradient_accumulation_steps"))
        if got != expected:
            raise InputError(f"DeepSpeed config batch (micro {got[0]}, accum {got[1]}) differs from the recipe's "
                             f"(micro {expected[0]}, accum {expected[1]})")
        self.zero_stage = config_zero_stage(self.config)
        self.clip_here = not (self.zero_stage > 0 or self.config.get("bf16", {}).get("enabled"))
        if self.clip_here:  # see clips_in_deepspeed: DeepSpeed must not clip a second time
            self.config["gradient_clipping"] = 0.0
        if cfg.activation_checkpointing and hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = True
        if not is_partitioned(model):  # a model from build_model is on the device already
            model.to(dist.device)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        self.weight_decays = [g["weight_decay"] for g in optimizer.param_groups]
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
        for group, lr, decay in zip(sched.optimizer.param_groups, lrs, self.weight_decays):
            group["lr"] = lr
            # A universal checkpoint gives every group the first group's hyperparameters (deepspeed
            # 0.19.8): norms and biases would be decayed.
            group["weight_decay"] = decay
        sched._last_lr = lrs

    @property
    def model(self):
        """The callable a loss function runs (DeepSpeed's wrapper: ZeRO-3 gathers weights around it)."""
        return self.ds if self.ds is not None else self._module

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module if self.ds is not None else self._module

    def lr(self) -> float:
        """The LR the next optimizer step applies."""
        return float(self.ds.get_lr()[0])

    def backward(self, loss: torch.Tensor) -> None:
        if not self.trainable:
            raise RuntimeError("a frozen engine (trainable=False) has no backward pass")
        self.ds.backward(loss)  # scales by 1/grad_accum

    def step(self) -> Optional[float]:
        """Call after every micro-batch's backward; on the last one of a step the update happens and the
        (pre-clip) global grad norm is returned, otherwise None."""
        if not self.trainable:
            raise RuntimeError("a frozen engine (trainable=False) has no optimizer step")
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

    def exportable(self) -> Optional["Weights"]:
        """On rank 0, what an exporter (`convert.save_model`, `fit`'s `export`) reads: `config` and
        `state_dict()`, the whole weights as CPU tensors gathered module by module; None elsewhere.
        Collective under ZeRO-3. Unlike `full_weights()`, no rank ever holds the whole model on its device."""
        sd = self.full_state_dict()
        return Weights(getattr(self.module, "config", None), sd) if sd is not None else None

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[torch.nn.Module]:
        """The module with every parameter whole (gathered under ZeRO-3) for the duration of the block."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module
        else:
            yield self.module


class Weights:
    """What an exporter reads from a model, `config` and `state_dict()`, without the model (a snapshot)."""

    def __init__(self, config, state: dict):
        self.config, self._state = config, state

    def state_dict(self) -> dict:
        return self._state


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
