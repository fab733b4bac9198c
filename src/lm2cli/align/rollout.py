"""Where PPO's responses come from: a rollout backend behind one small protocol.

    with backend.phase(actor_engine):            # once per iteration: the actor's current weights ready
        responses = backend.generate(prompts, seed)   # any number of micro-batches

`Lm2Rollout` (the default) decodes with lm2's own `generate` (KV cache, top-p/top-k, stop tokens kept as
the last action). Under ZeRO-3 the actor's parameters are gathered *once per rollout phase* and
DeepSpeed's per-module gather hooks are lifted for its duration (`unwrap_model_for_generation`), so
decoding runs on whole weights instead of re-gathering every layer for every token; ZeRO 0–2 actors are
whole already. A serving engine (vLLM, as OpenRLHF does) fits the same protocol: `phase` pushes the
actor's weights to it, `generate` samples; the PPO loop never branches on the backend. `VllmRollout`
(`rlhf.ppo.rollout_backend: vllm`) is that: see its docstring.

Sampling is seeded per call, so a prompt's response depends on the micro-batch it is decoded in and
that micro-batch's seed, never on which rank decodes it: the PPO loop cuts the iteration's prompts into
the same micro-batches whatever the number of ranks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import ContextManager, Iterator, Protocol, Sequence

from ..errors import InputError, Lm2Error

VLLM_INSTALL = "pip install 'lm2[vllm]'"


class RolloutBackend(Protocol):
    def phase(self, actor_engine) -> ContextManager[None]:
        """The actor's current weights are what `generate` samples from inside this block."""

    def generate(self, prompts: Sequence[Sequence[int]], seed: int) -> list[list[int]]:
        """New tokens per prompt, in order; a stop token, when sampled, is the last one."""


class Lm2Rollout:
    """lm2's `generate` on the actor itself (gathered once per phase under ZeRO-3)."""

    def __init__(self, cfg, stop_ids, pad_id: int):
        self.cfg, self.stop_ids, self.pad_id = cfg, tuple(stop_ids), pad_id
        self._module = None

    @contextlib.contextmanager
    def phase(self, actor_engine) -> Iterator[None]:
        ds = actor_engine.ds
        module = actor_engine.module
        was_training = module.training
        module.eval()
        try:
            if actor_engine.zero_stage == 3:
                from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

                with unwrap_model_for_generation(ds):
                    self._module = module
                    yield
            else:
                self._module = module
                yield
        finally:
            self._module = None
            module.train(was_training)

    def generate(self, prompts: Sequence[Sequence[int]], seed: int) -> list[list[int]]:
        from ..generate import generate

        if self._module is None:
            raise RuntimeError("Lm2Rollout.generate outside a rollout phase")
        c = self.cfg
        return generate(self._module, prompts, c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                        top_k=c.top_k, stop_ids=self.stop_ids, seed=seed, batch_size=max(1, len(prompts)),
                        pad_id=self.pad_id, include_stop=True)


