"""The bundle's frozen tensors, mapped read-only from weights.bin once and handed to every session.

Left to itself, each onnxruntime session copies the external initializers it reads into its own buffers: three
sessions, three copies. Mapping the file once and giving the sessions OrtValues that view the mapping
(`SessionOptions.add_initializer`) keeps one copy, in the page cache, shared and never written. Packed weight
layouts that onnxruntime precomputes at load ("prepacking") are still private copies, so `prepack=False` trades
some matmul speed for the smallest footprint. Tables the manifest lists under `row_tables` are not mapped at all:
only the rows a batch reads are staged into memory around each run (`device_runtime.row_tables`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import onnxruntime as ort

from .bundle import Bundle
from .errors import BundleError
from .row_tables import RowTable
from .tensor_spec import DTYPES

__all__ = ["FrozenWeights"]

FROZEN_PREFIX = "frozen::"


@dataclass
class FrozenWeights:
    arrays: dict[str, np.ndarray]
    values: dict[str, ort.OrtValue]
    nbytes: int
    row_tables: list[RowTable] = field(default_factory=list)
    file: BinaryIO | None = None  # weights.bin, open for the row tables' reads

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
        row_index = _row_tables(bundle, entry, where)
        file = open(path, "rb", buffering=0) if row_index else None
        arrays, values, tables = {}, {}, []
        for name, t in entry.get("tensors", {}).items():
            dtype, shape, offset, length = t.get("dtype"), t.get("shape"), t.get("offset"), t.get("length")
            if dtype not in DTYPES or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise BundleError(f"{where}: tensor {name!r} has a bad dtype or shape ({dtype}, {shape})")
            itemsize = np.dtype(dtype).itemsize
            if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and offset % itemsize == 0
                    and length == math.prod(shape) * itemsize and offset + length <= size):
                raise BundleError(f"{where}: tensor {name!r} at offset {offset} length {length} does not fit "
                                  f"{entry['file']} ({size} bytes) or its shape; re-export the bundle")
            if name in row_index:
                tables.append(RowTable(name, row_index[name], np.dtype(dtype), shape, file, offset))
                array = tables[-1].array
            else:
                array = mapped[offset : offset + length].view(np.dtype(dtype)).reshape(shape)
            arrays[name] = array
            values[FROZEN_PREFIX + name] = ort.OrtValue.ortvalue_from_numpy(array)
        return cls(arrays, values, size, tables, file)

    @contextmanager
    def staged(self, feeds: Mapping[str, np.ndarray]) -> Iterator[None]:
        """Hold the rows `feeds` index in every row table for the duration of one run, then release them."""
        try:
            for table in self.row_tables:
                table.stage(feeds[table.index])
            yield
        finally:
            for table in self.row_tables:
                table.release()

    def add_to(self, options: ort.SessionOptions) -> None:
        """Make a session use the mapped tensors instead of loading its own copies."""
        for name, value in self.values.items():
            options.add_initializer(name, value)


def _row_tables(bundle: Bundle, entry: dict, where: str) -> dict[str, str]:
    """The optional `row_tables` entry ({tensor: integer model input}), checked against the model's inputs."""
    tables = entry.get("row_tables", {})
    if not isinstance(tables, dict):
        raise BundleError(f"{where}: row_tables must map tensor names to model input names, got "
                          f"{type(tables).__name__}; re-export the bundle")
    inputs = {spec.name: spec for spec in bundle.inputs}
    for name, index in tables.items():
        spec = inputs.get(index)
        if spec is None or spec.dtype not in ("int64", "int32"):
            raise BundleError(f"{where}: row table {name!r} is indexed by {index!r}, which is not an integer model "
                              f"input (inputs: {sorted(inputs)}); re-export the bundle")
        shape = entry.get("tensors", {}).get(name, {}).get("shape")
        if not isinstance(shape, list) or not shape:
            raise BundleError(f"{where}: row table {name!r} needs a tensor of rank >= 1 among tensors; re-export "
                              "the bundle")
    return tables
