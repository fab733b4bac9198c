"""The learning-rate schedule of every stage: linear warmup, then cosine decay to `min_lr_ratio` of peak.

InternLM2 decays to 10% of peak (SPEC §5.1). The schedule is a multiplier on the optimizer's peak LR,
wrapped in a `LambdaLR` that DeepSpeed steps once per optimizer step and saves in its checkpoint; its
fields are plain numbers, so its state round-trips through `state_dict()` without pickling code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class WarmupCosine:
    """LR multiplier for optimizer step `step` (0-based): (step+1)/warmup during warmup, then a cosine from
    1 down to `min_ratio`, reached exactly at the last step."""

    total_steps: int
    warmup_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps - 1
        progress = min(1.0, (step - self.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """At least one warmup step whenever a warmup is asked for (1% of 300 steps is 3, of 50 it is 1)."""
    return max(1, round(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0


def schedule(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> WarmupCosine:
    return WarmupCosine(total_steps, warmup_steps(total_steps, warmup_ratio), min_lr_ratio)


def lr_scheduler(optimizer: torch.optim.Optimizer, fn: WarmupCosine) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
