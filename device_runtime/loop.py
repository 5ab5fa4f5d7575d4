"""The on-device personalization loop: sample buffer, replay, LR schedule, early stopping, quality and memory guards.

It drives a `Trainer` and nothing else, so it runs wherever the runtime runs (numpy + onnxruntime). One call to
`personalize`:
1. takes the user's examples (a dict of arrays, or a `SampleBuffer` the app fills), bounded to `buffer_size`;
2. holds out a share of them (or takes the evaluation data given) to judge adapters on data it did not train on;
3. refuses to start above the memory budget, and stops if the process grows past it;
4. trains on batches that mix in a replay share of base data, with warmup then cosine/linear decay, and stops
   early once the held-out score has not improved for `patience` evaluations;
5. ends on the best adapter it evaluated, or, with the quality guard, on the one it started from if training
   made it worse;
6. checkpoints every `checkpoint_every` steps and at the end.
Progress goes to callbacks, so an app (or the host CLI's progress bar) decides how to show it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from .batch import validate_batch
from .errors import BatchError, LoopConfigError, NonFiniteStepError
from .guards import MB, MONITORS, check_limit, check_memory, monitor_score, read_memory, read_rss_bytes
from .minibatches import iterate_batches, mixed_batches, num_examples, replay_count, split_holdout
from .sample_buffer import POLICIES, SampleBuffer
from .schedule import LRSchedule
from .trainer import Trainer, TrainerSnapshot

__all__ = ["STOP_REASONS", "EvaluationEvent", "LoopConfig", "LoopReport", "StepEvent", "iterate_batches",
           "personalize"]

STOP_REASONS = ("completed", "early_stopping", "cancelled", "memory_budget", "non_finite")
Arrays = Mapping[str, np.ndarray]


def _int_at_least(name: str, value: Any, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LoopConfigError(f"{name} must be an int >= {minimum}, got {value!r}; {hint}")


def _fraction(name: str, value: Any, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise LoopConfigError(f"{name} must be a number in [0, 1), got {value!r}; {hint}")


@dataclass(frozen=True)
class LoopConfig:
    """How to train. lr=None takes the bundle optimizer's lr as the peak; options default to off."""

    steps: int = 100
    batch_size: int = 32
    lr: Optional[float] = None
    warmup_steps: int = 0
    schedule: str = "cosine"
    eval_every: int = 0  # 0: evaluate only before and after
    patience: int = 0  # stop after this many evaluations without improvement; 0: never stop early
    min_delta: float = 0.0  # an evaluation improves only if it lowers the best score by more than this
    monitor: str = "loss"  # the held-out score: "loss" or "accuracy"
    restore_best: bool = True  # end on the best evaluated adapter rather than the last one
    quality_guard: bool = True  # keep the adapter from before the run if the new one scores worse
    holdout_fraction: float = 0.0  # hold out this share of the user's examples as the evaluation data
    buffer_size: Optional[int] = None  # keep at most this many user examples (None: all of them)
    buffer_policy: str = "reservoir"  # or "fifo" (the newest examples)
    replay_share: float = 0.0  # share of every batch drawn from the replay (base) data
    memory_budget_mb: Optional[float] = None  # refuse to start / stop when the process RSS is above this
    min_available_mb: Optional[float] = None  # refuse to start when the system has less RAM available
    max_nonfinite_steps: int = 3  # consecutive non-finite steps skipped before the run stops
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    checkpoint_dir: Optional[str] = None
    seed: int = 0

    def __post_init__(self) -> None:
        _int_at_least("steps", self.steps, 1, "e.g. 100")
        _int_at_least("batch_size", self.batch_size, 1, "e.g. 32")
        _int_at_least("eval_every", self.eval_every, 0, "0 evaluates only before and after")
        _int_at_least("patience", self.patience, 0, "0 never stops early; 3 is typical")
        _int_at_least("checkpoint_every", self.checkpoint_every, 0, "0 checkpoints only at the end")
        _int_at_least("max_nonfinite_steps", self.max_nonfinite_steps, 0, "3 skips a few bad batches")
        _int_at_least("seed", self.seed, 0, "any non-negative int")
        LRSchedule(1.0 if self.lr is None else self.lr, self.steps, self.warmup_steps, self.schedule)
        if self.monitor not in MONITORS:
            raise LoopConfigError(f"unknown monitor {self.monitor!r}; use one of {list(MONITORS)}")
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float)) or not (
            self.min_delta >= 0 and math.isfinite(self.min_delta)
        ):
            raise LoopConfigError(f"min_delta must be a finite number >= 0, got {self.min_delta!r}")
        if self.patience and not self.eval_every:
            raise LoopConfigError("patience counts evaluations, so it needs eval_every: pass e.g. eval_every=10 "
                                  "(--eval-every 10)")
        _fraction("holdout_fraction", self.holdout_fraction, "0.2 holds out a fifth of the examples")
        _fraction("replay_share", self.replay_share, "0.25 makes a quarter of every batch replay data")
        if self.buffer_size is not None:
            _int_at_least("buffer_size", self.buffer_size, 1, "e.g. 512, or None to keep every example")
        if self.buffer_policy not in POLICIES:
            raise LoopConfigError(f"unknown buffer_policy {self.buffer_policy!r}; use one of {list(POLICIES)}")
        check_limit("memory_budget_mb", self.memory_budget_mb)
        check_limit("min_available_mb", self.min_available_mb)
        if self.replay_share:
            replay_count(self.batch_size, self.replay_share)  # refuses a share that leaves no user examples
        if self.checkpoint_every and not self.checkpoint_dir:
            raise LoopConfigError("checkpoint_every needs checkpoint_dir: pass --checkpoint-dir DIR")


