"""Learning-rate schedules for the personalization loop: linear warmup, then cosine, linear or constant decay.

The train-step graph takes `lr` as an input on every step, so a schedule is just a number the loop feeds in.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .errors import LoopConfigError

__all__ = ["SCHEDULES", "LRSchedule"]

SCHEDULES = ("cosine", "linear", "constant")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LRSchedule:
    """peak_lr reached after `warmup_steps`, then decayed to `min_ratio * peak_lr` at `total_steps`."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise LoopConfigError(f"unknown schedule {self.kind!r}; use one of {list(SCHEDULES)}")
        if isinstance(self.peak_lr, bool) or not isinstance(self.peak_lr, numbers.Real) or not (
            self.peak_lr > 0 and math.isfinite(self.peak_lr)
        ):
            raise LoopConfigError(f"peak lr must be a positive finite number, got {self.peak_lr!r}; try 1e-3")
        if not _is_int(self.total_steps) or self.total_steps < 1:
            raise LoopConfigError(f"total_steps must be an int >= 1, got {self.total_steps!r}")
        if not _is_int(self.warmup_steps) or not 0 <= self.warmup_steps <= self.total_steps:
            raise LoopConfigError(
                f"warmup_steps must be an int in [0, total_steps={self.total_steps}], got {self.warmup_steps!r}; "
                "a tenth of the steps is typical"
            )
        if not isinstance(self.min_ratio, numbers.Real) or not 0.0 <= self.min_ratio <= 1.0:
            raise LoopConfigError(f"min_ratio must be in [0, 1], got {self.min_ratio}; 0.0 decays to zero")

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