class VllmRollout:
    """vLLM samples the rollouts from its own copy of the actor, in the same process and on the same GPU
    (colocated, as TRL's GRPO `vllm_mode="colocate"` and verl's hybrid engine); every rank has its engine.

    * First phase: a rank-local temporary HF InternLM2 folder holds the actor's config.json (convert.py's
      `internlm2_config`, with lm2's shipped configuration/modeling code for `trust_remote_code`) and
      generation_config.json, *no weights*; `vllm.LLM` is built on it with `load_format="dummy"` (random
      weights: nothing is written to disk or read back, as verl does) under `distributed_executor_backend=
      "external_launcher"` (each rank its own engine inside the existing process group) and in-process
      (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), which is what makes the model object reachable below.
    * Every phase, the first included: wake the engine (sleep mode), stream the actor's parameters into
      vLLM's model by name, `model.load_weights(iter of (name, tensor))`, then `reset_prefix_cache()`
      (cached KV was computed with the old weights). lm2's parameter names and layouts *are* the released
      InternLM2 ones (convert.py writes the internlm2 folder's state dict unchanged, fused `wqkv` rows
      `(kv group, q_per_kv + 2 slots, head_dim)` included), which is the checkpoint vLLM's
      `InternLM2ForCausalLM.load_weights` reads (it stacks w1/w3 itself and splits wqkv at run time): no
      renaming and no fused copy. Tensors go one at a time; under ZeRO-3 each is gathered just while vLLM
      copies it, so no rank holds a gathered actor beside vLLM's copy. After the phase the engine sleeps (level 1:
      KV cache freed, weights parked in host memory) so the training engines get the GPU memory back.
    * `generate`: token-id prompts, one `SamplingParams` per prompt with lm2's temperature, top-p, top-k
      (0 = off is vLLM's -1, which every version accepts), max_new_tokens, the tokenizer's stop ids and
      seed `seed + i`. vLLM's seeds are per request, so prompt i of the iteration (micro-batch start +
      position) draws from its own stream: the responses depend neither on the rank count nor on
      `generate_batch_size`. A sampled stop token ends the response as its last token (`response_ids`).

    Reached through `llm.llm_engine.model_executor.driver_worker.model_runner.model`, the path TRL's
    colocate mode uses (vLLM V0, and V1 with the engine in-process). Not run on a real vLLM here (no CUDA
    GPU): tests/test_rlhf_vllm.py runs it against a stand-in of the same API over transformers.
    """

    def __init__(self, cfg, stop_ids, eos_id: int):
        self.cfg, self.stop_ids, self.eos_id = cfg, tuple(stop_ids), eos_id
        self.llm = None
        self.folder: Path | None = None

    @contextlib.contextmanager
    def phase(self, actor_engine) -> Iterator[None]:
        if self.llm is None:
            self.llm = self._start(actor_engine.module.config)
        elif self.cfg.vllm_sleep:
            self.llm.wake_up()
        try:
            self._model().load_weights(actor_weights(actor_engine))
            self.llm.reset_prefix_cache()
            yield
        finally:
            if self.cfg.vllm_sleep:
                self.llm.sleep(level=1)

    def generate(self, prompts: Sequence[Sequence[int]], seed: int) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise RuntimeError("VllmRollout.generate outside a rollout phase")
        c = self.cfg
        params = [SamplingParams(n=1, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k or -1,
                                 max_tokens=c.max_new_tokens, stop_token_ids=list(self.stop_ids),
                                 seed=(seed + i) % 2**63, detokenize=False) for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [response_ids(o.outputs[0], self.stop_ids, self.eos_id) for o in outs]

    def _start(self, model_config):
        import vllm

        c = self.cfg
        if c.vllm_sleep and not hasattr(vllm.LLM, "sleep"):
            raise InputError(f"vLLM {vllm.__version__} has no sleep mode; upgrade vLLM or set "
                             "rlhf.ppo.vllm_sleep=false")
        self.folder = Path(tempfile.mkdtemp(prefix=f"lm2-vllm-rank{os.environ.get('RANK', '0')}-"))
        weakref.finalize(self, shutil.rmtree, self.folder, True)
        write_hf_config(model_config, self.folder, self.stop_ids, vllm_dtype(c))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its model is reachable
        return vllm.LLM(model=str(self.folder), dtype=vllm_dtype(c), seed=c.seed, trust_remote_code=True,
                        gpu_memory_utilization=c.vllm_gpu_memory_utilization, enable_sleep_mode=c.vllm_sleep,
                        max_model_len=c.max_prompt_len + c.max_new_tokens, load_format="dummy",
                        skip_tokenizer_init=True, distributed_executor_backend="external_launcher")

    def _model(self):
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            import vllm

            raise InputError(f"vLLM {vllm.__version__} keeps its model out of this process "
                             "(no llm.llm_engine.model_executor.driver_worker.model_runner.model); the colocated "
                             "rollout needs vLLM >= 0.8 with VLLM_ENABLE_V1_MULTIPROCESSING=0") from None


def vllm_dtype(cfg) -> str:
    """`rlhf.ppo.vllm_dtype`; auto = the actor's precision."""
    if cfg.vllm_dtype != "auto":
        return cfg.vllm_dtype
    return "bfloat16" if cfg.precision == "bf16" else "float32"


def write_hf_config(model_config, folder: Path, stop_ids, dtype: str) -> None:
    """The HF InternLM2 folder vLLM builds its model from, without weights: config.json (convert.py's
    `internlm2_config`, YaRN refused there), lm2's configuration/modeling code and generation_config.json."""
    import torch

    from ..convert import internlm2_config, write_model_files

    write_model_files(folder, internlm2_config(model_config, getattr(torch, dtype)), model_config, stop_ids)


def actor_weights(actor_engine) -> Iterator[tuple]:
    """(name, tensor) for every actor parameter, one at a time; under ZeRO-3 each is gathered only until
    the consumer asks for the next (collective: every rank walks the same order)."""
    from .frozen import whole_tensor

    for name, p in actor_engine.module.named_parameters():
        with whole_tensor(p):
            yield name, p.detach()


def response_ids(output, stop_ids, eos_id: int) -> list[int]:
    """A vLLM `CompletionOutput` as the protocol's response: the sampled tokens, a stop token (when one was
    sampled) last. vLLM keeps a sampled stop token in `token_ids` (V1's `check_stop` stops *after* appending
    it; `stop_reason` is the id for `stop_token_ids`, None for the model's EOS), and a stop sampled as the
    max_tokens-th token finishes as "length" with the token kept. Should a version leave the stop token out
    of `token_ids`, `finish_reason == "stop"` puts it back, so PPO scores the action that was sampled."""
    ids = list(output.token_ids)
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i + 1]
    if output.finish_reason == "stop":
        return ids + [output.stop_reason if isinstance(output.stop_reason, int) else eos_id]
    if output.finish_reason != "length":
        raise Lm2Error(f"vLLM finished a rollout with {output.finish_reason!r} (expected stop or length)")
    return ids


def require_backend(cfg) -> None:
    """Refuse, before any model is built (`rlhf ppo`, `rlhf online`, `--dry-run`), a backend this machine
    cannot run."""
    if cfg.rollout_backend != "vllm":
        return
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise InputError(f"rlhf.ppo.rollout_backend vllm needs vLLM ({e}); install it on a CUDA machine with "
                         f"{VLLM_INSTALL}, or use rollout_backend lm2") from None


def rollout_backend(cfg, tok) -> RolloutBackend:
    """The backend `rlhf.ppo.rollout_backend` names (checked up front by `require_backend`)."""
    if cfg.rollout_backend == "vllm":
        return VllmRollout(cfg, tok.stop_ids, tok.eos_id)
    return Lm2Rollout(cfg, tok.stop_ids, tok.pad_id)