@dataclass(frozen=True)
class StepEvent:
    """One applied step, for progress callbacks (`step` counts this run's steps, 1-based)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    total_steps: int = 0


@dataclass(frozen=True)
class EvaluationEvent:
    """One periodic evaluation on the held-out data; `stale` counts evaluations since the last improvement."""

    step: int
    metrics: dict
    improved: bool
    stale: int


@dataclass
class LoopReport:
    """What a run did. `before`/`after` are held-out metrics of the adapter at the start and the one kept.

    `trained` is the last trained adapter's held-out metrics; `kept` says which adapter the trainer holds at the
    end: "final" (the last step's), "best" (an earlier evaluation's) or "previous" (the one before the run).
    """

    before: Optional[dict]
    after: Optional[dict]
    losses: list[float] = field(default_factory=list)
    evaluations: list[tuple[int, dict]] = field(default_factory=list)
    seconds: float = 0.0
    steps_run: int = 0
    skipped_steps: int = 0
    stop_reason: str = "completed"
    trained: Optional[dict] = None
    kept: str = "final"
    kept_step: int = 0
    checkpoints: list[int] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)
    memory: Optional[dict] = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (for --json and app telemetry)."""
        out = asdict(self)
        out["evaluations"] = [{"step": step, **metrics} for step, metrics in self.evaluations]
        return out


@dataclass(frozen=True)
class _Candidate:
    """An adapter the run may end on: its held-out score and metrics, and how to get it back."""

    score: float
    metrics: dict
    step: int
    snapshot: Optional[TrainerSnapshot]


def _validated(arrays: Arrays, trainer: Trainer, what: str) -> dict[str, np.ndarray]:
    """The whole data set checked against the bundle up front, so bad data fails before step 1, not at step 37."""
    num_examples(arrays, what)
    try:
        return validate_batch(arrays, trainer.bundle, with_labels=True)
    except BatchError as exc:
        raise BatchError(f"{what}: {exc}") from exc


