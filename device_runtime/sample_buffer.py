"""A bounded buffer of the user's examples (reservoir or FIFO) that an app fills as samples arrive and trains from.

A device cannot keep every sample a user ever produced, and should not train only on the last few. `reservoir`
keeps a uniform random sample of everything seen so far (Vitter's algorithm R: the t-th example replaces a random
slot with probability capacity / t), so old habits and new ones are both represented; `fifo` keeps the newest
`capacity` examples, for data that drifts. The buffer saves to one `.npz` file (no pickle, written atomically),
random-generator state included, so a background job that is killed and restarted continues the same sample.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

from .atomic_io import atomic_write_file
from .errors import BatchError, LoopConfigError, SampleBufferError
from .npz_io import NPZ_READ_ERRORS, read_npz

__all__ = ["BUFFER_FORMAT", "BUFFER_FORMAT_VERSION", "POLICIES", "SampleBuffer"]

POLICIES = ("reservoir", "fifo")
BUFFER_FORMAT = "edgepeft-sample-buffer"
BUFFER_FORMAT_VERSION = 1
_META = "meta"
_ARRIVAL = "arrival"
_EXAMPLE = "example::"


def _check_capacity(capacity: Any) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise LoopConfigError(f"buffer capacity must be an int >= 1, got {capacity!r}; e.g. 512 examples")
    return int(capacity)


def _check_policy(policy: Any) -> str:
    if policy not in POLICIES:
        raise LoopConfigError(f"unknown buffer policy {policy!r}; use one of {list(POLICIES)}")
    return policy


class SampleBuffer:
    """At most `capacity` examples (rows of named arrays, e.g. {"x": [n, 64], "labels": [n]}) of a stream."""

    def __init__(self, capacity: int, policy: str = "reservoir", seed: int = 0) -> None:
        self.capacity = _check_capacity(capacity)
        self.policy = _check_policy(policy)
        self._rng = np.random.default_rng(seed)
        self._seen = 0
        self._size = 0
        self._storage: dict[str, np.ndarray] = {}
        # Stream position of the example in each slot, so `arrays()` can return examples in arrival order.
        self._arrival = np.zeros(self.capacity, dtype=np.int64)

    @property
    def seen(self) -> int:
        """How many examples were offered to the buffer in total (kept or not)."""
        return self._seen

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"SampleBuffer(capacity={self.capacity}, policy={self.policy!r}, size={self._size}, seen={self._seen})"

    def _check_examples(self, examples: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        if not isinstance(examples, Mapping) or not examples:
            raise BatchError("add() takes a dict of name -> array with the examples on axis 0, e.g. "
                             "{'x': x, 'labels': y}")
        arrays = {str(k): np.asarray(v) for k, v in examples.items()}
        if self._storage and set(arrays) != set(self._storage):
            raise BatchError(f"the buffer holds {sorted(self._storage)}, these examples have {sorted(arrays)}; "
                             "add the same named arrays every time")
        lengths = {name: (a.shape[0] if a.ndim else None) for name, a in arrays.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise BatchError(f"examples must share axis 0 (one row per example), got lengths {lengths}")
        for name, a in arrays.items():
            if a.dtype.kind not in "biuf":
                raise BatchError(f"{name!r} has dtype {a.dtype}; the buffer keeps numeric arrays only")
            if name in self._storage:
                held = self._storage[name]
                if (a.dtype, a.shape[1:]) != (held.dtype, held.shape[1:]):
                    raise BatchError(
                        f"{name!r} examples are {a.dtype} {list(a.shape[1:])}, the buffer holds {held.dtype} "
                        f"{list(held.shape[1:])}; convert or pad them to the buffer's layout"
                    )
        return arrays, next(iter(lengths.values()))

    def _slots(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(slot, source row) for each of the next n examples that is kept, in stream order."""
        stream = self._seen + np.arange(n)
        if self.policy == "fifo":
            return stream % self.capacity, np.arange(n)
        slots = stream.copy()
        full = stream >= self.capacity
        if full.any():
            # Algorithm R: example t (0-based) takes slot j ~ U{0..t} if j < capacity, else it is dropped.
            slots[full] = self._rng.integers(0, stream[full] + 1)
        kept = slots < self.capacity
        return slots[kept], np.arange(n)[kept]

    def add(self, examples: Mapping[str, Any]) -> int:
        """Offer a batch of examples in arrival order; return how many of them the buffer now holds."""
        arrays, n = self._check_examples(examples)
        if n == 0:
            return 0
        if not self._storage:
            self._storage = {name: np.zeros((self.capacity, *a.shape[1:]), dtype=a.dtype) for name, a in arrays.items()}
        slots, rows = self._slots(n)
        # A slot drawn twice in one call keeps the later example, as if the examples had come one by one.
        last = len(slots) - 1 - np.unique(slots[::-1], return_index=True)[1]
        slots, rows = slots[last], rows[last]
        for name, a in arrays.items():
            self._storage[name][slots] = a[rows]
        self._arrival[slots] = self._seen + rows
        self._seen += n
        self._size = min(self.capacity, self._seen)
        return len(slots)

    def arrays(self) -> dict[str, np.ndarray]:
        """Copies of the held examples, oldest first."""
        order = np.argsort(self._arrival[: self._size], kind="stable")
        return {name: held[: self._size][order] for name, held in self._storage.items()}

    def save(self, path: Union[str, Path]) -> Path:
        """Write the buffer (examples, counters, random state) to one `.npz` file atomically; return its path."""
        path = Path(path)
        meta = {"format": BUFFER_FORMAT, "format_version": BUFFER_FORMAT_VERSION, "capacity": self.capacity,
                "policy": self.policy, "seen": self._seen, "names": sorted(self._storage),
                "rng": self._rng.bit_generator.state}
        arrays = {_META: np.array(json.dumps(meta)), _ARRIVAL: self._arrival[: self._size]}
        arrays.update({_EXAMPLE + name: held[: self._size] for name, held in self._storage.items()})

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
                np.savez(f, **arrays)

        atomic_write_file(path, write)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SampleBuffer":
        """Read a buffer written by `save`; anything inconsistent is refused with SampleBufferError."""
        path = Path(path)
        fix = "delete it to start a new buffer (the adapter and checkpoints are unaffected)"
        try:
            files = read_npz(path)
        except NPZ_READ_ERRORS as exc:
            raise SampleBufferError(f"{path}: not a readable sample buffer ({exc}); {fix}") from exc
        try:
            meta = json.loads(str(files.pop(_META)))
            if not isinstance(meta, dict):
                raise ValueError(f"its metadata is a {type(meta).__name__}, not an object")
            if meta.get("format") != BUFFER_FORMAT or meta.get("format_version") != BUFFER_FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('format_version')!r}, this "
                                 f"runtime reads {BUFFER_FORMAT!r} version {BUFFER_FORMAT_VERSION}")
            buffer = cls(meta["capacity"], meta["policy"])
            buffer._rng.bit_generator.state = meta["rng"]
            arrival = files.pop(_ARRIVAL)
            examples = {name[len(_EXAMPLE):]: files.pop(name) for name in list(files) if name.startswith(_EXAMPLE)}
            seen, size = meta["seen"], len(arrival)
            if files or sorted(examples) != meta["names"]:
                raise ValueError(f"stored arrays {sorted(examples)} (+ unexpected {sorted(files)}) do not match "
                                 f"the names {meta['names']}")
            if not (isinstance(seen, int) and size == min(seen, buffer.capacity)):
                raise ValueError(f"it holds {size} examples, which does not fit seen={seen!r} and capacity "
                                 f"{buffer.capacity}")
            if arrival.dtype != np.int64 or len(np.unique(arrival)) != size or (size and not
                                                                               0 <= arrival.min() <= arrival.max() < seen):
                raise ValueError("its arrival positions are not distinct stream positions below seen")
            if any(a.ndim == 0 or len(a) != size or a.dtype.kind not in "biuf" for a in examples.values()):
                raise ValueError("its example arrays are not all numeric with one row per stored example")
        except (KeyError, TypeError, ValueError, RecursionError, LoopConfigError) as exc:
            raise SampleBufferError(f"{path}: inconsistent sample buffer ({exc}); {fix}") from exc
        if examples:
            buffer._storage = {n: np.zeros((buffer.capacity, *a.shape[1:]), a.dtype) for n, a in examples.items()}
            for name, a in examples.items():
                buffer._storage[name][:size] = a
        buffer._arrival[:size] = arrival
        buffer._seen, buffer._size = seen, size
        return buffer
