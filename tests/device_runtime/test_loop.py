"""The personalization loop on a handmade bundle: batching, schedule, buffer, replay, early stopping, guards, checkpoints.

The task is learnable on purpose (labels come from a teacher classifier of the same form as the bundle's), so
"training helps" and "training hurts" (labels shifted by one class) can both be produced on demand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from .handmade_bundle import Handmade
from .handmade_bundle import teacher_task as task

import device_runtime.guards as guards_module
import device_runtime.loop as loop_module
from device_runtime import (
    BatchError,
    LoopConfig,
    LoopConfigError,
    MemoryBudgetError,
    SampleBuffer,
    Trainer,
    load_checkpoint,
    personalize,
)
from device_runtime.loop import EvaluationEvent, StepEvent, iterate_batches
from device_runtime.schedule import LRSchedule


def same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- configuration ----
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, r"steps must be an int >= 1, got 0"),
        ({"batch_size": 2.5}, r"batch_size must be an int >= 1, got 2\.5"),
        ({"warmup_steps": 200}, r"warmup_steps must be an int in \[0, total_steps=100\], got 200"),
        ({"schedule": "step"}, r"unknown schedule 'step'"),
        ({"lr": -1.0}, r"peak lr must be a positive finite number, got -1\.0"),
        ({"lr": float("nan")}, r"peak lr must be a positive finite number"),
        ({"patience": 3}, r"patience counts evaluations, so it needs eval_every"),
        ({"monitor": "f1"}, r"unknown monitor 'f1'"),
        ({"min_delta": -0.1}, r"min_delta must be a finite number >= 0"),
        ({"holdout_fraction": 1.0}, r"holdout_fraction must be a number in \[0, 1\), got 1\.0"),
        ({"replay_share": -0.5}, r"replay_share must be a number in \[0, 1\)"),
        ({"replay_share": 0.5, "batch_size": 1}, r"replay_share 0\.5 of batch_size 1 leaves no room"),
        ({"buffer_size": 0}, r"buffer_size must be an int >= 1, got 0"),
        ({"buffer_policy": "lifo"}, r"unknown buffer_policy 'lifo'; use one of \['reservoir', 'fifo'\]"),
        ({"memory_budget_mb": 0}, r"memory_budget_mb must be a positive number of megabytes"),
        ({"min_available_mb": float("inf")}, r"min_available_mb must be a positive number"),
        ({"max_nonfinite_steps": -1}, r"max_nonfinite_steps must be an int >= 0"),
        ({"checkpoint_every": 5}, r"checkpoint_every needs checkpoint_dir"),
        ({"steps": True}, r"steps must be an int >= 1, got True"),
    ],
)
def test_config_errors_are_ours_and_name_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(LoopConfigError, match=message) as info:
        LoopConfig(**kwargs)
    assert isinstance(info.value, ValueError)  # callers that caught ValueError before keep working


def test_schedule_values() -> None:
    cosine = LRSchedule(1.0, total_steps=10, warmup_steps=2)
    assert [cosine.lr_at(s) for s in (1, 2)] == [0.5, 1.0]
    assert cosine.lr_at(6) == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert cosine.lr_at(10) == pytest.approx(0.0, abs=1e-12)
    linear = LRSchedule(0.1, total_steps=5, kind="linear", min_ratio=0.5)
    assert [round(linear.lr_at(s), 6) for s in range(1, 6)] == [0.09, 0.08, 0.07, 0.06, 0.05]
    assert LRSchedule(0.3, 4, 1, "constant").lr_at(3) == 0.3


def test_data_options_that_contradict_are_refused(sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    data = task(sgd_bundle, 20, 1)
    cases = [
        (LoopConfig(holdout_fraction=0.2), {"evaluation": data}, "evaluation data or holdout_fraction, not both"),
        (LoopConfig(replay_share=0.25), {}, "replay_share needs replay data"),
        (LoopConfig(), {"replay": data}, "replay data was given but replay_share is 0"),
        (LoopConfig(patience=2, eval_every=5), {}, "patience needs held-out data"),
        (LoopConfig(buffer_size=5), {"train": SampleBuffer(5)}, "a SampleBuffer is bounded by its own capacity"),
    ]
    for config, kwargs, message in cases:
        with pytest.raises(LoopConfigError, match=message):
            personalize(tr, kwargs.pop("train", data), config, **kwargs)
    assert tr.step_count == 0


def test_bad_data_fails_before_the_first_step(sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    good = task(sgd_bundle, 20, 1)
    with pytest.raises(BatchError, match=r"^train data: batch is missing \['labels'\]"):
        personalize(tr, {"x": good["x"]}, LoopConfig(steps=3))
    with pytest.raises(BatchError, match=r"^evaluation data: labels 'labels' hold 1 value\(s\) outside \[0, 3\)"):
        personalize(tr, good, LoopConfig(steps=3), evaluation={**good, "labels": np.r_[good["labels"][:-1], 7]})
    with pytest.raises(BatchError, match=r"replay data: input 'x' holds NaN or Inf"):
        personalize(tr, good, LoopConfig(steps=3, replay_share=0.25),
                    replay={**good, "x": np.full_like(good["x"], np.nan)})
    with pytest.raises(BatchError, match=r"train data arrays must all have the same number of examples"):
        personalize(tr, {"x": good["x"], "labels": good["labels"][:5]}, LoopConfig(steps=3))
    with pytest.raises(BatchError, match=r"the sample buffer is empty"):
        personalize(tr, SampleBuffer(4), LoopConfig(steps=3))
    assert tr.step_count == 0


# ---- training ----
def test_plain_run_matches_a_hand_written_loop(adamw_bundle: Handmade) -> None:
    """Without the new options the loop is shuffled batches + schedule, as before (the quickstart relies on it)."""
    data = task(adamw_bundle, 50, 2)
    config = LoopConfig(steps=12, batch_size=8, lr=0.05, warmup_steps=3, seed=4)
    tr = Trainer.open(adamw_bundle.bundle.path, threads=1)
    events: list[StepEvent] = []
    report = personalize(tr, data, config, on_step=events.append)

    reference = Trainer.open(adamw_bundle.bundle.path, threads=1)
    schedule = LRSchedule(0.05, 12, 3, "cosine")
    batches = iterate_batches(data, 8, np.random.default_rng(4))
    expected = [reference.step(next(batches), lr=schedule.lr_at(i)) for i in range(1, 13)]
    assert report.losses == expected
    assert same_state(tr.trainable_state(), reference.trainable_state())
    assert [e.step for e in events] == list(range(1, 13))
    assert [e.lr for e in events] == pytest.approx([schedule.lr_at(i) for i in range(1, 13)])
    assert events[-1].total_steps == 12 and events[0].grad_norm > 0
    assert (report.stop_reason, report.steps_run, report.skipped_steps, report.kept) == ("completed", 12, 0, "final")
    assert report.before is None and report.after is None
    assert report.examples == {"offered": 50, "buffered": 50, "train": 50, "held_out": 0, "replay": 0}


def test_training_on_the_task_improves_held_out_metrics(adamw_bundle: Handmade) -> None:
    tr = Trainer.open(adamw_bundle.bundle.path)
    report = personalize(tr, task(adamw_bundle, 200, 3), LoopConfig(steps=60, batch_size=16, lr=0.05),
                         evaluation=task(adamw_bundle, 100, 4))
    assert report.after["accuracy"] - report.before["accuracy"] > 0.25
    assert report.after["loss"] < 0.6 * report.before["loss"]
    assert report.kept == "final" and report.trained == report.after
    assert tr.evaluate([task(adamw_bundle, 100, 4)]) == pytest.approx(report.after)


def test_buffer_and_holdout_bound_what_is_trained_on(sgd_bundle: Handmade) -> None:
    data = task(sgd_bundle, 100, 5)
    data["x"][:, 0] = np.arange(100)  # the example's stream position, to see which were kept
    tr = Trainer.open(sgd_bundle.bundle.path)
    seen: list[np.ndarray] = []
    real_step = tr.step
    tr.step = lambda batch, lr=None: (seen.append(batch["x"][:, 0]), real_step(batch, lr=lr))[1]  # type: ignore
    config = LoopConfig(steps=10, batch_size=4, lr=1e-3, buffer_size=10, buffer_policy="fifo", holdout_fraction=0.2)
    report = personalize(tr, data, config)
    assert report.examples == {"offered": 100, "buffered": 10, "train": 8, "held_out": 2, "replay": 0}
    trained_on = set(np.concatenate(seen).astype(int))
    assert len(trained_on) == 8 and trained_on <= set(range(90, 100))  # fifo kept the newest ten, two held out
    assert report.before is not None and report.after is not None  # the held-out pair was evaluated


def test_replay_fills_its_share_of_every_batch(sgd_bundle: Handmade) -> None:
    user, base = task(sgd_bundle, 40, 6), task(sgd_bundle, 30, 7)
    user["x"][:, 0], base["x"][:, 0] = 1.0, -1.0  # tag the source of each example
    tr = Trainer.open(sgd_bundle.bundle.path)
    tags: list[np.ndarray] = []
    real_step = tr.step
    tr.step = lambda batch, lr=None: (tags.append(batch["x"][:, 0]), real_step(batch, lr=lr))[1]  # type: ignore
    report = personalize(tr, user, LoopConfig(steps=12, batch_size=8, replay_share=0.25, lr=1e-3), replay=base)
    # Two replay examples in every batch; the user's 40 examples go in sixes, so each epoch ends with four.
    assert [((t == 1.0).sum(), (t == -1.0).sum()) for t in tags] == ([(6, 2)] * 6 + [(4, 2)]) + [(6, 2)] * 5
    assert report.examples["replay"] == 30


def test_quality_guard_keeps_the_previous_adapter_when_training_hurts(adamw_bundle: Handmade) -> None:
    tr = Trainer.open(adamw_bundle.bundle.path)
    initial = tr.trainable_state()
    held_out = task(adamw_bundle, 60, 8)
    report = personalize(tr, task(adamw_bundle, 100, 9, wrong=True), LoopConfig(steps=30, batch_size=16, lr=0.05),
                         evaluation=held_out)
    assert report.trained["loss"] > report.before["loss"] + 0.2  # the new adapter really is worse
    assert (report.kept, report.kept_step, report.after) == ("previous", 0, report.before)
    assert tr.step_count == 0 and same_state(tr.trainable_state(), initial)
    assert all(np.all(v == 0) for v in tr.optimizer_state().values())  # the optimizer state came back too
    assert tr.evaluate([held_out]) == pytest.approx(report.before)

    unguarded = Trainer.open(adamw_bundle.bundle.path)
    report = personalize(unguarded, task(adamw_bundle, 100, 9, wrong=True),
                         LoopConfig(steps=30, batch_size=16, lr=0.05, quality_guard=False), evaluation=held_out)
    assert report.kept == "final" and unguarded.step_count == 30


def test_early_stopping_and_restore_best(adamw_bundle: Handmade) -> None:
    held_out = task(adamw_bundle, 60, 10)
    wrong = task(adamw_bundle, 100, 11, wrong=True)
    config = LoopConfig(steps=100, batch_size=16, lr=0.05, schedule="constant", eval_every=5, patience=2,
                        quality_guard=False)
    tr = Trainer.open(adamw_bundle.bundle.path, threads=1)
    events: list[EvaluationEvent] = []
    report = personalize(tr, wrong, config, evaluation=held_out, on_evaluation=events.append)
    # The wrong labels help for a few steps (the random init is worse still), then hurt: two evaluations
    # without improvement after step 5 end the run.
    assert (report.stop_reason, report.steps_run) == ("early_stopping", 15)
    assert [(e.step, e.improved, e.stale) for e in events] == [(5, True, 0), (10, False, 1), (15, False, 2)]
    assert events[0].metrics["loss"] < report.before["loss"] < events[1].metrics["loss"]
    assert [step for step, _ in report.evaluations] == [5, 10, 15]
    # restore_best ends on the step-5 adapter: exactly what five steps with the same batches and lr give.
    assert (report.kept, report.kept_step, tr.step_count) == ("best", 5, 5)
    reference = Trainer.open(adamw_bundle.bundle.path, threads=1)
    personalize(reference, wrong, LoopConfig(steps=5, batch_size=16, lr=0.05, schedule="constant"))
    assert same_state(tr.trainable_state(), reference.trainable_state())
    assert same_state(tr.optimizer_state(), reference.optimizer_state())
    assert report.after == report.evaluations[0][1]


def test_patience_counts_only_real_improvements(adamw_bundle: Handmade) -> None:
    tr = Trainer.open(adamw_bundle.bundle.path)
    events: list[EvaluationEvent] = []
    config = LoopConfig(steps=40, batch_size=16, lr=0.05, eval_every=5, patience=3, min_delta=10.0)
    report = personalize(tr, task(adamw_bundle, 100, 12), config, evaluation=task(adamw_bundle, 50, 13),
                         on_evaluation=events.append)
    # Training helps, but never by more than min_delta=10 in loss, so no evaluation counts as an improvement.
    assert [e.improved for e in events] == [False, False, False]
    assert report.stop_reason == "early_stopping" and report.steps_run == 15
    assert report.kept in ("final", "best") and report.after["loss"] < report.before["loss"]


def test_non_finite_steps_are_skipped_then_stop_the_run(sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    initial = tr.trainable_state()
    huge = task(sgd_bundle, 20, 14)
    huge["x"][:] = 3e38  # finite input whose logits overflow: every step is non-finite
    report = personalize(tr, huge, LoopConfig(steps=50, batch_size=4, max_nonfinite_steps=2))
    assert (report.stop_reason, report.steps_run, report.skipped_steps) == ("non_finite", 0, 3)
    assert tr.step_count == 0 and same_state(tr.trainable_state(), initial)

    mixed = task(sgd_bundle, 20, 15)
    mixed["x"][::2] = 3e38  # every other example is poison; with batch_size 1 about half the steps are skipped
    tr = Trainer.open(sgd_bundle.bundle.path)
    report = personalize(tr, mixed, LoopConfig(steps=40, batch_size=1, lr=0.01, max_nonfinite_steps=40))
    assert report.stop_reason == "completed" and report.steps_run + report.skipped_steps == 40
    assert 10 <= report.skipped_steps <= 30 and tr.step_count == report.steps_run
    assert all(np.isfinite(v).all() for v in tr.trainable_state().values())


def test_should_stop_cancels_cleanly_and_still_checkpoints(tmp_path: Path, sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    polls = iter(range(100))
    config = LoopConfig(steps=20, batch_size=4, checkpoint_dir=str(tmp_path / "ck"))
    report = personalize(tr, task(sgd_bundle, 30, 16), config, should_stop=lambda: next(polls) >= 3)
    assert (report.stop_reason, report.steps_run, tr.step_count) == ("cancelled", 3, 3)
    assert report.checkpoints == [3] and load_checkpoint(tmp_path / "ck", tr.bundle)[0] == 3


def test_periodic_checkpoints_and_resume_continue_the_step_count(tmp_path: Path, adamw_bundle: Handmade) -> None:
    data = task(adamw_bundle, 40, 17)
    config = LoopConfig(steps=12, batch_size=8, checkpoint_every=5, checkpoint_dir=str(tmp_path / "ck"))
    tr = Trainer.open(adamw_bundle.bundle.path)
    assert personalize(tr, data, config).checkpoints == [5, 10, 12]
    resumed = Trainer.open(adamw_bundle.bundle.path, checkpoint=tmp_path / "ck")
    assert resumed.step_count == 12
    assert personalize(resumed, data, config).checkpoints == [17, 22, 24]
    assert load_checkpoint(tmp_path / "ck", tr.bundle)[0] == 24


def test_memory_guard_refuses_to_start(tmp_path: Path, sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    data = task(sgd_bundle, 20, 18)
    with pytest.raises(MemoryBudgetError, match=r"the process uses [\d.]+ MB of RAM, over the 1 MB budget"):
        personalize(tr, data, LoopConfig(steps=5, memory_budget_mb=1, checkpoint_dir=str(tmp_path / "ck")))
    with pytest.raises(MemoryBudgetError, match=r"available, under the 1e\+09 MB floor"):
        personalize(tr, data, LoopConfig(steps=5, min_available_mb=1e9))
    assert tr.step_count == 0 and not (tmp_path / "ck").exists()
    report = personalize(tr, data, LoopConfig(steps=5, memory_budget_mb=1e6, min_available_mb=1))
    assert report.steps_run == 5 and report.memory["rss_mb"] > 1


def test_memory_guard_stops_a_run_that_grows_past_the_budget(monkeypatch: pytest.MonkeyPatch,
                                                              sgd_bundle: Handmade) -> None:
    reads = iter(range(1000))
    growing = lambda *path: (100 + 10 * next(reads)) << 20  # noqa: E731  (+10 MB at every reading)
    monkeypatch.setattr(guards_module, "read_rss_bytes", growing)  # the check before the first step
    monkeypatch.setattr(loop_module, "read_rss_bytes", growing)  # the check before every step
    tr = Trainer.open(sgd_bundle.bundle.path)
    report = personalize(tr, task(sgd_bundle, 20, 19), LoopConfig(steps=50, memory_budget_mb=145))
    # 100 MB at the start, then 110..140 MB before steps 1-4; 150 MB before step 5 stops the run.
    assert (report.stop_reason, report.steps_run, report.memory["rss_mb"]) == ("memory_budget", 4, 100.0)


def test_report_to_dict_is_plain_json(adamw_bundle: Handmade) -> None:
    import json

    tr = Trainer.open(adamw_bundle.bundle.path)
    report = personalize(tr, task(adamw_bundle, 40, 20), LoopConfig(steps=6, batch_size=8, eval_every=2),
                         evaluation=task(adamw_bundle, 20, 21))
    out = json.loads(json.dumps(report.to_dict()))
    assert [e["step"] for e in out["evaluations"]] == [2, 4]
    assert out["stop_reason"] == "completed" and len(out["losses"]) == 6