def _user_examples(train: Union[Arrays, SampleBuffer], config: LoopConfig) -> tuple[dict[str, np.ndarray], int]:
    """The user's examples to train from (bounded by the buffer) and how many were offered."""
    if isinstance(train, SampleBuffer):
        if config.buffer_size is not None:
            raise LoopConfigError("buffer_size applies when train is a dict of arrays; a SampleBuffer is bounded "
                                  "by its own capacity, so leave buffer_size None")
        if len(train) == 0:
            raise BatchError("the sample buffer is empty; add() the user's examples before training")
        return train.arrays(), train.seen
    if not isinstance(train, Mapping):
        raise BatchError(f"train must be a dict of name -> array or a SampleBuffer, got {type(train).__name__}")
    offered = num_examples(train, "train data")
    if config.buffer_size is None:
        return dict(train), offered
    buffer = SampleBuffer(config.buffer_size, config.buffer_policy, seed=config.seed)
    buffer.add(train)
    return buffer.arrays(), offered


def _check_replay_layout(user: Arrays, replay: Arrays) -> None:
    for name, a in user.items():
        if replay[name].shape[1:] != a.shape[1:]:
            raise BatchError(f"replay data {name!r} has per-example shape {list(replay[name].shape[1:])}, the "
                             f"user's {list(a.shape[1:])}; pad both to one shape so they can share a batch")


def _check_data_options(config: LoopConfig, trainer: Trainer, evaluation: Optional[Arrays],
                        replay: Optional[Arrays]) -> None:
    if config.holdout_fraction and evaluation is not None:
        raise LoopConfigError("pass evaluation data or holdout_fraction, not both: both would be the held-out "
                              "split that early stopping and the quality guard judge on")
    if config.replay_share and replay is None:
        raise LoopConfigError("replay_share needs replay data: pass replay=<base examples> (--replay-data)")
    if replay is not None and not config.replay_share:
        raise LoopConfigError("replay data was given but replay_share is 0; pass replay_share, e.g. 0.25")
    if config.patience and evaluation is None and not config.holdout_fraction:
        raise LoopConfigError("patience needs held-out data: pass evaluation data (--eval-data) or "
                              "holdout_fraction (--holdout 0.2)")
    if config.monitor == "accuracy" and trainer.bundle.loss["name"] != "cross_entropy":
        raise LoopConfigError(f"monitor='accuracy' needs a cross-entropy bundle, this one trains with "
                              f"{trainer.bundle.loss['name']!r}; use monitor='loss'")


