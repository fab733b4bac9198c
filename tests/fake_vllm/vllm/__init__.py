"""A test-only stand-in for vLLM's offline API; NOT vLLM. tests/test_rlhf_vllm.py puts tests/fake_vllm on
sys.path so that `import vllm` finds this, on a CPU machine where vLLM cannot be installed.

It implements only the surface lm2's `align/rollout.VllmRollout` touches, and implements it the way vLLM
does (v0.10/0.11, V1 engine; files named per item), not the way that would suit lm2:

* `LLM(model, *, skip_tokenizer_init, trust_remote_code, dtype, seed, gpu_memory_utilization,
  enable_sleep_mode, **engine_args)`; engine arguments outside the few known here are a TypeError, as
  EngineArgs(**kwargs) makes them. The HF config is read with `AutoConfig.from_pretrained(model,
  trust_remote_code=...)` (an `internlm2` folder fails without trust_remote_code, as in vLLM);
  `load_format="dummy"` builds the model from the config with weights drawn from U(-1e-3, 1e-3)
  (model_loader's `initialize_dummy_weights`), otherwise the folder's weights are loaded; a
  `max_model_len` above the config's context is a ValueError; without `skip_tokenizer_init` the folder
  must hold a tokenizer (vLLM loads one).
* `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(iterable of (name,
  tensor))`: vLLM's `InternLM2ForCausalLM.load_weights` (model_executor/models/internlm2.py): checkpoint
  names, `rotary_emb.inv_freq` skipped, an unknown name is a KeyError, shapes must match
  (`default_weight_loader`'s assert), the tensor is copied into the parameter.
* `SamplingParams`: the fields lm2 sets, validated as sampling_params.py does (temperature in [0, 2],
  top_p in (0, 1], top_k 0 or -1 = off, max_tokens >= 1, seed -1 = None).
* `generate(prompts, sampling_params, use_tqdm=...)`: token-id prompts (`vllm.inputs.TokensPrompt`), one
  params object or one per prompt; a request with a seed samples from its own generator. Stops as
  `update_from_generation_config` + V1's `check_stop` (v1/core/sched/utils.py): generation_config.json's
  eos ids join `stop_token_ids`; the model's EOS is the tokenizer's (None without one); after each token,
  max_tokens / max_model_len first ("length"), then EOS ("stop", stop_reason None), then stop_token_ids
  ("stop", stop_reason = the id); the sampled stop token stays in `token_ids`. The test-only switch
  `drop_stop_token_ids` leaves it out instead, which vLLM does not do, to check that lm2 does not depend on it.
* `sleep(level)` / `wake_up()` (sleep mode must be enabled): a sleeping engine neither generates nor
  takes weights (its weight memory is released); level 1 keeps the weights (vLLM parks them in host
  memory), level 2 loses them. `reset_prefix_cache()`: generating after a weight load or a sleep without
  a reset could hit prefix blocks computed under other weights (or freed); real vLLM would silently
  reuse them, this stand-in refuses.

Decoding is a plain transformers forward per token on CPU: no paged attention, no batching.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .inputs import TokensPrompt
from .outputs import CompletionOutput, RequestOutput

__version__ = "0.10.2+lm2.test.stand.in"

_ENGINE_ARGS = {"max_model_len", "load_format", "distributed_executor_backend", "enable_prefix_caching",
                "enforce_eager", "max_num_seqs"}
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "half": torch.float16}
ENGINES: list["LLM"] = []  # every LLM built in this process, for the tests to inspect


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop_token_ids: Optional[list] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    detokenize: bool = True

    def __post_init__(self):
        if self.seed == -1:
            self.seed = None
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        if self.n != 1:
            raise NotImplementedError("stand-in: n > 1")
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 2.0):
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not all(isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must contain only integers, got {self.stop_token_ids}.")


class _Model:
    """What `model_runner.model` is for the methods lm2 calls: vLLM's InternLM2ForCausalLM.load_weights."""

    def __init__(self, hf, llm: "LLM"):
        self.hf, self._llm = hf, llm
        self.pushes: list[list[str]] = []  # names per load_weights call

    def named_parameters(self):
        return self.hf.named_parameters()

    def load_weights(self, weights) -> set:
        if self._llm.sleeping:
            raise RuntimeError("stand-in: load_weights on a sleeping engine (its weight memory is released)")
        params = dict(self.hf.named_parameters())
        loaded: set = set()
        names: list[str] = []
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            param = params[name]  # vLLM: KeyError for a name the model does not have
            assert param.size() == tensor.size(), f"{name}: {tuple(tensor.shape)} into {tuple(param.shape)}"
            param.data.copy_(tensor)
            loaded.add(name)
            names.append(name)
        self.pushes.append(names)
        self._llm._weights_version += 1
        return loaded


