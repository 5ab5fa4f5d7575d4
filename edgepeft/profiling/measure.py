"""Run the measurement children (`device_child.py`) in fresh interpreters and summarize what they report.

The children are started by file path with the directory that holds `device_runtime` on their path, so they never
import `edgepeft`, torch or onnx (an import hook in the child enforces it). `measure_command` is public so a test
can run the very same command under `/usr/bin/time -v` and compare peak RSS.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import device_runtime

from ..errors import EdgePeftError
from . import device_child

__all__ = ["ProfileError", "measure_command", "run_child", "summarize_ms"]

CHILD = Path(device_child.__file__).resolve()
RUNTIME_ROOT = Path(device_runtime.__file__).resolve().parent.parent


class ProfileError(EdgePeftError):
    """A measurement child failed or printed no result."""


def measure_command(phase: str, bundle: Path, options: dict[str, Any], python: str | None = None) -> list[str]:
    """argv of one measurement child: `phase` is "measure" (latency + memory) or "ops" (onnxruntime profiler)."""
    return [python or sys.executable, str(CHILD), phase, str(RUNTIME_ROOT), str(Path(bundle).resolve()),
            json.dumps(options, sort_keys=True)]


def parse_child_output(stdout: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(device_child.MARKER)]
    if not lines:
        raise ProfileError("the measurement child printed no result line")
    return json.loads(lines[-1][len(device_child.MARKER):])


def run_child(phase: str, bundle: Path, options: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one child and return its JSON result; its stderr tail is in the error if it fails."""
    proc = subprocess.run(measure_command(phase, bundle, options), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ProfileError(f"the {phase} child exited with {proc.returncode}:\n{tail}")
    result = parse_child_output(proc.stdout)
    if result["forbidden_modules_loaded"]:
        raise ProfileError(f"the {phase} child loaded {result['forbidden_modules_loaded']}; the device runtime must "
                           "not need torch, onnx or the host packages")
    return result


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_ms(seconds: list[float]) -> dict[str, float]:
    """Median, p90, min and mean of per-call wall times, in milliseconds."""
    values = sorted(s * 1e3 for s in seconds)
    return {"median_ms": _percentile(values, 0.5), "p90_ms": _percentile(values, 0.9), "min_ms": values[0],
            "mean_ms": sum(values) / len(values), "n": len(values)}
