"""Measurement helpers shared by the benchmarks: memory readings, step-time summaries, child processes.

Stdlib (and numpy, for batches) only: the device-runtime child of a benchmark imports this module and must not
pull in torch or anything else the device does not have.

Peak RSS: on Linux the peak comes from `VmHWM` in /proc/self/status, not from `getrusage().ru_maxrss`. A child
started by a large parent inherits the parent's peak in `ru_maxrss`: the kernel folds the old address space's
high-water mark into the process's maxrss at exec, and Python starts children with vfork, so the "old" address space
is the parent's. A benchmark parent that holds torch and an exported model would thus report its own RSS as every
child's peak. `VmHWM` belongs to the address space the child gets at exec, so it starts from zero. Elsewhere,
`ru_maxrss` is the fallback and the result says so (`peak_rss_source`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "current_rss_bytes",
    "load_batches",
    "measure_training",
    "peak_rss_bytes",
    "summarize_times",
    "time_calls",
    "run_json_child",
    "JSON_MARKER",
]

# The line a child prints its result on starts with this, so stray prints (library warnings) cannot be mistaken
# for the result.
JSON_MARKER = "BENCH_RESULT "


def _proc_status_kib(field: str) -> int | None:
    """A `VmXXX:  N kB` field of /proc/self/status in KiB, or None where there is no procfs."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ru_maxrss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # bytes on macOS, KiB elsewhere


def current_rss_bytes() -> int:
    """Resident set size now; falls back to the peak so far where /proc is missing (never an underestimate)."""
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else _ru_maxrss_bytes()


def peak_rss_bytes() -> tuple[int, str]:
    """(peak resident set size of this process since exec in bytes, which counter it came from)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "VmHWM"
    return _ru_maxrss_bytes(), "ru_maxrss"


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_times(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p90, min and mean of per-step times, in milliseconds."""
    values = sorted(s * 1e3 for s in seconds)
    return {
        "median_ms": _percentile(values, 0.5),
        "p90_ms": _percentile(values, 0.9),
        "min_ms": values[0],
        "mean_ms": sum(values) / len(values),
    }


def time_calls(fn: Callable[[int], float], warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Call `fn(i)` for i in range(warmup + steps); return (every call's result, wall times of the timed calls).

    `fn` must return only after its work is done (a Python float loss does: both backends are synchronous on CPU).
    """
    results: list[float] = []
    times: list[float] = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        results.append(fn(i))
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return results, times


def run_json_child(argv: Sequence[str], *, threads: int, timeout: float, cwd: Path | None = None) -> dict[str, Any]:
    """Run `argv` in a fresh interpreter and return the JSON object it printed after JSON_MARKER.

    The thread-count variables are set to `threads` so that no library in the child starts a pool of its own
    size behind the benchmark's back.
    """
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(JSON_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(
            f"benchmark child {' '.join(argv[1:4])} ... failed (exit {proc.returncode}); its stderr ends with:\n{tail}"
        )
    return json.loads(lines[-1][len(JSON_MARKER):])


def load_batches(path: str) -> list[dict[str, Any]]:
    """The benchmark batches from the .npz the parent wrote: each array is stacked along a leading step axis."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        stacked = {name: data[name] for name in data.files}
    count = len(next(iter(stacked.values())))
    return [{name: np.ascontiguousarray(arr[i]) for name, arr in stacked.items()} for i in range(count)]


def measure_training(open_trainer: Callable[[], Any], spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Open a device trainer (timed) and run the spec's warm-up + timed steps over its batches.

    Returns the trainer and the result fields every device child reports: losses, step times and their summary,
    setup time, RSS before opening (baseline), after opening, and the peak.
    """
    batches = load_batches(spec["batches"])
    baseline = current_rss_bytes()
    start = time.perf_counter()
    trainer = open_trainer()
    setup_s = time.perf_counter() - start
    after_setup = current_rss_bytes()
    losses, times = time_calls(lambda i: trainer.step(batches[i]), spec["warmup"], spec["steps"])
    peak, source = peak_rss_bytes()
    return trainer, {"losses": losses, "step_s": times, **summarize_times(times), "setup_s": setup_s,
                     "baseline_rss": baseline, "after_setup_rss": after_setup, "peak_rss": peak,
                     "peak_rss_source": source}
