"""The core CLI verbs through click's runner: quickstart, export, inspect, and their exit codes on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepeft.cli import main


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.slow
def test_quickstart_personalizes_and_reports_json(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["quickstart", "-o", str(tmp_path), "--steps", "120", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["user"]["after"]["accuracy"] > report["user"]["before"]["accuracy"] + 0.3
    assert report["trainable_params"] < report["total_params"] * 0.2
    for name in ("bundle/manifest.json", "checkpoint/checkpoint.safetensors", "adapter/adapter.safetensors",
                 "user_train.npz", "user_test.npz"):
        assert (tmp_path / name).exists(), name


@pytest.mark.slow
def test_export_then_inspect_then_train(runner: CliRunner, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    result = runner.invoke(main, ["export", "mlp", "--method", "lora,bitfit", "--rank", "4", "--quant", "int8",
                                  "--optimizer", "sgd", "--lr", "0.05", "-o", str(bundle), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["trainable_params"] > 0 and (bundle / "train_step.onnx").exists()

    result = runner.invoke(main, ["inspect", str(bundle), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["quantization"]["scheme"] == "int8"
    assert [m["name"] for m in manifest["methods"]] == ["lora", "bitfit"]
    assert manifest["optimizer"]["name"] == "sgd"

    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((64, 64)).astype(np.float32), labels=rng.integers(0, 10, 64))
    result = runner.invoke(main, ["train", str(bundle), "--data", str(data), "--steps", "30", "--batch-size", "16",
                                  "--json"])
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    assert trained["step_count"] == 30
    assert trained["last_loss"] < trained["first_loss"]


def test_export_int8_dynamic_records_the_gradient_choice(runner: CliRunner, tmp_path: Path) -> None:
    for flags, gradients in (([], "int8"), (["--fp32-gradients"], "fp32")):
        bundle = tmp_path / gradients
        result = runner.invoke(main, ["export", "mlp", "--method", "lora", "--rank", "4", "--quant", "int8-dynamic",
                                      *flags, "-o", str(bundle), "--json"])
        assert result.exit_code == 0, result.output
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["quantization"]["scheme"] == "int8-dynamic"
        assert manifest["quantization"]["input_gradients"] == gradients
    result = runner.invoke(main, ["export", "mlp", "--method", "lora", "--quant", "int8", "--fp32-gradients",
                                  "-o", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "only applies to 'int8-dynamic'" in result.output
    assert not (tmp_path / "bad").exists()


def test_inspect_refuses_a_tampered_bundle_with_exit_code_3(runner: CliRunner, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"format": "edgepeft-bundle", "format_version": 99}))
    result = runner.invoke(main, ["inspect", str(bundle)])
    assert result.exit_code == 3
    assert "format_version" in result.output or "version" in result.output


def test_export_rejects_bad_configuration_with_exit_code_6(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["export", "mlp", "--rank", "0", "-o", str(tmp_path / "b")])
    assert result.exit_code == 6
    assert "rank" in result.output


def test_export_unknown_model_names_the_known_ones(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["export", "resnet9000", "-o", str(tmp_path / "b")])
    assert result.exit_code == 6
    assert "mlp" in result.output and "transformer" in result.output


def test_export_recompute_is_recorded_and_refused_where_it_cannot_apply(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["export", "transformer", "--rank", "4", "--recompute", "-o", str(tmp_path / "t"),
                                  "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["recompute"]["checkpoint_op"] == "LayerNormalization"
    result = runner.invoke(main, ["export", "mlp", "--recompute", "-o", str(tmp_path / "m")])
    assert result.exit_code != 0 and "LayerNormalization checkpoints" in result.output
    result = runner.invoke(main, ["export", "transformer", "--recompute", "--backend", "executorch",
                                  "-o", str(tmp_path / "e")])
    assert result.exit_code == 2 and "--recompute is for --backend onnx" in result.output
    result = runner.invoke(main, ["export", "transformer", "--rank", "4", "--recompute", "--recompute-keep-last", "3",
                                  "-o", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    kept = json.loads((tmp_path / "k" / "manifest.json").read_text())["recompute"]["segments"]
    assert kept == manifest["recompute"]["segments"] - 1
    result = runner.invoke(main, ["export", "transformer", "--recompute-keep-last", "3", "-o", str(tmp_path / "n")])
    assert result.exit_code == 2 and "--recompute-keep-last needs --recompute" in result.output


def test_export_rematerializes_by_default_and_can_be_turned_off(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["export", "transformer", "--rank", "4", "-o", str(tmp_path / "on")])
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "on" / "manifest.json").read_text())["rematerialize"]
    assert entry["tensors"] > 0 and entry["released_bytes"] > entry["kept_bytes"]
    assert entry["expanding_matmuls"] is False
    result = runner.invoke(main, ["export", "transformer", "--rank", "4", "--rematerialize-matmuls",
                                  "-o", str(tmp_path / "mm")])
    assert result.exit_code == 0, result.output
    matmuls = json.loads((tmp_path / "mm" / "manifest.json").read_text())["rematerialize"]
    assert matmuls["expanding_matmuls"] is True and matmuls["released_bytes"] > entry["released_bytes"]
    result = runner.invoke(main, ["export", "transformer", "--no-rematerialize", "--rematerialize-matmuls",
                                  "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--rematerialize-matmuls is for --backend onnx, with --rematerialize" in result.output
    result = runner.invoke(main, ["export", "transformer", "--rank", "4", "--no-rematerialize", "-o", str(tmp_path / "off")])
    assert result.exit_code == 0, result.output
    assert "rematerialize" not in json.loads((tmp_path / "off" / "manifest.json").read_text())
    result = runner.invoke(main, ["export", "transformer", "--no-rematerialize", "--backend", "executorch",
                                  "-o", str(tmp_path / "e")])
    assert result.exit_code == 2 and "--no-rematerialize is for --backend onnx" in result.output
    assert not (tmp_path / "e").exists()
