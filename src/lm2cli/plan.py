"""Choosing a parallel layout before a run: `lm2 plan` and `lm2 pretrain --plan` (SPEC §6).

InternEvo picks data/tensor/sequence/pipeline parallel sizes and how far to shard parameters,
gradients and optimizer state with a simulator of memory and time. This module is that simulator
for the layouts the DeepSpeed engine runs for lm2: data parallel × ZeRO stage 0/1/2/3, ZeRO++ hpZ
(a secondary, in-node copy of the ZeRO-3 parameter shards), activation checkpointing on or off, and
the micro-batch × gradient-accumulation split that reaches the global batch. lm2 keeps tp = pp = 1:
its model has no Megatron tensor split, no pipeline stages and no Ulysses attention, and InternEvo
itself uses tp = 1 below 20B (SPEC §6.2).

Memory per GPU follows what deepspeed 0.19.8 allocates, not only the textbook 16Φ:
- model states: parameters, gradients and optimizer state (fp32 master + Adam m, v: 12 bytes per
  parameter under bf16, SPEC §6.3), sharded per stage; every ZeRO stage keeps a separate fp32 master
  copy even in fp32 training, the optimizer step reads an fp32 copy of the gradient shard, and hpZ adds
  its secondary parameter shard (bench/plan_memory.py measures these against DeepSpeed);
- gradients: under bf16 accumulated in fp32 (`data_types.grad_accum_dtype`, train/engine.py), so
  ZeRO-1's BF16_Optimizer holds a full fp32 gradient buffer and ZeRO-2/3 an fp32 shard; a bf16 run
  has no ZeRO-0 layout (deepspeed 0.19.8 accumulates bf16 weights' gradients in fp32 only under ZeRO,
  so lm2 runs bf16 full-replica as ZeRO-1);
- activations: SPEC §6.3's `s·b·H·L·(34 + 5·a·s/H)` (the attention-score term, and the B×T×T mask,
  only for the dense-mask fallback: lm2's packed attention — flash varlen, FlexAttention, per-document
  SDPA — keeps nothing quadratic in T), or, with checkpointing, the layer inputs plus one layer being
  recomputed;
- buffers: the loss's logits one chunk of tokens at a time (train/loss.py: the chunk in the model
  dtype, its fp32 upcast and fp32 gradient, the head's fp32 weight-gradient sum, a log-sum-exp per
  token — never B×T×V in fp32), DeepSpeed's gradient buckets and ZeRO-3's gathered-parameter working set (with the tensors under
  `stage3_param_persistence_threshold`, which stay gathered through forward and backward), a runtime
  reserve (CUDA context, NCCL), and a fragmentation headroom on everything allocated per step.

Step time = compute (executed FLOPs at a stated MFU) + the communication that overlap does not hide
(+ a small fixed cost per micro-step). Collectives follow a hierarchical ring model: inside one node
they run at NVLink bandwidth; across nodes they reduce-scatter in the node, cross nodes on each GPU's
own NIC with 1/G of the bytes, and gather back in the node. Latency per collective is not modelled.

Public API: `GPUS`, `Cluster`, `cluster`, `detect_cluster`, `ModelShape`, `Workload`, `workload_for`,
`recipe_vocab`, `Layout`, `Memory`, `StepTime`, `Candidate`, `Plan`, `zero_shards`, `model_state_bytes`,
`memory`, `step_time`, `enumerate_plan`, `plan_recipe`, `best_layout`, `deepspeed_config`,
`write_deepspeed_config`, `print_plan`, `run_plan` (the `lm2 plan` command).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig, Recipe, TrainConfig
from .errors import InputError

GiB = 2**30
GB = 1e9

# deepspeed 0.19.8 settings the planner writes into the config it emits, so the memory it counts is the
# memory DeepSpeed allocates (elements, not bytes).
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size / allgather_bucket_size
PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size default
PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold default
MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters default

RUNTIME_RESERVE = 1.0 * GiB  # CUDA context, cuBLAS workspace, NCCL communicators (GPU only)
FRAGMENTATION = 0.10  # headroom on per-step allocations (activations, logits, buckets)
OVERLAP_EFFICIENCY = 0.8  # share of the overlappable compute window that actually hides communication
INTERFERENCE = 0.15  # hidden communication still slows compute by this share of its time (NCCL SMs, HBM)
MICRO_STEP_OVERHEAD = 0.005  # s per forward/backward pair: Python, DeepSpeed hooks, kernel launches
BATCH_TOLERANCE = 0.05  # reached global batch may differ from the target by this much
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
RECIPE_GPUS = 8  # the InternLM2 recipes size grad_accum for 8 GPUs (their header says so)


# ---------------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # total device memory as nvidia-smi reports it
    peak_tflops: float  # dense bf16 tensor-core peak
    intra_bw: float  # GB/s per GPU per direction inside a node (NVLink)
    inter_bw: float  # GB/s per GPU across nodes (one NIC per GPU, rail-optimised)


GPUS = {
    g.name: g
    for g in (
        GPU("A100-40", 40.0, 312.0, 300.0, 25.0),  # SXM4, NVLink3 600 GB/s bidirectional, HDR 200 Gb/s
        GPU("A100-80", 80.0, 312.0, 300.0, 25.0),
        GPU("H100-80", 79.6, 989.0, 450.0, 50.0),  # SXM5, NVLink4 900 GB/s bidirectional, NDR 400 Gb/s
        GPU("H200-141", 140.4, 989.0, 450.0, 50.0),
    )
}


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    memory_gib: float
    peak_tflops: float
    intra_bw: float
    inter_bw: float
    name: str = "custom"

    def __post_init__(self):
        if self.gpus < 1:
            raise InputError(f"--gpus must be at least 1, got {self.gpus}")
        if self.gpus_per_node < 1:
            raise InputError(f"--gpus-per-node must be at least 1, got {self.gpus_per_node}")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise InputError(f"--gpus {self.gpus} is not a whole number of nodes of {self.gpus_per_node} GPUs")
        for flag, v in (("--gpu-memory", self.memory_gib), ("--peak-tflops", self.peak_tflops),
                        ("--intra-bw", self.intra_bw), ("--inter-bw", self.inter_bw)):
            if not v > 0:
                raise InputError(f"{flag} must be positive, got {v:g}")

    @property
    def local(self) -> int:
        """GPUs of one job that share a node."""
        return min(self.gpus, self.gpus_per_node)

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)


def cluster(
    gpus: int,
    gpus_per_node: int = 8,
    gpu: str | None = None,
    memory_gib: float | None = None,
    peak_tflops: float | None = None,
    intra_bw: float | None = None,
    inter_bw: float | None = None,
) -> Cluster:
    """A cluster from a GPU preset, with any figure given explicitly taking precedence."""
    given = {"memory_gib": memory_gib, "peak_tflops": peak_tflops, "intra_bw": intra_bw, "inter_bw": inter_bw}
    name = "custom"
    if gpu is not None:
        preset = _preset(gpu)
        name = preset.name
        given = {k: getattr(preset, k) if v is None else v for k, v in given.items()}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        flags = ", ".join({"memory_gib": "--gpu-memory"}.get(k, "--" + k.replace("_", "-")) for k in missing)
        raise InputError(f"give --gpu PRESET ({', '.join(GPUS)}) or the figures it would set; missing {flags}")
    return Cluster(gpus=gpus, gpus_per_node=gpus_per_node, name=name, **given)


def _preset(gpu: str) -> GPU:
    for name, preset in GPUS.items():
        if name.lower() == gpu.lower():
            return preset
    raise InputError(f"unknown GPU preset {gpu!r}; known: {', '.join(GPUS)}")


def detect_cluster() -> Cluster:
    """The cluster this process runs in, from the launcher's env (WORLD_SIZE, LOCAL_WORLD_SIZE) and the
    device: a known GPU maps to its preset; anything else gets its memory and nominal figures."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        mem = props.total_memory / GiB
        for preset in GPUS.values():
            if preset.name.split("-")[0] in props.name and abs(preset.memory_gib - mem) < 0.1 * preset.memory_gib:
                return cluster(world, local, preset.name, memory_gib=mem)
        return cluster(world, local, memory_gib=mem, peak_tflops=100.0, intra_bw=100.0, inter_bw=12.5)
    # CPU: ranks share the host's memory; the figures only rank layouts against each other.
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return cluster(world, local, memory_gib=host / max(local, 1), peak_tflops=0.1, intra_bw=5.0, inter_bw=1.0)


