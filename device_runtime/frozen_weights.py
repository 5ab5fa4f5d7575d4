"""The bundle's frozen tensors, mapped read-only from weights.bin once and handed to every session.

Left to itself, each onnxruntime session copies the external initializers it reads into its own buffers: three
sessions, three copies. Mapping the file once and giving the sessions OrtValues that view the mapping
(`SessionOptions.add_initializer`) keeps one copy, in the page cache, shared and never written. Packed weight
layouts that onnxruntime precomputes at load ("prepacking") are still private copies, so `prepack=False` trades
some matmul speed for the smallest footprint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .bundle import Bundle
from .errors import BundleError
from .tensor_spec import DTYPES

__all__ = ["FrozenWeights"]

FROZEN_PREFIX = "frozen::"


@dataclass
class FrozenWeights:
    arrays: dict[str, np.ndarray]
    values: dict[str, ort.OrtValue]
    nbytes: int

    @classmethod
    def map(cls, bundle: Bundle) -> "FrozenWeights | None":
        """Map the tensors the manifest's `weights` entry lists; None for a bundle without one."""
        entry = bundle.manifest.get("weights")
        if entry is None:
            return None
        path = bundle.path / entry.get("file", "")
        where = f"{bundle.path / 'manifest.json'} (weights)"
        if entry.get("file") not in bundle.manifest["files"]:
            raise BundleError(f"{where}: weights file {entry.get('file')!r} is not listed in files; re-export the bundle")
        size = bundle.manifest["files"][entry["file"]]["size"]
        mapped = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        arrays, values = {}, {}
        for name, t in entry.get("tensors", {}).items():
            dtype, shape, offset, length = t.get("dtype"), t.get("shape"), t.get("offset"), t.get("length")
            if dtype not in DTYPES or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise BundleError(f"{where}: tensor {name!r} has a bad dtype or shape ({dtype}, {shape})")
            itemsize = np.dtype(dtype).itemsize
            if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and offset % itemsize == 0
                    and length == math.prod(shape) * itemsize and offset + length <= size):
                raise BundleError(f"{where}: tensor {name!r} at offset {offset} length {length} does not fit "
                                  f"{entry['file']} ({size} bytes) or its shape; re-export the bundle")
            array = mapped[offset : offset + length].view(np.dtype(dtype)).reshape(shape)
            arrays[name] = array
            values[FROZEN_PREFIX + name] = ort.OrtValue.ortvalue_from_numpy(array)
        return cls(arrays, values, size)

    def add_to(self, options: ort.SessionOptions) -> None:
        """Make a session use the mapped tensors instead of loading its own copies."""
        for name, value in self.values.items():
            options.add_initializer(name, value)
