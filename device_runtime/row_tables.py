"""Frozen lookup tables kept out of memory except for the rows the current batch reads.

Why: onnxruntime's Gather reads a frozen embedding table from the mapping of weights.bin, and a file mapping pages
in far more than the rows it touches: the kernel maps up to 64 KB around every fault and reads ahead, so the 512
scattered token ids of one MiniLM batch make the whole 11.7 MB int8 word table (47 MB in fp32) resident, for good.
A table that only Gathers read, indexed by a model input, needs just the batch's rows. The exporter lists such
tables in the manifest (`weights.row_tables`: tensor -> input); here each becomes a zero-filled private anonymous
mapping that onnxruntime reads as the initializer. Before a run, `stage` reads the batch's rows into it with
`pread` (no file mapping, so no fault-around); after the run, `release` hands those pages back to the OS. Rows a
batch does not name are never read by the graph, so their zeros are never seen.
"""

from __future__ import annotations

import math
import mmap
import os
from typing import BinaryIO

import numpy as np

from .errors import BatchError, BundleError

__all__ = ["RowTable"]


def _anonymous_zeros(nbytes: int) -> tuple[np.ndarray, mmap.mmap | None]:
    """A zero-filled byte buffer whose pages cost nothing until written and can be given back (Linux, macOS)."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # no anonymous mmap: calloc'd zeros are also lazily backed
        return np.zeros(nbytes, np.uint8), None
    mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        # A transparent huge page would make one staged row resident as 2 MB.
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mapping, dtype=np.uint8, count=nbytes), mapping


class RowTable:
    """One frozen table of weights.bin (`shape[0]` rows) whose rows are staged per batch from model input `index`."""

    def __init__(self, name: str, index: str, dtype: np.dtype, shape: list[int], file: BinaryIO, offset: int) -> None:
        self.name, self.index, self.num_rows = name, index, shape[0]
        self._file, self._offset = file, offset
        self._row_bytes = dtype.itemsize * math.prod(shape[1:])
        flat, self._mapping = _anonymous_zeros(self._row_bytes * self.num_rows)
        self._rows = flat.reshape(self.num_rows, self._row_bytes)
        self.array = flat.view(dtype).reshape(shape)  # what onnxruntime reads as the initializer
        self._staged = False

    def stage(self, ids: np.ndarray) -> None:
        """Read the rows `ids` names into the table; ids outside the table are a batch error, not a wrong lookup."""
        unique = np.unique(ids)
        if unique.size and (unique[0] < 0 or unique[-1] >= self.num_rows):
            raise BatchError(f"{self.index!r} holds ids from {int(unique[0])} to {int(unique[-1])}, but "
                             f"{self.name} has {self.num_rows} rows (ids 0..{self.num_rows - 1}); the ids come "
                             "from a different tokenizer or vocabulary than the bundle's")
        self._staged = True
        fd = self._file.fileno()
        for row in unique.tolist():
            position = self._offset + row * self._row_bytes
            if hasattr(os, "preadv"):
                got = os.preadv(fd, [self._rows[row]], position)
            else:  # no preadv (Windows): seek + readinto on the same unbuffered file
                self._file.seek(position)
                got = self._file.readinto(memoryview(self._rows[row]))
            if got != self._row_bytes:
                raise BundleError(f"weights.bin ended inside row {row} of {self.name} (read {got} of "
                                  f"{self._row_bytes} bytes); the file is truncated, copy the bundle again")

    def release(self) -> None:
        """Give the staged rows' pages back to the OS (they read as zeros again)."""
        if not self._staged:
            return
        if self._mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mapping.madvise(mmap.MADV_DONTNEED)
        # Elsewhere the rows stay resident: still correct (a run reads only rows it staged), just not as small.
        self._staged = False
