"""The on-device personalization loop: shuffled mini-batches, an LR schedule, periodic evaluation and checkpoints.

It drives a `Trainer` and nothing else, so it runs wherever the runtime runs (numpy + onnxruntime). Progress goes to
an optional callback so an app (or the host CLI's progress bar) decides how to show it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from .errors import BatchError
from .schedule import LRSchedule

__all__ = ["LoopConfig", "LoopReport", "StepEvent", "iterate_batches", "personalize"]


@dataclass(frozen=True)
class LoopConfig:
    """How long and how to train. lr=None takes the bundle optimizer's lr as the peak."""

    steps: int = 100
    batch_size: int = 32
    lr: float | None = None
    warmup_steps: int = 0
    schedule: str = "cosine"
    eval_every: int = 0  # 0: evaluate only before and after
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    checkpoint_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs checkpoint_dir: pass --checkpoint-dir DIR")


@dataclass(frozen=True)
class StepEvent:
    step: int
    loss: float
    lr: float
    grad_norm: float


@dataclass
class LoopReport:
    before: dict | None
    after: dict | None
    losses: list[float] = field(default_factory=list)
    evaluations: list[tuple[int, dict]] = field(default_factory=list)
    seconds: float = 0.0


def _num_examples(arrays: Mapping[str, np.ndarray]) -> int:
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise BatchError(f"data arrays must all have the same number of examples, got {sizes}")
    (n,) = set(sizes.values())
    if n == 0:
        raise BatchError("the data has no examples")
    return n


def iterate_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Endless mini-batches over shuffled epochs (rng given) or one ordered pass (rng None)."""
    n = _num_examples(arrays)
    while True:
        order = rng.permutation(n) if rng is not None else np.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield {name: a[idx] for name, a in arrays.items()}
        if rng is None:
            return


def personalize(
    trainer,
    train: Mapping[str, np.ndarray],
    config: LoopConfig,
    evaluation: Mapping[str, np.ndarray] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
) -> LoopReport:
    """Train `config.steps` steps from wherever `trainer` stands (its step count carries on after a resume)."""
    peak = config.lr if config.lr is not None else float(trainer.bundle.optimizer.lr)
    schedule = LRSchedule(peak, config.steps, config.warmup_steps, config.schedule)
    rng = np.random.default_rng(config.seed)
    batches = iterate_batches(train, config.batch_size, rng)

    def evaluate() -> dict | None:
        if evaluation is None:
            return None
        return trainer.evaluate(iterate_batches(evaluation, max(config.batch_size, 64)))

    report = LoopReport(before=evaluate(), after=None)
    started = time.perf_counter()
    for i in range(1, config.steps + 1):
        lr = schedule.lr_at(i)
        loss = trainer.step(next(batches), lr=lr)
        report.losses.append(loss)
        if on_step is not None:
            on_step(StepEvent(i, loss, lr, float(trainer.last_grad_norm)))
        if config.eval_every and i % config.eval_every == 0 and i != config.steps and evaluation is not None:
            report.evaluations.append((i, evaluate()))
        if config.checkpoint_every and i % config.checkpoint_every == 0:
            trainer.save_checkpoint(Path(config.checkpoint_dir))
    report.seconds = time.perf_counter() - started
    report.after = evaluate()
    if config.checkpoint_dir:
        trainer.save_checkpoint(Path(config.checkpoint_dir))
    return report
