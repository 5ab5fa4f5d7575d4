"""`edgepeft package`: what a package holds, that it verifies itself, and that it trains on the device side.

The launcher runs here in a fresh interpreter with only the unpacked package on its path (its own device_runtime
copy); the aarch64 run of the same package is in tests/aarch64.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from device_runtime.safe_unpack import safe_extract
from edgepeft.cli import main
from edgepeft.deploy import build_package

from ..aarch64.host_tools import digits_npz, export_builtin

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory) -> Path:
    return export_builtin("mlp", tmp_path_factory.mktemp("mlp") / "bundle", methods="lora,bitfit")


@pytest.fixture(scope="module")
def rpi4_package(mlp_bundle: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "build.tar.gz"
    result = CliRunner().invoke(main, ["package", str(mlp_bundle), "--target", "rpi4", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["target"] == "rpi4"
    return out


def _unpack(package: Path, dest: Path) -> Path:
    safe_extract(package, dest)
    return dest


def test_linux_package_contents_and_checksums(rpi4_package: Path, tmp_path: Path) -> None:
    root = _unpack(rpi4_package, tmp_path / "device")
    manifest = json.loads((root / "package.json").read_text())
    assert manifest["format"] == "edgepeft-package" and manifest["target"]["id"] == "rpi4"
    names = set(manifest["files"])
    assert {"run_personalization.py", "requirements.txt", "README.txt", "bundle/manifest.json",
            "bundle/weights.bin", "device_runtime/trainer.py", "device_runtime/loop.py"} <= names
    assert not any(n.startswith("mobile/") for n in names)
    for name, entry in manifest["files"].items():
        data = (root / name).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], name
    requirements = (root / "requirements.txt").read_text()
    assert "onnxruntime==1.27.0" in requirements and "--only-binary=:all:" in requirements
    assert manifest["runtime"]["requirements"] == ["numpy==2.2.6", "onnxruntime==1.27.0", "safetensors==0.6.2"]
    with tarfile.open(rpi4_package) as tar:  # reproducible: root-owned, dated 0
        assert {(m.uid, m.gid, m.mtime) for m in tar.getmembers()} == {(0, 0, 0)}


def test_linux_package_is_reproducible(mlp_bundle: Path, rpi4_package: Path, tmp_path: Path) -> None:
    again = build_package(mlp_bundle, "rpi4", tmp_path / "again.tar.gz")
    assert again.sha256 == hashlib.sha256(rpi4_package.read_bytes()).hexdigest()


def _launch(root: Path, *args: str) -> subprocess.CompletedProcess:
    # -I: isolated mode, so neither the repository nor an installed edgepeft is importable; only the package is.
    return subprocess.run([sys.executable, "-I", str(root / "run_personalization.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=root)


def test_launcher_trains_from_the_unpacked_package(rpi4_package: Path, tmp_path: Path) -> None:
    root = _unpack(rpi4_package, tmp_path / "device")
    data = digits_npz(tmp_path / "user.npz", n=256)
    proc = _launch(root, "--data", str(data), "--steps", "60", "--batch-size", "32", "--json",
                   "--adapter-out", str(tmp_path / "adapter"), "--checkpoint-dir", str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    losses = result["losses"]
    assert len(losses) == 60 and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert result["onnxruntime"] == ort.__version__ and result["peak_rss_bytes"] > 0
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "ckpt" / "checkpoint.safetensors").is_file()


def test_launcher_refuses_a_changed_file(rpi4_package: Path, tmp_path: Path) -> None:
    root = _unpack(rpi4_package, tmp_path / "device")
    weights = root / "bundle" / "weights.bin"
    raw = bytearray(weights.read_bytes())
    raw[100] ^= 0xFF
    weights.write_bytes(bytes(raw))
    proc = _launch(root, "--data", str(digits_npz(tmp_path / "user.npz", n=32)), "--steps", "1")
    assert proc.returncode == 3 and "changed since packaging" in proc.stderr


def test_mobile_package_has_ort_models_that_match_the_onnx_step(mlp_bundle: Path, tmp_path: Path) -> None:
    result = build_package(mlp_bundle, "android-qnn", tmp_path / "android.tar.gz")
    root = _unpack(result.path, tmp_path / "device")
    assert {"mobile/train_step.ort", "mobile/infer.ort", "mobile/eval.ort",
            "mobile/required_operators_and_types.config"} <= set(result.files)
    assert "requirements.txt" not in result.files
    config = (root / "mobile" / "required_operators_and_types.config").read_text()
    assert "ai.onnx;" in config and "Gemm" in config and "/tmp" not in config
    # One train step through the ORT-format graph gives the loss of the ONNX graph it was converted from.
    onnx_session = ort.InferenceSession(str(mlp_bundle / "train_step.onnx"), providers=["CPUExecutionProvider"])
    ort_session = ort.InferenceSession(str(root / "mobile" / "train_step.ort"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in onnx_session.get_inputs():
        shape = [8 if isinstance(d, str) else d for d in arg.shape]
        if arg.type == "tensor(int64)":
            feeds[arg.name] = rng.integers(0, 10, shape).astype(np.int64)
        else:
            feeds[arg.name] = (np.array(1.0, np.float32) if arg.name == "step"
                               else rng.standard_normal(shape).astype(np.float32) * 0.1)
    feeds["lr"] = np.array(1e-3, np.float32)
    expected = onnx_session.run(["loss"], feeds)[0]
    np.testing.assert_allclose(ort_session.run(["loss"], feeds)[0], expected, rtol=1e-5)


def test_package_rejects_unknown_target(mlp_bundle: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["package", str(mlp_bundle), "--target", "nokia-3310", "-o",
                                       str(tmp_path / "x.tar.gz")])
    assert result.exit_code == 2 and not (tmp_path / "x.tar.gz").exists()


def test_device_side_files_import_only_the_runtime_stack() -> None:
    """The launcher and the measurement child run where torch and edgepeft are absent: stdlib + runtime only."""
    import ast

    from edgepeft.deploy.package import LAUNCHER
    from edgepeft.profiling.measure import CHILD

    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "safetensors", "device_runtime"}
    for source in (LAUNCHER, CHILD):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{source.name}: relative import (it runs as a script)"
                names = [node.module or ""]
            else:
                continue
            assert all(n.split(".")[0] in allowed for n in names), f"{source.name}: imports {names}"
