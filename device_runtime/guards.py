"""The loop's guards: a memory budget read from /proc, and the held-out score that decides which adapter to keep.

Memory is read from `/proc/self/status` (VmRSS, what the process holds in RAM now) and `/proc/meminfo`
(MemAvailable, what the kernel can hand out without swapping). Both are plain text, so no psutil is needed on
the device. Where /proc is missing (macOS), the process's peak RSS from `resource` stands in for VmRSS: it can
only over-state the current use, so the guard errs on the side of refusing.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

from .errors import LoopConfigError, MemoryBudgetError

__all__ = [
    "MONITORS",
    "MemoryReading",
    "check_limit",
    "check_memory",
    "monitor_score",
    "read_memory",
    "read_rss_bytes",
]

MB = 1 << 20
STATUS_FILE = Path("/proc/self/status")
MEMINFO_FILE = Path("/proc/meminfo")
MONITORS = ("loss", "accuracy")


@dataclass(frozen=True)
class MemoryReading:
    """RAM in bytes: this process's resident set, and what the system can still give (None: unknown here)."""

    rss_bytes: Optional[int]
    available_bytes: Optional[int]

    def to_dict(self) -> dict[str, Optional[float]]:
        """Megabytes, rounded, for reports and --json."""
        as_mb = lambda b: None if b is None else round(b / MB, 1)  # noqa: E731
        return {"rss_mb": as_mb(self.rss_bytes), "available_mb": as_mb(self.available_bytes)}


def _kib_field(path: Path, key: str) -> Optional[int]:
    """The `key:  <n> kB` line of a /proc file, in bytes; None when the file or the line is absent or garbled."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() != key:
            continue
        parts = rest.split()
        if len(parts) == 2 and parts[0].isascii() and parts[0].isdigit() and parts[1] == "kB":
            return int(parts[0]) * 1024
        return None
    return None


def _peak_rss_bytes() -> Optional[int]:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


def read_rss_bytes(status_file: Union[str, Path] = STATUS_FILE) -> Optional[int]:
    """This process's resident set in bytes (VmRSS), or its peak RSS where /proc is missing; None if neither."""
    rss = _kib_field(Path(status_file), "VmRSS")
    if rss is None and Path(status_file) == STATUS_FILE:
        rss = _peak_rss_bytes()
    return rss


def read_memory(status_file: Union[str, Path] = STATUS_FILE,
                meminfo_file: Union[str, Path] = MEMINFO_FILE) -> MemoryReading:
    """Current RSS and MemAvailable; the paths are parameters so tests can feed recorded /proc files."""
    return MemoryReading(read_rss_bytes(status_file), _kib_field(Path(meminfo_file), "MemAvailable"))


def check_memory(budget_mb: Optional[float], min_available_mb: Optional[float],
                 reading: Optional[MemoryReading] = None) -> MemoryReading:
    """Raise MemoryBudgetError if RSS is over `budget_mb` or MemAvailable under `min_available_mb` (None: no limit).

    A limit that cannot be checked on this system is refused too: a guard that silently does nothing is worse
    than none, because the app believes it is protected.
    """
    reading = reading if reading is not None else read_memory()
    if budget_mb is not None:
        if reading.rss_bytes is None:
            raise MemoryBudgetError("cannot read this process's memory use here (no /proc/self/status VmRSS and no "
                                    "resource module); drop the memory budget (--memory-budget-mb) on this system")
        if reading.rss_bytes > budget_mb * MB:
            raise MemoryBudgetError(
                f"the process uses {reading.rss_bytes / MB:.1f} MB of RAM, over the {budget_mb:g} MB budget; "
                "train when the app holds less memory, use a smaller buffer_size or fewer threads, or raise the "
                "budget (--memory-budget-mb)"
            )
    if min_available_mb is not None:
        if reading.available_bytes is None:
            raise MemoryBudgetError("cannot read the system's available memory here (no /proc/meminfo "
                                    "MemAvailable); drop the free-memory floor (--min-available-mb) on this system")
        if reading.available_bytes < min_available_mb * MB:
            raise MemoryBudgetError(
                f"the system has {reading.available_bytes / MB:.1f} MB of RAM available, under the "
                f"{min_available_mb:g} MB floor; train later (e.g. while the device is idle) or lower the floor "
                "(--min-available-mb)"
            )
    return reading


def check_limit(name: str, value: Optional[float]) -> None:
    """Budgets are positive finite megabytes or None."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise LoopConfigError(f"{name} must be a positive number of megabytes or None, got {value!r}; "
                              "e.g. 512")


def monitor_score(metrics: Mapping[str, float], monitor: str) -> float:
    """Held-out score where lower is better: the loss, or minus the accuracy."""
    if monitor == "loss":
        return float(metrics["loss"])
    if monitor == "accuracy":
        if "accuracy" not in metrics:
            raise LoopConfigError("monitor='accuracy' needs a cross-entropy bundle (evaluate reports no accuracy "
                                  "for this loss); use monitor='loss'")
        return -float(metrics["accuracy"])
    raise LoopConfigError(f"unknown monitor {monitor!r}; use one of {list(MONITORS)}")