def personalize(
    trainer: Trainer,
    train: Union[Arrays, SampleBuffer],
    config: LoopConfig,
    evaluation: Optional[Arrays] = None,
    on_step: Optional[Callable[[StepEvent], None]] = None,
    *,
    replay: Optional[Arrays] = None,
    on_evaluation: Optional[Callable[[EvaluationEvent], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> LoopReport:
    """Run up to `config.steps` steps from wherever `trainer` stands (its step count carries on after a resume).

    `evaluation` is the held-out split (or set `holdout_fraction`); `replay` is base data mixed into every batch
    at `replay_share`. `should_stop` is polled before every step, so an app can end the run cleanly (the guards
    and the final checkpoint still run). Bad data or settings raise before the first step.
    """
    _check_data_options(config, trainer, evaluation, replay)
    user, offered = _user_examples(train, config)
    buffered = num_examples(user, "train data")
    if config.holdout_fraction:
        user, evaluation = split_holdout(user, config.holdout_fraction, np.random.default_rng([config.seed, 1]))
    user = _validated(user, trainer, "train data")
    evaluation = _validated(evaluation, trainer, "evaluation data") if evaluation is not None else None
    if replay is not None:
        replay = _validated(replay, trainer, "replay data")
        _check_replay_layout(user, replay)

    peak = config.lr if config.lr is not None else float(trainer.bundle.optimizer.lr)
    schedule = LRSchedule(peak, config.steps, config.warmup_steps, config.schedule)
    # The user stream keeps the seed's own generator, so runs without replay batch exactly as before replay existed.
    batches = mixed_batches(user, config.batch_size, np.random.default_rng(config.seed), replay,
                            config.replay_share, np.random.default_rng([config.seed, 2]))
    eval_batch = max(config.batch_size, 64)

    def evaluate() -> dict:
        return trainer.evaluate(iterate_batches(evaluation, eval_batch))

    def score(metrics: dict) -> float:
        return monitor_score(metrics, config.monitor)

    if config.memory_budget_mb is not None or config.min_available_mb is not None:
        memory = check_memory(config.memory_budget_mb, config.min_available_mb)
    else:
        memory = read_memory()
    report = LoopReport(before=evaluate() if evaluation is not None else None, after=None, memory=memory.to_dict())
    report.examples = {"offered": offered, "buffered": buffered, "train": num_examples(user),
                       "held_out": num_examples(evaluation) if evaluation is not None else 0,
                       "replay": num_examples(replay) if replay is not None else 0}
    start_step = trainer.step_count
    previous = None
    if report.before is not None and config.quality_guard:
        previous = _Candidate(score(report.before), report.before, 0, trainer.snapshot())
    best_score = score(report.before) if report.before is not None else math.inf  # what patience must beat
    best: Optional[_Candidate] = None  # the best adapter evaluated during the run (restore_best)
    stale = consecutive_bad = last_step = 0

    started = time.perf_counter()
    for i in range(1, config.steps + 1):
        if should_stop is not None and should_stop():
            report.stop_reason = "cancelled"
            break
        if config.memory_budget_mb is not None and (read_rss_bytes() or 0) > config.memory_budget_mb * MB:
            report.stop_reason = "memory_budget"
            break
        lr = schedule.lr_at(i)
        try:
            loss = trainer.step(next(batches), lr=lr)
        except NonFiniteStepError:
            # The trainer discarded the update; skip this batch, but stop if training has diverged for good.
            report.skipped_steps += 1
            consecutive_bad += 1
            if consecutive_bad > config.max_nonfinite_steps:
                report.stop_reason = "non_finite"
                break
            continue
        consecutive_bad, last_step = 0, i
        report.losses.append(loss)
        report.steps_run += 1
        if on_step is not None:
            on_step(StepEvent(i, loss, lr, float(trainer.last_grad_norm), config.steps))
        stop = False
        if config.eval_every and i % config.eval_every == 0 and i != config.steps and evaluation is not None:
            metrics = evaluate()
            report.evaluations.append((i, metrics))
            now = score(metrics)
            improved = now < best_score - config.min_delta
            best_score, stale = (now, 0) if improved else (best_score, stale + 1)
            if config.restore_best and (best is None or now < best.score):
                best = _Candidate(now, metrics, i, trainer.snapshot())
            if on_evaluation is not None:
                on_evaluation(EvaluationEvent(i, metrics, improved, stale))
            stop = bool(config.patience) and stale >= config.patience
        if config.checkpoint_every and i % config.checkpoint_every == 0:
            trainer.save_checkpoint(Path(config.checkpoint_dir))
            report.checkpoints.append(trainer.step_count)
        if stop:
            report.stop_reason = "early_stopping"
            break
    report.seconds = time.perf_counter() - started

    if evaluation is not None and trainer.step_count == start_step:  # nothing was applied: nothing to judge
        report.after, report.kept = report.before, "previous"
    elif evaluation is not None:
        report.trained = evaluate()
        chosen = _Candidate(score(report.trained), report.trained, last_step, None)
        chosen_name = "final"
        if best is not None and best.score < chosen.score:
            chosen, chosen_name = best, "best"
        if previous is not None and previous.score < chosen.score:
            chosen, chosen_name = previous, "previous"
        if chosen.snapshot is not None:
            trainer.restore(chosen.snapshot)
        report.after, report.kept, report.kept_step = chosen.metrics, chosen_name, chosen.step
    else:
        report.kept_step = last_step
    if config.checkpoint_dir:
        trainer.save_checkpoint(Path(config.checkpoint_dir))
        report.checkpoints.append(trainer.step_count)
    return report