# ---------------------------------------------------------------------------------------------------
# Model and workload


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg: ModelConfig, vocab: int | None = None) -> ModelShape:
        return cls(vocab=vocab or cfg.vocab_size, hidden=cfg.hidden_size, ffn=cfg.intermediate_size,
                   layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                   head_dim=cfg.head_dim)

    def layer_tensors(self) -> list[int]:
        """Element counts of one block's tensors: wqkv, wo, w1, w3, w2, attention_norm, ffn_norm."""
        h, hd = self.hidden, self.head_dim
        return [(self.heads + 2 * self.kv_heads) * hd * h, self.heads * hd * h, self.ffn * h, self.ffn * h,
                h * self.ffn, h, h]

    def tensors(self) -> list[int]:
        """Element counts of every parameter tensor: embedding, blocks, final norm, untied output head."""
        emb = self.vocab * self.hidden
        return [emb, *self.layer_tensors() * self.layers, self.hidden, emb]

    @property
    def layer_params(self) -> int:
        """SPEC §2.2: H·(nh+2·nkv)·hd + nh·hd·H + 3·H·F + 2H."""
        return sum(self.layer_tensors())

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.hidden + 2 * self.vocab * self.hidden

    @property
    def non_embedding_params(self) -> int:
        """SPEC §2.2's count: without the embedding and the output head."""
        return self.params - 2 * self.vocab * self.hidden

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·(matmul params, the output head included) + 12·L·H·T for attention
        (PaLM appendix B)."""
        matmul = self.non_embedding_params + self.vocab * self.hidden
        return 6.0 * matmul + 12.0 * self.layers * self.hidden * seq_len


@dataclass(frozen=True)
class Workload:
    model: ModelShape
    seq_len: int
    global_batch_tokens: int
    precision: str = "bf16"  # "bf16" mixed precision or "fp32"
    mfu: float = 0.5  # share of peak that executed FLOPs reach
    flash_attention: bool = True  # packed attention without T×T scores or mask (False: the dense fallback)

    def __post_init__(self):
        if self.seq_len < 1:
            raise InputError(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.global_batch_tokens < self.seq_len:
            raise InputError(f"--global-batch-tokens {self.global_batch_tokens} is less than one sequence "
                             f"of --seq-len {self.seq_len}")
        if not 0 < self.mfu <= 1:
            raise InputError(f"--mfu must be in (0, 1], got {self.mfu:g}")
        if self.precision not in ("bf16", "fp32"):
            raise InputError(f"precision must be bf16 or fp32, got {self.precision!r}")

    @property
    def bytes_per_param(self) -> int:
        return 2 if self.precision == "bf16" else 4


def recipe_vocab(recipe: Recipe) -> int:
    """The recipe's vocab size; a recipe that takes it from the tokenizer gets the size its tokenizer
    section will build (cl100k + zh + spares, padded), which is what SPEC §3.3 aims for."""
    if recipe.model.vocab_size > 0:
        return recipe.model.vocab_size
    t = recipe.tokenizer
    return math.ceil((t.n_en + t.n_zh + t.n_spare) / t.pad_multiple) * t.pad_multiple


def workload_for(
    recipe: Recipe,
    stage: int = 1,
    seq_len: int | None = None,
    global_batch_tokens: int | None = None,
    mfu: float = 0.5,
) -> Workload:
    """The pretraining stage's workload; the global batch defaults to the recipe's tokens per step."""
    if stage not in (1, 2, 3):
        raise InputError(f"--stage must be 1, 2 or 3, got {stage}")
    train: TrainConfig = getattr(recipe.pretrain, f"stage{stage}")
    seq = seq_len or train.seq_len
    tokens = global_batch_tokens or seq * train.micro_batch_size * train.grad_accum * RECIPE_GPUS
    return Workload(ModelShape.from_config(recipe.model, recipe_vocab(recipe)), seq, tokens, train.precision, mfu)


# ---------------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class Layout:
    dp: int
    zero_stage: int
    micro_batch: int
    grad_accum: int
    checkpointing: bool = False
    hpz: int = 1  # zero_hpz_partition_size: 1 = off, else GPUs per node (stage 3 only)
    tp: int = 1  # lm2's model has no tensor split
    bucket: int = REDUCE_BUCKET  # reduce/allgather bucket (elements); the planner shrinks it to small models

    def tokens(self, seq_len: int) -> int:
        return self.dp * self.micro_batch * self.grad_accum * seq_len

    def describe(self) -> str:
        hpz = f"+hpZ{self.hpz}" if self.hpz > 1 else ""
        ck = " ckpt" if self.checkpointing else ""
        return f"ZeRO-{self.zero_stage}{hpz}{ck} mb {self.micro_batch}×{self.grad_accum}"


@dataclass
class Memory:
    """Bytes per GPU. `params + grads + optimizer` are the model states the ZeRO paper counts."""

    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    buffers: float
    runtime: float
    fragmentation: float

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.logits + self.buffers + self.runtime + self.fragmentation

    def gib(self) -> dict:
        d = {f.name: getattr(self, f.name) / GiB for f in dataclasses.fields(self)}
        d.update(model_states=self.model_states / GiB, total=self.total / GiB)
        return {k: round(v, 3) for k, v in d.items()}


@dataclass
class StepTime:
    """Seconds per optimizer step."""

    compute: float
    comm: float  # all collectives, as if nothing overlapped
    exposed_comm: float  # what compute does not hide
    overhead: float  # fixed cost per micro-step, so fewer larger micro-batches win a tie
    tokens_per_s: float
    mfu: float  # model FLOPs (no recompute) per second over peak

    @property
    def step(self) -> float:
        return self.compute + self.exposed_comm + self.overhead


@dataclass
class Candidate:
    layout: Layout
    memory: Memory
    time: StepTime
    fits: bool
    reason: str = ""  # why it does not fit / cannot run
    kind: str = ""  # "oom" | "batch": the class of the reason, for the summary

    def to_json(self, seq_len: int, capacity_gib: float) -> dict:
        return {
            "layout": self.layout.describe(),
            "zero_stage": self.layout.zero_stage,
            "hpz_partition_size": self.layout.hpz,
            "activation_checkpointing": self.layout.checkpointing,
            "dp": self.layout.dp,
            "tp": self.layout.tp,
            "micro_batch": self.layout.micro_batch,
            "grad_accum": self.layout.grad_accum,
            "global_batch_tokens": self.layout.tokens(seq_len),
            "fits": self.fits,
            "reason": self.reason or None,
            "memory_gib": {**self.memory.gib(), "capacity": capacity_gib},
            "time_s": {
                "step": round(self.time.step, 4),
                "compute": round(self.time.compute, 4),
                "comm": round(self.time.comm, 4),
                "exposed_comm": round(self.time.exposed_comm, 4),
                "overhead": round(self.time.overhead, 4),
            },
            "tokens_per_s": round(self.time.tokens_per_s, 1),
            "mfu": round(self.time.mfu, 4),
        }


# ---------------------------------------------------------------------------------------------------
# Memory


def zero_shards(stage: int, dp: int) -> tuple[int, int, int]:
    """Over how many GPUs ZeRO spreads (parameters, gradients, optimizer state): stage 1 shards the
    optimizer state (P_os), stage 2 also the gradients (P_os+g), stage 3 also the parameters (P_os+g+p)."""
    return (dp if stage >= 3 else 1, dp if stage >= 2 else 1, dp if stage >= 1 else 1)


def model_state_bytes(params: float, dp: int, stage: int, k: int = 12, param_bytes: int = 2,
                      grad_bytes: int = 2) -> float:
    """The ZeRO paper's model-state memory per GPU (Rajbhandari et al. 2020, §3, Fig. 1): parameters,
    gradients and K bytes of optimizer state per parameter, each divided by its shard count."""
    sp, sg, so = zero_shards(stage, dp)
    return params * (param_bytes / sp + grad_bytes / sg + k / so)


def _persistent_params(shape: ModelShape) -> int:
    """Elements ZeRO-3 keeps gathered through forward and backward (tensors at or under the threshold)."""
    return sum(n for n in shape.tensors() if n <= PERSISTENCE_THRESHOLD)


def memory(work: Workload, layout: Layout, runtime_reserve: float = RUNTIME_RESERVE) -> Memory:
    """Per-GPU memory at the peak: the model states at their largest plus all a micro-batch allocates.

    Parameters and optimizer state are the ZeRO paper's (K = 12 under bf16: fp32 master + Adam m, v; under
    fp32, K = 8 for Adam plus 4 for the master copy every ZeRO stage keeps in 0.19.8 — it clones its shard,
    and ZeRO-3's in-place path never triggers because it compares a torch.device with a device-name
    string); hpZ adds a secondary parameter shard over the node.
    """
    shape, n, s = work.model, layout.dp, layout.zero_stage
    phi, p = float(shape.params), work.bytes_per_param
    mixed = work.precision != "fp32"
    sp, sg, so = zero_shards(s, n)
    params = p * phi / sp + (p * phi / layout.hpz if s >= 3 and layout.hpz > 1 else 0.0)
    k = 12 if (mixed or s >= 1) else 8
    optimizer = k * phi / so
    # Gradients: the larger of what backward holds (the paper's share, in the model's dtype, DeepSpeed's
    # default accumulation dtype) and what the optimizer step holds: stage 0 converts the whole set to fp32
    # beside the bf16 one, ZeRO-1/2 convert their shard and free the rest (in place under fp32), ZeRO-3
    # flattens its shard into a new fp32 tensor beside its partition buffer.
    # Under bf16 the gradients accumulate in fp32: ZeRO-1 (BF16_Optimizer) in a full-size fp32 buffer,
    # ZeRO-2/3 in their fp32 shard (ZeRO-3 flattens it once more for the step).
    backward = p * phi / sg
    step = {0: p * phi + (4 * phi if mixed else 0.0), 1: 4 * phi if mixed else 4 * phi / n,
            2: 4 * phi / n}.get(s, (8 if mixed else p + 4) * phi / n)
    grads = max(backward, step)
    act = activation_bytes(work, layout)
    logits = loss_bytes(work, layout)
    buffers = _buffer_bytes(work, layout)
    frag = FRAGMENTATION * (act + logits + buffers)
    return Memory(params, grads, optimizer, act, logits, buffers, runtime_reserve, frag)


def activation_bytes(work: Workload, layout: Layout) -> float:
    """SPEC §6.3: s·b·H·L·(34 + 5·a·s/H)/tp for 16-bit activations; with checkpointing each block keeps only
    its input (2·s·b·H) and one block at a time is recomputed in full. The 5·a·s/H score term and the
    boolean B×T×T document mask (one byte per entry, shared by the layers) count only for the dense
    fallback; lm2's packed attention paths grow with T."""
    m = work.model
    sbh = work.seq_len * layout.micro_batch * m.hidden
    scores = 0.0 if work.flash_attention else 5.0 * m.heads * work.seq_len / m.hidden
    mask = 0.0 if work.flash_attention else float(layout.micro_batch) * work.seq_len**2
    per_layer = sbh * (34.0 + scores) / layout.tp * (work.bytes_per_param / 2)
    if not layout.checkpointing:
        return per_layer * m.layers + mask
    return 2.0 * sbh * (work.bytes_per_param / 2) * m.layers + per_layer + mask


