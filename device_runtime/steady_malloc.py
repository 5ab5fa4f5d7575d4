"""Pin glibc's mmap threshold so a train step's peak memory is the same from run to run.

Why: glibc malloc serves blocks above its mmap threshold (128 KB to start) with their own mapping, returned to the
OS on free, and smaller ones from the heap. The threshold is *dynamic*: the first time a mapped block is freed,
glibc raises it to that block's size. onnxruntime allocates some per-step buffers outside its arena (with an int8
base, the per-layer dequantized weights of the backward: 0.6 and 2.4 MB for MiniLM, 71 per step), so after the
first step those come from the heap, and whether the heap can reuse or trim the space they leave depends on how
they interleave with everything else the process allocates. glibc also raises its trim threshold with it, so
the freed space is kept. Measured on MiniLM int8 + recompute, the benchmark's child process and batches, runs
interleaved: peak RSS 158-167 MB in 4 of 4 runs unpinned (139-164 in another session of 4), against 142-150 MB with
the threshold fixed at 4 MB (mallopt turns the dynamic adjustment off, and the trim threshold stays at its 128 KB
default); step times 554-650 vs 526-571 ms, a cost of up to ~5% that this machine's noise does not resolve. At
1 MB: 141-151 MB and ~6% slower steps (the 2.4 MB buffers are mapped afresh each time). int8-dynamic and fp32
bundles measured the same either way.

This is process-wide, like the shared arena in `sessions`. It is done once, on glibc only, and not when the user
chose a threshold already (the MALLOC_MMAP_THRESHOLD_ environment variable). It uses ctypes from the standard
library; other C libraries (Android's bionic, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["pin_mmap_threshold", "MMAP_THRESHOLD_BYTES"]

MMAP_THRESHOLD_BYTES = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
_PINNED: bool | None = None  # None: not tried yet in this process


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD_BYTES` (once per process); True if it is pinned by us."""
    global _PINNED
    if _PINNED is None:
        _PINNED = False
        if platform.libc_ver()[0] == "glibc" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _PINNED = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            except (OSError, AttributeError):  # no loadable libc or no mallopt: keep the allocator's defaults
                _PINNED = False
    return _PINNED
