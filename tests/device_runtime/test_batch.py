"""Batch validation: every refusal names the input and the fix; accepted batches come back contiguous and typed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from .handmade_bundle import IGNORE, Handmade

from device_runtime import BatchError, validate_batch


def good(n: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(20)
    return {"x": rng.normal(size=(n, 4)).astype(np.float32), "labels": np.array([0, 2, IGNORE][:n] + [1] * (n - 3))}


def test_accepts_and_normalises(sgd_bundle: Handmade) -> None:
    batch = good()
    batch["x"] = np.asfortranarray(batch["x"])
    batch["labels"] = batch["labels"].astype(np.int32)  # lossless widening to int64 is allowed
    out = validate_batch(batch, sgd_bundle.bundle, with_labels=True)
    assert out["x"].flags.c_contiguous and out["labels"].flags.c_contiguous
    assert out["labels"].dtype == np.int64
    np.testing.assert_array_equal(out["x"], batch["x"])
    np.testing.assert_array_equal(out["labels"], [0, 2, IGNORE])


def test_python_lists_are_accepted_when_their_dtype_fits(sgd_bundle: Handmade) -> None:
    batch = {"x": good()["x"], "labels": [0, 1, 2]}
    assert validate_batch(batch, sgd_bundle.bundle, with_labels=True)["labels"].dtype == np.int64


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b: b.pop("labels"), r"batch is missing \['labels'\]"),
        (lambda b: b.update(extra=1), r"unexpected entries \['extra'\]"),
        (lambda b: b.update(x=b["x"].astype(np.float64)), r"input 'x' has dtype float64, the bundle expects float32"),
        (lambda b: b.update(x=b["x"].tolist()), r"input 'x' has dtype float64"),  # Python floats are float64
        (lambda b: b.update(labels=b["labels"].astype(np.float32)), r"input 'labels' has dtype float32"),
        (lambda b: b.update(x=b["x"][0]), r"input 'x' has shape \[4\] \(rank 1\), the bundle expects rank 2"),
        (lambda b: b.update(x=np.zeros((3, 5), np.float32)),
         r"input 'x' has size 5 on axis 1, the bundle fixes it at 4"),
        (lambda b: b.update(labels=b["labels"][:2]),
         r"symbolic dim 'batch' is 3 in 'x' \(axis 0\) but 2 in 'labels' \(axis 0\)"),
        (lambda b: b.update(x=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64)), r"input 'x' is empty"),
        (lambda b: b["x"].__setitem__((1, 2), np.nan), r"input 'x' holds NaN or Inf"),
        (lambda b: b["x"].__setitem__((0, 0), -np.inf), r"input 'x' holds NaN or Inf"),
        (lambda b: b.update(labels=np.array([0, 3, -1])), r"2 value\(s\) outside \[0, 3\) \(first: 3\)"),
        (lambda b: b.update(x=[[1.0, 2.0], [3.0]]), r"input 'x' is not a rectangular array"),
    ],
)
def test_refusals(sgd_bundle: Handmade, edit: Any, message: str) -> None:
    batch = good()
    edit(batch)
    with pytest.raises(BatchError, match=message):
        validate_batch(batch, sgd_bundle.bundle, with_labels=True)


def test_predict_batches_take_no_labels(sgd_bundle: Handmade) -> None:
    with pytest.raises(BatchError, match=r"unexpected entries \['labels'\] \(predict takes no labels; drop them\)"):
        validate_batch(good(), sgd_bundle.bundle, with_labels=False)
    assert list(validate_batch({"x": good()["x"]}, sgd_bundle.bundle, with_labels=False)) == ["x"]


def test_not_a_dict(sgd_bundle: Handmade) -> None:
    with pytest.raises(BatchError, match="a batch must be a dict"):
        validate_batch([good()["x"]], sgd_bundle.bundle, with_labels=False)  # type: ignore[arg-type]