LOGITS_CHUNK = 2**26  # = train.loss.LOGITS_CHUNK (logits elements per chunk; kept here so plan needs no torch)


def loss_bytes(work: Workload, layout: Layout) -> float:
    """The chunked head + cross-entropy (train/loss.py) at its peak, in backward: one chunk's logits in the
    model dtype, their fp32 upcast and fp32 gradient, the fp32 sum of the head's weight gradient, and one
    fp32 log-sum-exp per token."""
    m, p = work.model, work.bytes_per_param
    tokens = layout.micro_batch * work.seq_len
    chunk = min(tokens, max(1, LOGITS_CHUNK // m.vocab))
    return chunk * m.vocab * (p + 8.0) + 4.0 * m.vocab * m.hidden + 4.0 * tokens


def _buffer_bytes(work: Workload, layout: Layout) -> float:
    """DeepSpeed's communication buffers: the gradient all-reduce bucket (stage 0), the reduce bucket(s)
    (stage 1/2, two with overlap_comm), ZeRO-3's reduce bucket and its gathered-parameter working set."""
    shape, p, s = work.model, work.bytes_per_param, layout.zero_stage
    if layout.dp == 1 and s == 0:
        return 0.0
    bucket = layout.bucket
    if s <= 1:
        return p * bucket
    if s == 2:
        return 2 * p * bucket  # overlap_comm double-buffers
    if layout.dp == 1:
        return p * bucket  # one rank holds every parameter already: nothing is gathered
    # The module being computed plus what prefetch has gathered ahead, and the small persistent tensors.
    largest = max(max(shape.layer_tensors()), shape.vocab * shape.hidden)
    gathered = min(MAX_LIVE_PARAMETERS, largest + min(PREFETCH_BUCKET, shape.params))
    return p * (bucket + gathered + _persistent_params(shape))


# ---------------------------------------------------------------------------------------------------
# Time


def _ring(nbytes: float, ranks: int, local: int, cl: Cluster) -> float:
    """Seconds for a reduce-scatter (or all-gather) of `nbytes` over `ranks` GPUs, `local` per node:
    (g−1)/g of the bytes over NVLink, then (m−1)/m of 1/g of them across m nodes on each GPU's NIC."""
    if ranks <= 1:
        return 0.0
    g = min(local, ranks)
    m = math.ceil(ranks / g)
    intra = (g - 1) / g * nbytes / (cl.intra_bw * GB)
    inter = (m - 1) / m * (nbytes / g) / (cl.inter_bw * GB)
    return intra + inter


def step_time(work: Workload, layout: Layout, cl: Cluster) -> StepTime:
    shape, n, s = work.model, layout.dp, layout.zero_stage
    tokens_gpu = layout.micro_batch * layout.grad_accum * work.seq_len
    useful = shape.flops_per_token(work.seq_len) * tokens_gpu
    executed = useful * (4.0 / 3.0 if layout.checkpointing else 1.0)  # recompute = one more forward
    compute = executed / (cl.peak_tflops * 1e12 * work.mfu)
    micro_compute = compute / layout.grad_accum
    backward_share = (3.0 if layout.checkpointing else 2.0) / (4.0 if layout.checkpointing else 3.0)

    volume = work.bytes_per_param * shape.params
    rs = _ring(volume, n, cl.local, cl)  # a reduce-scatter and an all-gather take the same time
    if s <= 1:
        # Stage 0 all-reduces after the last micro-batch's backward; stage 1 reduce-scatters there and
        # all-gathers the updated weights after the step: nothing runs beside compute.
        total, blocking, overlapped, window = 2 * rs, 2 * rs, 0.0, 0.0
    elif s == 2:
        # Gradients are sharded, so every micro-batch reduce-scatters, during its backward.
        total, blocking, overlapped, window = rs * (layout.grad_accum + 1), rs, rs, backward_share * micro_compute
    else:
        # Every micro-batch gathers the weights for forward and again for backward (inside the node with
        # hpZ) and reduce-scatters gradients; prefetch and overlap_comm run them beside compute.
        bwd_gather = _ring(volume, layout.hpz, layout.hpz, cl) if layout.hpz > 1 else rs
        overlapped = 2 * rs + bwd_gather
        total, blocking, window = overlapped * layout.grad_accum, 0.0, micro_compute
    hideable = OVERLAP_EFFICIENCY * window
    unhidden = max(0.0, overlapped - hideable)
    exposed = blocking + (unhidden + INTERFERENCE * min(overlapped, hideable)) * layout.grad_accum
    overhead = MICRO_STEP_OVERHEAD * layout.grad_accum
    step = compute + exposed + overhead
    mfu = useful / (step * cl.peak_tflops * 1e12)
    return StepTime(compute, total, exposed, overhead, tokens_gpu * n / step, mfu)


# ---------------------------------------------------------------------------------------------------
# Enumeration


def _splits(work: Workload, dp: int) -> Iterable[tuple[int, int, str]]:
    """(micro batch, accumulation, why it cannot run or '') for each micro batch worth trying."""
    for mb in MICRO_BATCHES:
        per_micro = dp * mb * work.seq_len
        accum = max(1, round(work.global_batch_tokens / per_micro))
        reached = per_micro * accum
        off = reached / work.global_batch_tokens - 1
        if abs(off) <= BATCH_TOLERANCE:
            yield mb, accum, ""
        else:
            yield mb, accum, (f"global batch {work.global_batch_tokens:,} tokens is not reachable: dp {dp} × "
                              f"micro {mb} × accum {accum} × seq {work.seq_len} = {reached:,} ({off:+.0%})")
        if per_micro >= work.global_batch_tokens:
            return  # larger micro-batches only overshoot further


def layouts(work: Workload, cl: Cluster, zero_stages: Iterable[int] | None = None) -> Iterable[tuple[Layout, str]]:
    stages = sorted(set(zero_stages)) if zero_stages is not None else [0, 1, 2, 3]
    if work.precision == "bf16":  # bf16 full-replica runs as ZeRO-1 (fp32 gradient accumulation)
        stages = [s for s in stages if s > 0]
    hpzs = [1] + ([cl.gpus_per_node] if cl.gpus > cl.gpus_per_node > 1 else [])
    dp = cl.gpus  # tp = pp = 1
    bucket = min(REDUCE_BUCKET, work.model.params)  # DeepSpeed's default, never larger than the model
    for mb, accum, why in _splits(work, dp):
        for stage in stages:
            for hpz in hpzs if stage == 3 else [1]:
                for ckpt in (False, True):
                    yield Layout(dp, stage, mb, accum, ckpt, hpz, bucket=bucket), why


def enumerate_plan(work: Workload, cl: Cluster, zero_stages: Iterable[int] | None = None) -> list[Candidate]:
    """Every layout with its memory and time, the runnable ones fastest first, then the others."""
    capacity = cl.memory_gib * GiB
    out = []
    for layout, why in layouts(work, cl, zero_stages):
        mem, t = memory(work, layout), step_time(work, layout, cl)
        if why:
            out.append(Candidate(layout, mem, t, False, why, "batch"))
        elif mem.total > capacity:
            reason = (f"out of memory: needs {mem.total / GiB:.1f} GiB > {cl.memory_gib:g} GiB "
                      f"(over by {(mem.total - capacity) / GiB:.1f} GiB)")
            out.append(Candidate(layout, mem, t, False, reason, "oom"))
        else:
            out.append(Candidate(layout, mem, t, True))
    out.sort(key=lambda c: (not c.fits, c.time.step if c.fits else c.memory.total, c.memory.total))
    return out


@dataclass
class Plan:
    workload: Workload
    cluster: Cluster
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def fitting(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fits]

    def best(self) -> Candidate:
        if not self.fitting:
            raise InputError(self.no_fit_message())
        return self.fitting[0]

    def no_fit_message(self) -> str:
        cl, w = self.cluster, self.workload
        oom = [c for c in self.candidates if c.kind == "oom"]
        where = f"{cl.gpus} × {cl.memory_gib:g} GiB ({cl.name})"
        if oom:
            c = min(oom, key=lambda c: c.memory.total)
            states = c.memory.model_states / GiB
            fix = "add GPUs" if states > cl.memory_gib else "add GPUs or shorten --seq-len"
            return (f"no layout fits on {where}: the smallest, {c.layout.describe()}, needs "
                    f"{c.memory.total / GiB:.1f} GiB per GPU (model states {states:.1f} GiB); {fix}")
        return (f"no layout reaches a global batch of {w.global_batch_tokens:,} tokens (±{BATCH_TOLERANCE:.0%}) with "
                f"{cl.gpus} GPUs × seq {w.seq_len}; change --global-batch-tokens or --gpus")

    def to_json(self) -> list[dict]:
        return [c.to_json(self.workload.seq_len, self.cluster.memory_gib) for c in self.candidates]


def plan_recipe(
    recipe: Recipe,
    cl: Cluster,
    stage: int = 1,
    seq_len: int | None = None,
    global_batch_tokens: int | None = None,
    mfu: float = 0.5,
    zero_stages: Iterable[int] | None = None,
) -> Plan:
    work = workload_for(recipe, stage, seq_len, global_batch_tokens, mfu)
    return Plan(work, cl, enumerate_plan(work, cl, zero_stages))


def best_layout(recipe: Recipe, cl: Cluster, stage: int = 1, **kw) -> Candidate:
    """The fastest layout that fits, for `lm2 pretrain --plan`; InputError (one line) when none does.

    Use: `choice = best_layout(recipe, detect_cluster(), stage)`, then
    `write_deepspeed_config(choice, train_cfg, run_dir / "deepspeed.json")` and set the model's
    `gradient_checkpointing = choice.layout.checkpointing`.
    """
    return plan_recipe(recipe, cl, stage, **kw).best()


# ---------------------------------------------------------------------------------------------------
# DeepSpeed config


def deepspeed_config(layout: Layout, train: TrainConfig) -> dict:
    """The deepspeed 0.19.8 config for a layout. The optimizer is the caller's (a torch AdamW passed to
    `deepspeed.initialize`), hence `zero_allow_untested_optimizer`; activation checkpointing is the
    model's own flag (`InternLM2.gradient_checkpointing = layout.checkpointing`), not a DeepSpeed section."""
    bf16 = train.precision == "bf16"
    zero: dict = {
        "stage": max(1, layout.zero_stage) if bf16 else layout.zero_stage,  # see train.engine.deepspeed_config
        "contiguous_gradients": True,
        "overlap_comm": layout.zero_stage >= 2,
        "reduce_scatter": True,
        "reduce_bucket_size": int(layout.bucket),
        "allgather_bucket_size": int(layout.bucket),
    }
    if layout.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=PREFETCH_BUCKET,
            stage3_param_persistence_threshold=PERSISTENCE_THRESHOLD,
            stage3_max_live_parameters=MAX_LIVE_PARAMETERS,
            stage3_gather_16bit_weights_on_model_save=True,
            zero_hpz_partition_size=layout.hpz,
        )
    return {
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.micro_batch * layout.grad_accum * layout.dp,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": bf16},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # lm2 logs progress itself
        "wall_clock_breakdown": False,
    }


def write_deepspeed_config(choice: Candidate | Layout, train: TrainConfig, path: str | Path) -> Path:
    """Write the DeepSpeed JSON for a chosen layout (a `Candidate` from `best_layout`, or a `Layout`)."""
    layout = choice.layout if isinstance(choice, Candidate) else choice
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(deepspeed_config(layout, train), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------
# Output


def print_plan(plan: Plan, top: int = 5) -> None:
    """The best few as a Rich table, then why the rest cannot run."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if os.isatty(1) else 150)
    w, cl = plan.workload, plan.cluster
    m = w.model
    console.print(
        f"[bold]{m.params / 1e9:.3f}B params[/bold] (non-embedding {m.non_embedding_params / 1e9:.3f}B), "
        f"seq {w.seq_len}, global batch {w.global_batch_tokens:,} tokens, {w.precision}, MFU {w.mfu:g}; "
        f"{cl.gpus} × {cl.name} = {cl.nodes} node{'s' if cl.nodes > 1 else ''} × {cl.local}, {cl.memory_gib:g} GiB, "
        f"{cl.peak_tflops:g} TFLOP/s, {cl.intra_bw:g}/{cl.inter_bw:g} GB/s in/across nodes; dp {cl.gpus}, tp = pp = 1",
        soft_wrap=True,
    )
    table = Table(show_edge=False, pad_edge=False)
    for col in ("#", "layout (micro × accum)", "batch", "params", "grads", "optim", "activ", "logits+buf", "total GiB",
                "step s", "comm s", "tokens/s", "MFU"):
        table.add_column(col, justify="left" if col.startswith("layout") else "right", no_wrap=True)
    for i, c in enumerate(plan.fitting[:top], 1):
        g = c.memory.gib()
        table.add_row(
            str(i), c.layout.describe(), _tokens(c.layout.tokens(w.seq_len)), f"{g['params']:.3g}", f"{g['grads']:.3g}",
            f"{g['optimizer']:.3g}", f"{g['activations']:.3g}", f"{g['logits'] + g['buffers']:.3g}", f"{g['total']:.3g}",
            f"{c.time.step:.2f}", f"{c.time.exposed_comm:.2f}", f"{c.time.tokens_per_s:,.0f}", f"{c.time.mfu:.1%}",
        )
    console.print(table)
    console.print("GiB per GPU; total adds a runtime reserve and fragmentation headroom; comm s is what overlap "
                  "does not hide; batch = tokens per optimizer step reached", style="dim", soft_wrap=True)
    for line in rejection_summary(plan):
        console.print(line, markup=False, soft_wrap=True)


def _tokens(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def rejection_summary(plan: Plan) -> list[str]:
    rejected = [c for c in plan.candidates if not c.fits]
    if not rejected:
        return [f"all {len(plan.candidates)} layouts fit"]
    lines = [f"{len(plan.fitting)} of {len(plan.candidates)} layouts fit; rejected:"]
    oom = sorted((c for c in rejected if c.kind == "oom"), key=lambda c: c.memory.total)
    if oom:
        lines.append(f"  {len(oom)} out of memory, e.g.")
        seen = set()
        for c in oom:  # the nearest miss of each ZeRO stage says what each stage lacks
            key = (c.layout.zero_stage, c.layout.hpz)
            if key not in seen:
                seen.add(key)
                lines.append(f"    {c.layout.describe()}: {c.reason}")
    batch = [c for c in rejected if c.kind == "batch"]
    if batch:
        lines.append(f"  {len(batch)} cannot reach the global batch, e.g. {batch[0].reason}")
    return lines


def run_plan(
    recipe: Recipe,
    gpus: int,
    gpus_per_node: int = 8,
    gpu: str | None = None,
    gpu_memory: float | None = None,
    peak_tflops: float | None = None,
    intra_bw: float | None = None,
    inter_bw: float | None = None,
    stage: int = 1,
    seq_len: int | None = None,
    global_batch_tokens: int | None = None,
    mfu: float = 0.5,
    zero: list[int] | None = None,
    top: int = 5,
    json_out: bool = False,
    rlhf: str | None = None,
) -> Plan | list[RLHFCandidate]:
    """`lm2 plan`: every layout for the recipe's pretraining stage (or, with `rlhf`, its `reward` model
    training or its `ppo` stage) on the cluster, best first."""
    if zero and any(z not in (0, 1, 2, 3) for z in zero):
        raise InputError(f"--zero takes 0, 1, 2 or 3, got {', '.join(map(str, zero))}")
    if top < 1:
        raise InputError(f"--top must be at least 1, got {top}")
    if rlhf not in (None, "reward", "ppo"):
        raise InputError(f"--rlhf takes reward or ppo, got {rlhf!r}")
    cl = cluster(gpus, gpus_per_node, gpu, gpu_memory, peak_tflops, intra_bw, inter_bw)
    if rlhf == "ppo":
        cands = plan_rlhf(recipe, cl, zero or None)
        best_rlhf_layout(recipe, cl, zero or None)
        if json_out:
            from .console import print_json

            print_json([c.to_json(cl.memory_gib) for c in cands])
        else:
            print_rlhf_plan(recipe, cl, cands, top)
        return cands
    if rlhf == "reward":
        work = reward_workload(recipe, mfu)
        plan = Plan(work, cl, enumerate_plan(work, cl, zero or None))
    else:
        plan = plan_recipe(recipe, cl, stage, seq_len, global_batch_tokens, mfu, zero or None)
    plan.best()  # nothing runnable is an input problem: say so in one line
    if json_out:
        from .console import print_json

        print_json(plan.to_json())
    else:
        print_plan(plan, top)
    return plan


# ---------------------------------------------------------------------------------------------------
# RLHF (SPEC §8): PPO's four models and its rollout buffer; the reward model trains like pretraining
#
# PPO holds four models of one shape per rank (align/ppo.py): the actor and the critic are training
# engines (model states as above, sharded by their ZeRO stage), the reference and the reward model are
# frozen (16-bit or fp32 weights only: whole per rank, ZeRO-3-sharded when the actor is, or in CPU memory
# with `frozen_offload`). On top of these resident states a rank's peak is the larger of two phases:
# - rollout: under ZeRO-3 the actor's whole weights (gathered once for generation), the KV cache of one
#   generation micro-batch (prompt + response long) and its step logits;
# - update: one training micro-batch's activations and its response-position logits (fp32 upcast and
#   gradient), plus the critic's (no vocabulary logits) and DeepSpeed's buffers;
# and, throughout, the rollout buffer: this rank's sequences and eight [responses × R] per-token tensors.
# The layout chosen is a rule, not a time model: generation dominates PPO's time, so the largest
# generation micro-batch that fits wins, then the lowest ZeRO stage (least communication), the largest
# update micro-batch, no activation checkpointing, and CPU offload only when nothing else fits.


@dataclass(frozen=True)
class RLHFLayout:
    dp: int
    zero_stage: int  # actor and critic; the frozen models are ZeRO-3-sharded when this is 3
    micro_batch: int  # responses per forward/backward (rlhf.ppo.micro_batch_size)
    generate_batch: int  # prompts decoded together (rlhf.ppo.generate_batch_size)
    checkpointing: bool = False
    frozen_offload: bool = False

    @property
    def frozen_sharded(self) -> bool:
        return self.zero_stage == 3 or self.frozen_offload

    def describe(self) -> str:
        frozen = "ref/RM in CPU" if self.frozen_offload else ("ref/RM ZeRO-3" if self.frozen_sharded else "ref/RM whole")
        ck = " ckpt" if self.checkpointing else ""
        return f"ZeRO-{self.zero_stage}{ck} {frozen}, update mb {self.micro_batch}, generate mb {self.generate_batch}"


@dataclass
class RLHFMemory:
    """Bytes per GPU at PPO's peak."""

    actor: float  # model states (parameters, gradients, optimizer state) of the actor engine
    critic: float
    reference: float  # frozen weights resident on the GPU
    reward: float
    rollout: float  # the rollout phase's extra: gathered actor (ZeRO-3), KV cache, step logits
    update: float  # the update phase's extra: activations, logits, DeepSpeed buffers
    buffer: float  # the rollout buffer (experience) of this rank
    runtime: float
    fragmentation: float

    @property
    def total(self) -> float:
        return (self.actor + self.critic + self.reference + self.reward + max(self.rollout, self.update) + self.buffer
                + self.runtime + self.fragmentation)

    def gib(self) -> dict:
        d = {f.name: getattr(self, f.name) / GiB for f in dataclasses.fields(self)}
        d["total"] = self.total / GiB
        return {k: round(v, 3) for k, v in d.items()}


@dataclass
class RLHFCandidate:
    layout: RLHFLayout
    memory: RLHFMemory
    fits: bool
    reason: str = ""

    def to_json(self, capacity_gib: float) -> dict:
        lay = self.layout
        return {"layout": lay.describe(), "zero_stage": lay.zero_stage, "micro_batch_size": lay.micro_batch,
                "generate_batch_size": lay.generate_batch, "activation_checkpointing": lay.checkpointing,
                "frozen_sharded": lay.frozen_sharded, "frozen_offload": lay.frozen_offload, "dp": lay.dp,
                "fits": self.fits, "reason": self.reason or None,
                "memory_gib": {**self.memory.gib(), "capacity": capacity_gib}}


def ppo_workload(recipe: Recipe) -> Workload:
    """PPO's training workload: sequences of prompt + response, one micro-batch at a time."""
    cfg = recipe.rlhf.ppo
    seq = cfg.max_prompt_len + cfg.max_new_tokens
    return Workload(ModelShape.from_config(recipe.model, recipe_vocab(recipe)), seq, seq, cfg.precision)


def rlhf_memory(recipe: Recipe, layout: RLHFLayout, runtime_reserve: float = RUNTIME_RESERVE) -> RLHFMemory:
    cfg = recipe.rlhf.ppo
    work = ppo_workload(recipe)
    shape, p, n = work.model, work.bytes_per_param, layout.dp
    phi = float(shape.params)
    train = memory(work, Layout(n, layout.zero_stage, layout.micro_batch, 1, layout.checkpointing))
    states = train.model_states
    # The critic's LM head is frozen (no gradient, no optimizer state); its "logits" are one value per token.
    head = shape.vocab * shape.hidden
    sp, sg, so = zero_shards(layout.zero_stage, n)
    critic = states - head * (train.grads / phi + train.optimizer / phi)
    frozen_each = 0.0 if layout.frozen_offload else p * phi / (n if layout.frozen_sharded else 1)
    if layout.frozen_sharded:  # ZeRO-3 inference gathers a layer (and what prefetch adds) per forward
        frozen_each += p * (max(shape.layer_tensors()) + min(PREFETCH_BUCKET, shape.params))
    per_rank = max(1, cfg.prompts_per_iteration // n)
    gen_batch = min(layout.generate_batch, per_rank)
    kv = 2.0 * shape.layers * shape.kv_heads * shape.head_dim * work.seq_len * gen_batch * p
    gathered = p * phi * (1 - 1 / n) if layout.zero_stage == 3 else 0.0
    step_logits = gen_batch * shape.vocab * 4.0 * 2  # the last position's logits, fp32, and the sampling copy
    prefill_logits = gen_batch * cfg.max_prompt_len * shape.vocab * p
    rollout = gathered + kv + max(step_logits, prefill_logits)
    # Update: the actor's activations + logits at response positions (low precision, fp32 upcast, gradient)
    # and DeepSpeed's buffers; the critic's pass is smaller and comes after the actor's memory is freed.
    logits = layout.micro_batch * cfg.max_new_tokens * shape.vocab * (p + 8.0)
    update = train.activations + logits + train.buffers
    R, T = cfg.max_new_tokens, work.seq_len
    buffer = per_rank * (8.0 * T + R * (3 * 8.0 + 6 * 4.0))  # ids; index, actions (int64); mask + 5 fp32 tensors
    frag = FRAGMENTATION * (max(rollout, update) + buffer)
    return RLHFMemory(states, critic, frozen_each, frozen_each, rollout, update, buffer, runtime_reserve, frag)


def _rlhf_layouts(recipe: Recipe, cl: Cluster, zero_stages: Iterable[int] | None = None) -> Iterable[RLHFLayout]:
    cfg = recipe.rlhf.ppo
    per_rank = cfg.prompts_per_iteration // cl.gpus
    stages = [s for s in (zero_stages or (0, 1, 2, 3)) if not (cfg.precision == "bf16" and s == 0)]
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b <= max(per_rank, 1)]
    for stage in stages:
        for offload in (False, True):
            for ck in (False, True):
                for mb in sizes:
                    for gb in sizes:
                        yield RLHFLayout(cl.gpus, stage, mb, gb, ck, offload)


def plan_rlhf(recipe: Recipe, cl: Cluster, zero_stages: Iterable[int] | None = None) -> list[RLHFCandidate]:
    """Every PPO layout with its memory, the chosen order (see the section comment) first, then the rest."""
    cfg = recipe.rlhf.ppo
    if cfg.prompts_per_iteration % cl.gpus:
        raise InputError(f"rlhf.ppo.prompts_per_iteration {cfg.prompts_per_iteration} does not split over "
                         f"{cl.gpus} GPUs; use a multiple of {cl.gpus}")
    capacity = cl.memory_gib * GiB
    out = []
    for lay in _rlhf_layouts(recipe, cl, zero_stages):
        mem = rlhf_memory(recipe, lay)
        fits = mem.total <= capacity
        reason = "" if fits else (f"out of memory: needs {mem.total / GiB:.1f} GiB > {cl.memory_gib:g} GiB "
                                  f"(over by {(mem.total - capacity) / GiB:.1f} GiB)")
        out.append(RLHFCandidate(lay, mem, fits, reason))
    out.sort(key=lambda c: (not c.fits, c.layout.frozen_offload, -c.layout.generate_batch, c.layout.zero_stage,
                            -c.layout.micro_batch, c.layout.checkpointing, c.memory.total))
    return out


def best_rlhf_layout(recipe: Recipe, cl: Cluster, zero_stages: Iterable[int] | None = None) -> RLHFCandidate:
    """The chosen PPO layout that fits (for `lm2 rlhf ppo --plan`); InputError (one line) when none does."""
    cands = plan_rlhf(recipe, cl, zero_stages)
    if not cands[0].fits:
        c = min(cands, key=lambda c: c.memory.total)
        raise InputError(f"no PPO layout fits on {cl.gpus} × {cl.memory_gib:g} GiB ({cl.name}): the smallest, "
                         f"{c.layout.describe()}, needs {c.memory.total / GiB:.1f} GiB per GPU; add GPUs, "
                         "shorten max_prompt_len/max_new_tokens or offload the frozen models")
    return cands[0]


def apply_rlhf_layout(recipe: Recipe, layout: RLHFLayout) -> Recipe:
    """The recipe with `layout` in its rlhf.ppo section."""
    ppo = dataclasses.replace(recipe.rlhf.ppo, zero_stage=layout.zero_stage, micro_batch_size=layout.micro_batch,
                              generate_batch_size=layout.generate_batch, frozen_offload=layout.frozen_offload,
                              activation_checkpointing=layout.checkpointing)
    return dataclasses.replace(recipe, rlhf=dataclasses.replace(recipe.rlhf, ppo=ppo))


def reward_workload(recipe: Recipe, mfu: float = 0.5) -> Workload:
    """The reward model's training: a batch is `tokens_per_batch` padded tokens (chosen + rejected rows of
    up to `seq_len`), `grad_accum` of them per rank and step, sized for the recipe's 8 GPUs."""
    cfg = recipe.rlhf.reward
    t = cfg.train
    tokens = max(t.seq_len, cfg.tokens_per_batch // t.seq_len * t.seq_len) * t.grad_accum * RECIPE_GPUS
    return Workload(ModelShape.from_config(recipe.model, recipe_vocab(recipe)), t.seq_len, tokens, t.precision, mfu)


def print_rlhf_plan(recipe: Recipe, cl: Cluster, cands: list[RLHFCandidate], top: int = 5) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if os.isatty(1) else 150)
    cfg, m = recipe.rlhf.ppo, ppo_workload(recipe).model
    console.print(f"[bold]PPO[/bold]: 4 × {m.params / 1e9:.3f}B params (actor, critic, reference, reward), "
                  f"{cfg.prompts_per_iteration} prompts/iteration × ({cfg.max_prompt_len} + {cfg.max_new_tokens}) "
                  f"tokens, {cfg.precision}; {cl.gpus} × {cl.name}, {cl.memory_gib:g} GiB", soft_wrap=True)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("#", "layout", "actor", "critic", "ref", "RM", "rollout", "update", "buffer", "total GiB"):
        table.add_column(col, justify="left" if col == "layout" else "right", no_wrap=True)
    for i, c in enumerate([c for c in cands if c.fits][:top], 1):
        g = c.memory.gib()
        table.add_row(str(i), c.layout.describe(), *(f"{g[k]:.3g}" for k in ("actor", "critic", "reference", "reward",
                                                                              "rollout", "update", "buffer", "total")))
    console.print(table)
    console.print("GiB per GPU; total = model states + frozen weights + the larger of the rollout and update "
                  "phases + buffer + runtime reserve + fragmentation", style="dim", soft_wrap=True)
    misses = [c for c in cands if not c.fits]
    if misses:
        seen, lines = set(), [f"{len(cands) - len(misses)} of {len(cands)} layouts fit; nearest misses:"]
        for c in sorted(misses, key=lambda c: c.memory.total):
            key = (c.layout.zero_stage, c.layout.frozen_offload)
            if key not in seen:
                seen.add(key)
                lines.append(f"  {c.layout.describe()}: {c.reason}")
        for line in lines:
            console.print(line, markup=False, soft_wrap=True)
