"""Bad batches at every entry point (step, evaluate, predict) on a handmade and a real exported bundle: each is
refused with a BatchError naming the input and the fix, and the trainer's state does not move. Steps whose loss,
gradient or update is not finite are rejected with the state exactly as it was.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import pytest
from .handmade_bundle import IGNORE, Handmade, build_bundle, make_batch

import device_runtime.trainer as trainer_module
from device_runtime import BatchError, NonFiniteStepError, Trainer
from device_runtime.bundle import Bundle
from device_runtime.graph_contract import NEW_STATE


def state_of(tr: Trainer) -> tuple:
    return tr.step_count, tr.last_grad_norm, tr.trainable_state(), tr.optimizer_state()


def assert_unchanged(tr: Trainer, before: tuple) -> None:
    now = state_of(tr)
    assert now[:2] == before[:2]
    for mine, theirs in zip(now[2:], before[2:]):
        assert mine.keys() == theirs.keys()
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name])


def handmade_good() -> dict[str, np.ndarray]:
    return make_batch(np.random.default_rng(50), n=4, ignored=1)


def mlp_good() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(51)
    return {"x": rng.random((5, 64), dtype=np.float32), "labels": rng.integers(0, 10, 5).astype(np.int64)}


def poke(value: float) -> Callable[[dict], None]:
    def edit(b: dict) -> None:
        b["x"] = b["x"].copy()
        b["x"][1, 2] = value
    return edit


# (edit, message) pairs that hold for both bundles: n_features / n_classes are filled in per bundle.
BAD: list[tuple[str, Callable[[dict, int, int], None], str]] = [
    ("missing_labels", lambda b, f, c: b.pop("labels"), r"batch is missing \['labels'\]"),
    ("missing_input", lambda b, f, c: b.pop("x"), r"batch is missing \['x'\]"),
    ("extra_entry", lambda b, f, c: b.update(weights=b["x"]), r"unexpected entries \['weights'\]"),
    ("x_float64", lambda b, f, c: b.update(x=b["x"].astype(np.float64)),
     r"input 'x' has dtype float64, the bundle expects float32; convert it explicitly"),
    ("x_int", lambda b, f, c: b.update(x=b["x"].astype(np.int64)), r"input 'x' has dtype int64"),
    ("labels_float", lambda b, f, c: b.update(labels=b["labels"].astype(np.float32)),
     r"input 'labels' has dtype float32, the bundle expects int64"),
    ("labels_uint64", lambda b, f, c: b.update(labels=b["labels"].astype(np.uint64)), r"input 'labels' has dtype uint64"),
    ("x_rank1", lambda b, f, c: b.update(x=b["x"][0]), r"input 'x' has shape \[\d+\] \(rank 1\), the bundle expects rank 2"),
    ("x_rank3", lambda b, f, c: b.update(x=b["x"][:, None, :]), r"\(rank 3\), the bundle expects rank 2"),
    ("x_features", lambda b, f, c: b.update(x=np.zeros((len(b["labels"]), f + 1), np.float32)),
     r"input 'x' has size \d+ on axis 1, the bundle fixes it at \d+; pad or crop it"),
    ("batch_mismatch", lambda b, f, c: b.update(labels=b["labels"][:-1]),
     r"symbolic dim 'batch' is \d+ in 'x' \(axis 0\) but \d+ in 'labels'"),
    ("empty", lambda b, f, c: b.update(x=b["x"][:0], labels=b["labels"][:0]), r"input 'x' is empty"),
    ("label_too_big", lambda b, f, c: b["labels"].__setitem__(0, c),
     r"outside \[0, \d+\) \(first: \d+\); class ids must be 0\.\.\d+"),
    ("label_negative", lambda b, f, c: b["labels"].__setitem__(1, -1), r"outside \[0, \d+\) \(first: -1\)"),
    ("nan", lambda b, f, c: poke(np.nan)(b), r"input 'x' holds NaN or Inf values; clean or drop those examples"),
    ("inf", lambda b, f, c: poke(np.inf)(b), r"input 'x' holds NaN or Inf"),
    ("neg_inf", lambda b, f, c: poke(-np.inf)(b), r"input 'x' holds NaN or Inf"),
    ("ragged", lambda b, f, c: b.update(x=[[0.0] * f, [0.0] * (f - 1)]), r"input 'x' is not a rectangular array"),
    ("strings", lambda b, f, c: b.update(x=np.full(b["x"].shape, "a")), r"input 'x' has dtype <U1"),
    ("none", lambda b, f, c: b.update(x=None), r"input 'x' has dtype object"),
]


def check_all_entry_points(tr: Trainer, good: Callable[[], dict], features: int, classes: int) -> None:
    tr.step(good())  # some optimizer state to protect
    before = state_of(tr)
    for name, edit, message in BAD:
        batch = good()
        batch["labels"] = batch["labels"].copy()
        edit(batch, features, classes)
        with pytest.raises(BatchError, match=message):
            tr.step(batch)
        if "labels" in batch:  # evaluate takes labels too; predict takes none
            with pytest.raises(BatchError, match=message):
                tr.evaluate([good(), batch])  # a bad batch after a good one still fails the whole call
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if name not in ("missing_labels", "labels_float", "labels_uint64", "batch_mismatch", "label_too_big",
                        "label_negative"):
            with pytest.raises(BatchError, match=message):
                tr.predict(inputs)
        assert_unchanged(tr, before)
    with pytest.raises(BatchError, match=r"a batch must be a dict"):
        tr.step([good()["x"]])  # type: ignore[arg-type]
    ignored_only = good()
    ignored_only["labels"][:] = IGNORE
    with pytest.raises(BatchError, match="no counted targets"):
        tr.evaluate([ignored_only])
    assert_unchanged(tr, before)


def test_bad_batches_handmade(adamw_bundle: Handmade) -> None:
    check_all_entry_points(Trainer.open(adamw_bundle.bundle.path), handmade_good, features=4, classes=3)


@pytest.mark.slow
def test_bad_batches_real_exported_bundle(exported_mlp: Bundle) -> None:
    check_all_entry_points(Trainer.open(exported_mlp.path), mlp_good, features=64, classes=10)


def overflowing(good: dict) -> dict:
    """Finite inputs so large that the logits overflow inside the graph: validation cannot catch this."""
    return {**good, "x": np.full_like(good["x"], 3e38)}


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_non_finite_loss_is_rejected_and_state_kept(adamw_bundle: Handmade, sgd_bundle: Handmade, kind: str) -> None:
    hm = adamw_bundle if kind == "adamw" else sgd_bundle
    tr = Trainer.open(hm.bundle.path)
    tr.step(handmade_good())
    before = state_of(tr)
    with pytest.raises(NonFiniteStepError, match=r"step 2 gave loss (nan|inf).*trainer is still at step 1"):
        tr.step(overflowing(handmade_good()))
    assert_unchanged(tr, before)
    assert np.isfinite(tr.step(handmade_good())) and tr.step_count == 2  # it trains on afterwards


def test_non_finite_update_from_a_finite_loss_is_rejected(sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    before = state_of(tr)
    # The loss and gradient are finite, but lr * gradient overflows float32: the new weights would be +-inf.
    batch = {**handmade_good(), "x": handmade_good()["x"] * 1e3}
    with pytest.raises(NonFiniteStepError, match=r"produced non-finite values in \['head\.weight'.*finite loss"):
        tr.step(batch, lr=3e38)
    assert_unchanged(tr, before)


def test_non_finite_optimizer_state_is_rejected(monkeypatch: pytest.MonkeyPatch, adamw_bundle: Handmade) -> None:
    """A graph that returns finite weights but a NaN moment would poison every later step: refuse it too."""
    tr = Trainer.open(adamw_bundle.bundle.path)
    tr.step(handmade_good())
    before = state_of(tr)
    real_run_bound = trainer_module.run_bound

    def nan_moment(session: Any, graph: str, arrays: Any, values: Any, outputs: list[str]) -> list:
        results = real_run_bound(session, graph, arrays, values, outputs)
        if graph == "train_step":
            index = outputs.index(NEW_STATE + adamw_bundle.bundle.state_names[-1])
            broken = results[index].numpy().copy()
            broken.reshape(-1)[0] = np.nan
            results[index] = ort.OrtValue.ortvalue_from_numpy(broken)
        return results

    monkeypatch.setattr(trainer_module, "run_bound", nan_moment)
    with pytest.raises(NonFiniteStepError, match=r"non-finite values in \['state::exp_avg_sq/head\.bias'\]"):
        tr.step(handmade_good())
    assert_unchanged(tr, before)


@pytest.mark.slow
def test_non_finite_step_on_a_real_exported_bundle(exported_mlp: Bundle) -> None:
    tr = Trainer.open(exported_mlp.path)
    tr.step(mlp_good())
    before = state_of(tr)
    with pytest.raises(NonFiniteStepError, match=r"step 2 gave loss"):
        tr.step(overflowing(mlp_good()))
    assert_unchanged(tr, before)
    metrics_before = tr.evaluate([mlp_good()])
    assert tr.evaluate([mlp_good()]) == metrics_before  # evaluation is unaffected by the rejected step


def test_tiny_bundle_helper_is_deterministic(tmp_path: Any) -> None:
    """The suite compares exact states, which needs two builds of a bundle to train identically."""
    a, b = build_bundle(tmp_path / "a"), build_bundle(tmp_path / "b")
    ta, tb = Trainer.open(a.bundle.path, threads=1), Trainer.open(b.bundle.path, threads=1)
    assert ta.step(handmade_good()) == tb.step(handmade_good())
