"""Memory readings from /proc (real and recorded), the budget checks' messages, and the held-out score."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from device_runtime import MemoryBudgetError
from device_runtime.guards import MemoryReading, check_memory, monitor_score, read_memory
from device_runtime.errors import LoopConfigError

STATUS = "Name:\tpython\nVmPeak:\t  900000 kB\nVmRSS:\t  204800 kB\nThreads:\t4\n"
MEMINFO = "MemTotal:  8000000 kB\nMemFree:  100000 kB\nMemAvailable:  1048576 kB\n"


def test_reads_recorded_proc_files(tmp_path: Path) -> None:
    (tmp_path / "status").write_text(STATUS)
    (tmp_path / "meminfo").write_text(MEMINFO)
    reading = read_memory(tmp_path / "status", tmp_path / "meminfo")
    assert reading == MemoryReading(rss_bytes=200 << 20, available_bytes=1 << 30)
    assert reading.to_dict() == {"rss_mb": 200.0, "available_mb": 1024.0}


def test_garbled_or_missing_files_read_as_unknown(tmp_path: Path) -> None:
    (tmp_path / "status").write_text("VmRSS:\t  lots kB\n")
    (tmp_path / "meminfo").write_text("MemAvailable: 12 MB\n")
    assert read_memory(tmp_path / "status", tmp_path / "meminfo") == MemoryReading(None, None)
    assert read_memory(tmp_path / "nope", tmp_path / "nope") == MemoryReading(None, None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_real_proc_reading_tracks_an_allocation() -> None:
    before = read_memory()
    assert before.rss_bytes is not None and before.available_bytes is not None
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MB, touched so it is resident
    grown = read_memory().rss_bytes - before.rss_bytes
    assert 60 << 20 < grown < 80 << 20
    del block


def test_budget_checks_name_the_numbers_and_the_fix() -> None:
    reading = MemoryReading(rss_bytes=300 << 20, available_bytes=100 << 20)
    assert check_memory(400, 50, reading) is reading
    assert check_memory(None, None, reading) is reading
    with pytest.raises(MemoryBudgetError, match=r"uses 300\.0 MB of RAM, over the 256 MB budget; .*--memory-budget-mb"):
        check_memory(256, None, reading)
    with pytest.raises(MemoryBudgetError, match=r"has 100\.0 MB of RAM available, under the 128 MB floor"):
        check_memory(None, 128, reading)
    with pytest.raises(MemoryBudgetError, match=r"cannot read this process's memory use here"):
        check_memory(256, None, MemoryReading(None, None))
    with pytest.raises(MemoryBudgetError, match=r"cannot read the system's available memory here"):
        check_memory(None, 128, MemoryReading(1, None))


def test_monitor_score_is_lower_is_better() -> None:
    metrics = {"loss": 0.5, "accuracy": 0.75}
    assert monitor_score(metrics, "loss") == 0.5
    assert monitor_score(metrics, "accuracy") == -0.75
    with pytest.raises(LoopConfigError, match="needs a cross-entropy bundle"):
        monitor_score({"loss": 0.5}, "accuracy")
    with pytest.raises(LoopConfigError, match="unknown monitor 'f1'"):
        monitor_score(metrics, "f1")
