"""Smoke test of `benchmarks/train_step.py`: it runs end to end on a tiny config and reports sane numbers.

The benchmark runs in a subprocess exactly as a user runs it. Nothing here asserts speed or memory ratios (they
depend on the machine); only that both backends produced positive measurements, trained the same tensors and agree
on the losses, and that the device-runtime child never loaded torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "train_step.py"
STEPS, WARMUP, REPEATS = 3, 1, 2


@pytest.mark.slow
def test_train_step_benchmark_runs_on_a_tiny_config(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--configs", "tiny", "--steps", str(STEPS), "--warmup", str(WARMUP),
         "--repeats", str(REPEATS), "--batch", "4", "--seq", "16", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tiny" in proc.stdout  # the table was printed

    report = json.loads(out.read_text())
    assert report["settings"]["threads"] == 1
    (result,) = report["results"]
    assert result["config"] == "tiny"
    assert 0 < result["trainable_params"] < result["total_params"]
    assert result["export_s"] > 0 and result["bundle_bytes"] > 0

    ort, torch = result["backends"]["ort"], result["backends"]["torch"]
    for backend in (ort, torch):
        assert backend["threads"] == 1
        assert len(backend["step_s"]) == STEPS * REPEATS and all(t > 0 for t in backend["step_s"])
        assert len(backend["run_median_ms"]) == REPEATS and backend["runs_max_rel_loss_diff"] <= 1e-3
        assert len(backend["losses"]) == STEPS + WARMUP
        for key in ("median_ms", "p90_ms", "setup_s", "baseline_rss", "after_setup_rss", "peak_rss"):
            assert backend[key] > 0, key
        assert backend["peak_rss"] >= backend["baseline_rss"]
    assert ort["host_modules_loaded"] == []
    assert ort["trainable"] == torch["trainable"]

    assert result["losses_agree"] is True
    assert ort["losses"] == pytest.approx(torch["losses"], rel=1e-3)
    assert result["ratios"]["time_torch_over_ort"] > 0 and result["ratios"]["peak_rss_ort_over_torch"] > 0
