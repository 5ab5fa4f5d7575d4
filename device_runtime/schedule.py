"""Learning-rate schedules for the personalization loop: linear warmup, then cosine, linear or constant decay.

The train-step graph takes `lr` as an input on every step, so a schedule is just a number the loop feeds in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LRSchedule"]

_KINDS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """peak_lr reached after `warmup_steps`, then decayed to `min_ratio * peak_lr` at `total_steps`."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown schedule {self.kind!r}; use one of {_KINDS}")
        if not (self.peak_lr > 0 and math.isfinite(self.peak_lr)):
            raise ValueError(f"peak_lr must be a positive finite number, got {self.peak_lr}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {self.total_steps}, {self.warmup_steps}"
            )
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")

    def lr_at(self, step: int) -> float:
        """LR for the 1-based `step`."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.peak_lr * (self.min_ratio + (1.0 - self.min_ratio) * factor)
