"""A packaged build trains in a genuine aarch64 userland under qemu user-mode emulation.

`scripts/aarch64_userland.sh` builds (once, cached in ~/.cache/edgepeft-aarch64) Debian 12's arm64 python3.11 plus
the aarch64 wheels the package's requirements.txt pins; the package is unpacked there with the runtime's
`safe_extract` and its launcher trains on scikit-learn digits. No torch exists in that userland.

Peak RSS is read inside the emulated process (VmHWM) and so includes qemu's own memory: it is reported with that
label. Wall times under emulation say nothing about a device and are not reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgepeft.deploy import build_package

from .host_tools import REPO, digits_npz, export_builtin, is_offline

pytestmark = pytest.mark.slow
SCRIPT = REPO / "scripts" / "aarch64_userland.sh"
CACHE = Path(os.environ.get("EDGEPEFT_AARCH64_CACHE", Path.home() / ".cache" / "edgepeft-aarch64"))


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("aarch64")
    bundle = export_builtin("mlp", work / "bundle", methods="lora,bitfit")
    return build_package(bundle, "rpi4", work / "build.tar.gz").path


@pytest.fixture(scope="module")
def emulated_python(package: Path, tmp_path_factory) -> str:
    """The userland's python wrapper, built from the very requirements.txt the package ships."""
    requirements = tmp_path_factory.mktemp("req") / "requirements.txt"
    with tarfile.open(package) as tar:
        requirements.write_bytes(tar.extractfile("requirements.txt").read())
    proc = subprocess.run(["bash", str(SCRIPT), str(CACHE), str(requirements)], capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0:
        if is_offline(proc.stderr):
            pytest.skip(f"the aarch64 userland needs apt and pip, which are unreachable: {proc.stderr[-400:]}")
        pytest.fail(f"aarch64_userland.sh failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def _emulated(python: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([python, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_userland_is_aarch64_without_torch(emulated_python: str, tmp_path: Path) -> None:
    probe = ("import importlib.util, platform, json; print(json.dumps({'machine': platform.machine(), "
             "'torch': importlib.util.find_spec('torch') is not None, 'edgepeft': "
             "importlib.util.find_spec('edgepeft') is not None}))")
    proc = _emulated(emulated_python, "-I", "-c", probe, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"machine": "aarch64", "torch": False, "edgepeft": False}


def test_package_trains_under_qemu(emulated_python: str, package: Path, tmp_path: Path, record_property) -> None:
    device = tmp_path / "device"
    unpack = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from device_runtime.safe_unpack import safe_extract; "
              f"print(len(safe_extract({str(package)!r}, {str(device)!r})))")
    proc = _emulated(emulated_python, "-c", unpack, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (device / "run_personalization.py").is_file()

    train = digits_npz(tmp_path / "user.npz", n=320, seed=1)
    held_out = digits_npz(tmp_path / "held_out.npz", n=128, seed=2)
    proc = _emulated(emulated_python, str(device / "run_personalization.py"), "--data", str(train),
                     "--eval-data", str(held_out), "--steps", "40", "--batch-size", "32", "--json",
                     "--adapter-out", str(tmp_path / "adapter"), cwd=device)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    pins = dict(line.split("==") for line in (device / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert result["machine"] == "aarch64"
    assert result["onnxruntime"] == pins["onnxruntime"] and result["numpy"] == pins["numpy"]
    losses = result["losses"]
    assert len(losses) == 40 and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert result["after"]["loss"] < result["before"]["loss"]
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    summary = {"peak_rss_bytes_including_qemu_overhead": result["peak_rss_bytes"],
               "loss_first": losses[0], "loss_last": losses[-1], "held_out_before": result["before"],
               "held_out_after": result["after"], "onnxruntime": result["onnxruntime"],
               "note": "aarch64 under qemu-user: RSS includes the emulator; emulated timings are not device timings"}
    record_property("aarch64_qemu", json.dumps(summary))
    print("aarch64 (qemu user-mode) run:", json.dumps(summary))
