"""Validation of a batch (dict of model inputs and labels) against a bundle's input spec before it reaches a graph.

onnxruntime's own errors for a bad feed name an internal node, not the user's input, and some mistakes (labels out
of range, NaN features, a float64 array silently rounded) do not error at all but train garbage. Every check
here names the input and says how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .bundle import Bundle
from .errors import BatchError
from .tensor_spec import TensorSpec

__all__ = ["validate_batch"]


def _coerce_dtype(name: str, value: Any, spec: TensorSpec) -> np.ndarray:
    """Return `value` as an array of the spec's dtype, converting only when no value can change.

    Python lists and scalars go through `np.asarray` first and are then judged like arrays. Widening an
    integer (int32 -> int64) or a float (float16 -> float32) is lossless and allowed; narrowing (float64 ->
    float32, int64 -> int32) is refused because it can change values without a trace.
    """
    try:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise BatchError(f"input {name!r} is not a rectangular array ({exc}); pad the examples to one shape") from exc
    want = spec.numpy_dtype
    if arr.dtype == want:
        return arr
    same_family = (arr.dtype.kind in "iu" and want.kind in "iu") or (arr.dtype.kind == want.kind == "f")
    if same_family and np.can_cast(arr.dtype, want, casting="safe"):
        return arr.astype(want)
    raise BatchError(
        f"input {name!r} has dtype {arr.dtype}, the bundle expects {spec.dtype}; convert it explicitly, "
        f"e.g. np.asarray(x, dtype=np.{want.name}) (no silent narrowing: check the values survive the conversion)"
    )


def _check_shape(name: str, arr: np.ndarray, spec: TensorSpec, symbols: dict[str, tuple[int, str, int]]) -> None:
    """Rank and fixed dims must match; a symbolic dim must have the same size everywhere it appears."""
    if arr.ndim != len(spec.shape):
        raise BatchError(
            f"input {name!r} has shape {list(arr.shape)} (rank {arr.ndim}), the bundle expects rank "
            f"{len(spec.shape)} {list(spec.shape)}; reshape it (a single example still needs the batch axis)"
        )
    for axis, (size, dim) in enumerate(zip(arr.shape, spec.shape)):
        if isinstance(dim, int):
            if size != dim:
                raise BatchError(f"input {name!r} has size {size} on axis {axis}, the bundle fixes it at {dim}; "
                                 f"pad or crop it to {dim}")
            continue
        if dim in symbols:
            seen_size, seen_name, seen_axis = symbols[dim]
            if size != seen_size:
                raise BatchError(
                    f"symbolic dim {dim!r} is {seen_size} in {seen_name!r} (axis {seen_axis}) but {size} in "
                    f"{name!r} (axis {axis}); inputs sharing a dim name must agree, e.g. same batch size"
                )
        else:
            symbols[dim] = (size, name, axis)
    if arr.ndim >= 1 and arr.shape[0] < 1:
        raise BatchError(f"input {name!r} is empty (size 0 on axis 0); pass at least one example")


def _check_labels(arr: np.ndarray, bundle: Bundle) -> None:
    """Cross-entropy class ids must be in [0, num_classes) or equal ignore_index (out of range = garbage loss)."""
    loss = bundle.loss
    if loss["name"] != "cross_entropy":
        return
    num_classes, ignore = loss["num_classes"], loss["ignore_index"]
    bad = (arr != ignore) & ((arr < 0) | (arr >= num_classes))
    if bad.any():
        first = arr[bad].reshape(-1)[0]
        raise BatchError(
            f"labels {bundle.labels.name!r} hold {int(bad.sum())} value(s) outside [0, {num_classes}) "
            f"(first: {int(first)}); class ids must be 0..{num_classes - 1}, or {ignore} to skip a target"
        )


def validate_batch(batch: Mapping[str, Any], bundle: Bundle, with_labels: bool) -> dict[str, np.ndarray]:
    """Check a batch against the bundle and return it as C-contiguous arrays of the declared dtypes.

    `with_labels` says whether the labels entry is required (train step, evaluate) or must be absent (predict).
    """
    if not isinstance(batch, Mapping):
        raise BatchError(f"a batch must be a dict of input name -> array, got {type(batch).__name__}")
    specs = list(bundle.inputs) + ([bundle.labels] if with_labels else [])
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in batch]
    unexpected = sorted(str(n) for n in batch if n not in expected)
    if missing:
        raise BatchError(f"batch is missing {missing}; the bundle expects {expected}")
    if unexpected:
        hint = " (predict takes no labels; drop them)" if bundle.labels.name in unexpected else ""
        raise BatchError(f"batch has unexpected entries {unexpected}{hint}; the bundle expects {expected}")

    symbols: dict[str, tuple[int, str, int]] = {}
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        arr = _coerce_dtype(spec.name, batch[spec.name], spec)
        _check_shape(spec.name, arr, spec, symbols)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BatchError(f"input {spec.name!r} holds NaN or Inf values; clean or drop those examples")
        out[spec.name] = np.ascontiguousarray(arr)
    if with_labels:
        _check_labels(out[bundle.labels.name], bundle)
    return out
