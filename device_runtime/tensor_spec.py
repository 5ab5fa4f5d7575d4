"""Tensor specs (name, dtype, shape) and the one check of named numpy tensors against them.

The manifest describes every tensor that crosses the bundle boundary (model inputs, labels, the output,
trainable tensors, optimizer state) with the same three fields. Adapters and checkpoints are both "a dict of
named tensors that must match a list of specs", so that comparison lives here once and the callers only choose
which error type to raise and which file to blame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

__all__ = ["DTYPES", "Dim", "TensorSpec", "check_named_tensors", "numpy_dtype"]

# The dtypes a bundle may declare, by their manifest spelling. Kept small on purpose: every one of them must
# round-trip through safetensors, numpy and onnxruntime without a conversion.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "bool": np.dtype(np.bool_),
    "uint8": np.dtype(np.uint8),
    "int8": np.dtype(np.int8),
}

Dim = Union[int, str]
"""A dimension: an int is fixed, a str is a symbolic size shared by every tensor that names it."""


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a manifest dtype name (the caller has validated the name)."""
    return DTYPES[name]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as the manifest declares it; `shape` items are ints (fixed) or strs (symbolic)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def is_fixed(self) -> bool:
        """True when every dimension is a fixed int (trainable and state tensors must be)."""
        return all(isinstance(d, int) for d in self.shape)

    def to_manifest(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def check_named_tensors(
    tensors: Mapping[str, np.ndarray],
    specs: Sequence[TensorSpec],
    *,
    where: str,
    error: type[Exception],
    fix: str,
    require_finite: bool = True,
) -> None:
    """Raise `error` unless `tensors` holds exactly the spec'd names with the spec'd fixed shapes and dtypes.

    `where` names the file (or object) being checked and `fix` says what to do about it; both go into every
    message so that a user who only sees the message knows which file is wrong and how to recover.
    Non-finite float values are refused too: a NaN adapter would silently poison every later step.
    """
    expected = {s.name: s for s in specs}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise error(f"{where}: tensor names do not match the bundle (missing {missing}, unexpected {extra}); {fix}")
    for name, spec in expected.items():
        value = tensors[name]
        if not isinstance(value, np.ndarray):
            raise error(f"{where}: {name!r} is a {type(value).__name__}, not a numpy array; {fix}")
        if value.dtype != spec.numpy_dtype:
            raise error(f"{where}: {name!r} has dtype {value.dtype}, the bundle declares {spec.dtype}; {fix}")
        if tuple(value.shape) != tuple(spec.shape):
            raise error(
                f"{where}: {name!r} has shape {list(value.shape)}, the bundle declares {list(spec.shape)}; {fix}"
            )
        if require_finite and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise error(f"{where}: {name!r} holds NaN or Inf values; {fix}")