class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class LLM:
    drop_stop_token_ids = False  # test-only: leave a sampled stop token out of token_ids (vLLM keeps it)

    def __init__(self, model: str, *, tokenizer: Optional[str] = None, skip_tokenizer_init: bool = False,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.9, enable_sleep_mode: bool = False, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        unknown = sorted(set(kwargs) - _ENGINE_ARGS)
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"GPU memory utilization must be within (0, 1]. Got {gpu_memory_utilization}.")
        if tensor_parallel_size != 1:
            raise NotImplementedError("stand-in: tensor_parallel_size 1 only")
        self.init_kwargs = dict(model=model, tokenizer=tokenizer, skip_tokenizer_init=skip_tokenizer_init,
                                trust_remote_code=trust_remote_code, dtype=dtype, seed=seed,
                                gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode,
                                **kwargs)
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        torch_dtype = _DTYPES[dtype] if dtype != "auto" else getattr(config, "torch_dtype", None) or torch.float32
        rope = getattr(config, "rope_scaling", None) or {}
        derived = int(config.max_position_embeddings * float(rope.get("factor", 1.0)))
        self.max_model_len = kwargs.get("max_model_len") or derived
        if self.max_model_len > derived:
            raise ValueError(f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                             f"max_model_len ({derived})")
        if kwargs.get("load_format", "auto") == "dummy":
            hf = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code).to(torch_dtype)
            with torch.no_grad():
                for p in hf.parameters():
                    p.uniform_(-1e-3, 1e-3)
        else:
            hf = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code, dtype=torch_dtype)
        hf.eval().requires_grad_(False)
        self.eos_token_id = None  # vLLM: None without a tokenizer ("Using None for EOS token id")
        if not skip_tokenizer_init:
            self.eos_token_id = AutoTokenizer.from_pretrained(tokenizer or model,
                                                              trust_remote_code=trust_remote_code).eos_token_id
        gen_file = Path(model) / "generation_config.json"
        eos = json.loads(gen_file.read_text()).get("eos_token_id") if gen_file.is_file() else None
        self.generation_eos = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        self.enable_sleep_mode = enable_sleep_mode
        self.sleeping = 0  # 0 awake, else the level
        self.prefix_cache_resets = 0
        self._weights_version = self._cache_version = 0
        self._rng = torch.Generator().manual_seed(seed)
        self.requests: list[tuple[list[int], SamplingParams]] = []
        runner = _Obj(model=_Model(hf, self))
        self.llm_engine = _Obj(model_executor=_Obj(driver_worker=_Obj(model_runner=runner)))
        ENGINES.append(self)

    # -- sleep mode ------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        assert self.enable_sleep_mode, "Sleep mode is not enabled in the model config"
        if level == 2:
            with torch.no_grad():
                for p in self.llm_engine.model_executor.driver_worker.model_runner.model.hf.parameters():
                    p.fill_(float("nan"))
        self.sleeping = level
        self._cache_version = -1  # the KV blocks are freed but the prefix cache's block table is not reset

    def wake_up(self, tags: Optional[list] = None) -> None:
        self.sleeping = 0

    def reset_prefix_cache(self) -> bool:
        self.prefix_cache_resets += 1
        self._cache_version = self._weights_version
        return True

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = True, lora_request=None):
        if self.sleeping:
            raise RuntimeError("stand-in: generate on a sleeping engine")
        if self._cache_version != self._weights_version:
            raise RuntimeError("stand-in: the prefix cache is stale (weights loaded or engine slept since the last "
                               "reset_prefix_cache())")
        prompts = prompts if isinstance(prompts, list) else [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        outs = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt:
                raise ValueError("stand-in: token-id prompts only (a text prompt needs a tokenizer)")
            ids = [int(t) for t in prompt["prompt_token_ids"]]
            self.requests.append((ids, sp))
            outs.append(self._one(str(i), ids, sp))
        return outs

    def _one(self, request_id: str, prompt: list[int], sp: SamplingParams) -> RequestOutput:
        hf = self.llm_engine.model_executor.driver_worker.model_runner.model.hf
        stop_ids = list(sp.stop_token_ids)
        if not sp.ignore_eos:  # update_from_generation_config
            stop_ids += [t for t in self.generation_eos if t != self.eos_token_id and t not in stop_ids]
        gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else self._rng
        out: list[int] = []
        finish, reason = None, None
        with torch.no_grad():
            while finish is None:
                logits = hf(input_ids=torch.tensor([prompt + out])).logits[0, -1].float()
                tok = _sample(logits, sp, gen)
                out.append(tok)
                if len(prompt) + len(out) >= self.max_model_len or (sp.max_tokens and len(out) >= sp.max_tokens):
                    finish = "length"
                elif not sp.ignore_eos and tok == self.eos_token_id:
                    finish = "stop"
                elif tok in stop_ids:
                    finish, reason = "stop", tok
        token_ids = out[:-1] if finish == "stop" and self.drop_stop_token_ids else out
        return RequestOutput(request_id, None, prompt, [CompletionOutput(0, "", token_ids, None, None, finish, reason)],
                             True)


def _sample(logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator) -> int:
    if sp.temperature < 1e-5:
        return int(logits.argmax())
    logits = logits / sp.temperature
    if sp.top_k > 0:
        kth = torch.topk(logits, min(sp.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if sp.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
        drop = probs.cumsum(-1) - probs > sp.top_p  # keep the smallest prefix whose mass reaches top_p
        logits[order[drop]] = -math.inf
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


__all__ = ["ENGINES", "LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "TokensPrompt"]
