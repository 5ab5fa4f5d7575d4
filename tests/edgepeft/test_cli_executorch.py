"""`edgepeft export --backend executorch` then `edgepeft train` on that bundle: the one-flag backend switch.

The loop, checkpoints, resume and adapter export go through the same CLI verbs as for an ONNX bundle; the trained
adapter then loads into the ONNX trainer of the same model, since both backends share the bundle format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgepeft.cli import main

pytest.importorskip("executorch")


@pytest.mark.slow
def test_export_and_train_with_the_executorch_backend(tmp_path: Path) -> None:
    runner = CliRunner()
    bundle = tmp_path / "et"
    result = runner.invoke(main, ["export", "mlp", "--method", "lora,bitfit", "--rank", "4", "--backend", "executorch",
                                  "--max-batch", "16", "--lr", "0.01", "-o", str(bundle), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"].keys() >= {"train.pte", "infer.pte", "adapter.safetensors"}
    manifest = json.loads(runner.invoke(main, ["inspect", str(bundle), "--json"]).stdout)["manifest"]
    assert manifest["backend"] == "executorch" and manifest["executorch"]["dim_bounds"] == {"batch": 16}
    shown = " ".join(runner.invoke(main, ["inspect", str(bundle)]).output.split())
    assert "train.pte on XNNPACK + CPU kernels; bounds {'batch': 16}" in shown

    rng = np.random.default_rng(0)
    data, held_out = tmp_path / "d.npz", tmp_path / "e.npz"
    np.savez(data, x=rng.standard_normal((64, 64)).astype(np.float32), labels=rng.integers(0, 10, 64))
    np.savez(held_out, x=rng.standard_normal((40, 64)).astype(np.float32), labels=rng.integers(0, 10, 40))
    common = [str(bundle), "--data", str(data), "--eval-data", str(held_out), "--batch-size", "16",
              "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "10", "--no-quality-guard", "--json"]
    result = runner.invoke(main, ["train", *common, "--steps", "20"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)
    assert first["step_count"] == 20 and first["last_loss"] < first["first_loss"]
    assert first["before"]["loss"] != first["after"]["loss"]

    result = runner.invoke(main, ["train", *common, "--steps", "10", "--resume", "--adapter-out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step_count"] == 30
    assert (tmp_path / "a" / "adapter.safetensors").is_file()


def test_a_batch_above_the_bound_is_refused_with_the_data_exit_code(tmp_path: Path) -> None:
    """--batch-size above the exported --max-batch: a clear message naming both, not an ExecuTorch error code."""
    runner = CliRunner()
    bundle = tmp_path / "et"
    result = runner.invoke(main, ["export", "mlp", "--method", "bitfit", "--backend", "executorch", "--max-batch", "4",
                                  "-o", str(bundle)])
    assert result.exit_code == 0, result.output
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((32, 64), np.float32), labels=np.zeros(32, np.int64))
    result = runner.invoke(main, ["train", str(bundle), "--data", str(data), "--batch-size", "8", "--steps", "2"])
    assert result.exit_code == 4  # the CLI's data-error code
    assert "batch <= 4" in result.output and "batch" in result.output.lower()
