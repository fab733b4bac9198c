"""Where PPO's responses come from: a rollout backend behind one small protocol.

    with backend.phase(actor_engine):            # once per iteration: the actor's current weights ready
        responses = backend.generate(prompts, seed)   # any number of micro-batches

`Lm2Rollout` (the default) decodes with lm2's own `generate` (KV cache, top-p/top-k, stop tokens kept as
the last action). Under ZeRO-3 the actor's parameters are gathered *once per rollout phase* and
DeepSpeed's per-module gather hooks are lifted for its duration (`unwrap_model_for_generation`), so
decoding runs on whole weights instead of re-gathering every layer for every token; ZeRO 0–2 actors are
whole already. A serving engine (vLLM, as OpenRLHF does) fits the same protocol: `phase` pushes the
actor's weights to it, `generate` samples; the PPO loop never branches on the backend.

Sampling is seeded per call, so a prompt's response depends on the micro-batch it is decoded in and
that micro-batch's seed, never on which rank decodes it: the PPO loop cuts the iteration's prompts into
the same micro-batches whatever the number of ranks.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Protocol, Sequence

from ..errors import InputError


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


def rollout_backend(cfg, tok) -> RolloutBackend:
    """The backend `rlhf.ppo.rollout_backend` names."""
    if cfg.rollout_backend == "lm2":
        return Lm2Rollout(cfg, tok.stop_ids, tok.pad_id)
    raise InputError(f"rlhf.ppo.rollout_backend {cfg.rollout_backend!r}: only `lm2` is available in this build "
                     "(a serving engine plugs in through align/rollout.RolloutBackend)")
