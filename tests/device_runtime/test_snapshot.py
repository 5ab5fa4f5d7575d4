"""Trainer.snapshot / restore: an exact, independent copy of the trainable tensors, optimizer state and step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from .handmade_bundle import W_NAME, Handmade, build_bundle, make_batch

from device_runtime import CheckpointError, Trainer, TrainerSnapshot


def test_restore_rewinds_exactly_and_can_be_repeated(adamw_bundle: Handmade) -> None:
    tr = Trainer.open(adamw_bundle.bundle.path, threads=1)
    rng = np.random.default_rng(40)
    tr.step(make_batch(rng))
    snap = tr.snapshot()
    later = [make_batch(rng) for _ in range(3)]
    first = [tr.step(b) for b in later]
    after_first = tr.trainable_state()
    for _ in range(2):  # the same snapshot twice: stepping from a restore must not write into the snapshot
        tr.restore(snap)
        assert (tr.step_count, tr.last_grad_norm) == (1, snap.last_grad_norm)
        assert [tr.step(b) for b in later] == first  # AdamW's step-dependent bias correction included
    for name, value in tr.trainable_state().items():
        np.testing.assert_array_equal(value, after_first[name])


def test_snapshot_is_a_read_only_copy(sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    snap = tr.snapshot()
    assert isinstance(snap, TrainerSnapshot) and snap.step_count == 0 and snap.state == {}
    with pytest.raises(ValueError, match="read-only"):
        snap.trainable[W_NAME][0, 0] = 1.0
    tr.step(make_batch(np.random.default_rng(41)))
    np.testing.assert_array_equal(snap.trainable[W_NAME], sgd_bundle.weight)  # unaffected by the step


def test_restore_refuses_foreign_or_edited_snapshots(tmp_path: Path, sgd_bundle: Handmade) -> None:
    other = Trainer.open(build_bundle(tmp_path / "other", seed=2).bundle.path)
    tr = Trainer.open(sgd_bundle.bundle.path)
    with pytest.raises(CheckpointError, match="the snapshot was taken from the bundle with id"):
        tr.restore(other.snapshot())
    snap = tr.snapshot()
    edited = TrainerSnapshot(snap.bundle_id, 3, None, {W_NAME: snap.trainable[W_NAME]}, {})
    with pytest.raises(CheckpointError, match=r"snapshot \(trainable\): tensor names do not match .*missing"):
        tr.restore(edited)
    with pytest.raises(CheckpointError, match="restore needs a TrainerSnapshot"):
        tr.restore({"step": 1})  # type: ignore[arg-type]
    assert tr.step_count == 0
