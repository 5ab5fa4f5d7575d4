"""Build a deployable package (a .tar.gz) of a bundle for one target device.

Layout of the tarball (names relative to where it is unpacked):
    package.json              what this is: target, bundle id, runtime pins and why, every file's size and sha256
    bundle/                   the bundle, verbatim (its own manifest.json lists and hashes its files)
    device_runtime/           the runtime's source, so the device needs only wheels (numpy, onnxruntime, safetensors)
    run_personalization.py    the launcher: verifies the package, runs device_runtime.loop.personalize on an .npz
    requirements.txt          linux targets: pinned wheels that resolve for the target's ABI
    mobile/                   android / ios targets: ORT-format graphs + required_operators_and_types.config
    README.txt                how to install and run it

Unpack it on the device with `device_runtime.safe_unpack.safe_extract` (or `tar -xzf` for a package you built).
The tarball is built in a temp file next to the output and renamed into place; entries are sorted, owned by root
and dated at 0, so a linux package is byte-for-byte reproducible (onnxruntime's ORT-format conversion is not, so
mobile packages differ in the .ort files between builds).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

import device_runtime
from device_runtime import read_bundle

from ..errors import ConfigError
from ..profiles import load_profile

__all__ = ["PackageResult", "build_package", "LAUNCHER", "REQUIREMENTS_DIR"]

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "run_personalization.py"
REQUIREMENTS_DIR = HERE / "requirements"
RUNTIME_DIR = Path(device_runtime.__file__).resolve().parent
PACKAGE_FORMAT, PACKAGE_FORMAT_VERSION = "edgepeft-package", 1
# What onnxruntime 1.27 (the pinned device runtime) is proven to load: the graphs the exporter writes today.
MAX_IR_VERSION, MAX_ONNX_OPSET = 10, 21


@dataclass(frozen=True)
class PackageResult:
    path: Path
    target: str
    files: dict[str, dict]
    size: int
    sha256: str


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_graphs_loadable(bundle, pinned: str) -> None:
    """Refuse graphs newer than the pinned device onnxruntime is proven to load (IR version, ai.onnx opset)."""
    for graph in bundle.graphs:
        model = onnx.load(str(bundle.graph_path(graph)), load_external_data=False)
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        if model.ir_version > MAX_IR_VERSION or opset > MAX_ONNX_OPSET:
            raise ConfigError(f"{bundle.graph_path(graph)}: IR version {model.ir_version}, opset {opset}; the "
                              f"device runtime pinned for this target ({pinned}) is proven only up to IR "
                              f"{MAX_IR_VERSION} / opset {MAX_ONNX_OPSET}; re-export with an older opset")


def _mobile_files(bundle, workdir: Path) -> dict[str, bytes]:
    """ORT-format graphs and the reduced-operator config for an onnxruntime minimal build (arm, fixed style)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    source = workdir / "onnx"
    out = workdir / "ort"
    source.mkdir()
    for name in [*bundle.graphs.values(), "weights.bin"]:
        if (bundle.path / name).is_file():
            shutil.copy2(bundle.path / name, source / name)
    # The converter prints progress on stdout and logs on stderr; keep both off ours (`--json` stays one document).
    converter_log = logging.getLogger("ort_format_model.utils")
    level = converter_log.level
    converter_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            convert_onnx_models_to_ort(source, output_dir=out, optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform="arm", enable_type_reduction=True)
    finally:
        converter_log.setLevel(level)
    files = {f"mobile/{p.name}": p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    # The config's header names the temp paths it was generated from; name the packaged files instead.
    config = "mobile/required_operators_and_types.config"
    files[config] = files[config].replace(str(out).encode() + b"/", b"mobile/")
    return files


def _readme(profile: dict, mobile: bool) -> str:
    lines = [f"edgepeft package for {profile['name']} ({profile['id']})", ""]
    if mobile:
        lines += [
            "This target has no Python wheels for onnxruntime; run the graphs from your app:",
            "  mobile/*.ort                                  ORT-format graphs (train_step, eval, infer), weights inside",
            "  mobile/required_operators_and_types.config    pass to onnxruntime's build.py --include_ops_by_config",
            "                                                (with --minimal_build) for a reduced-operator runtime",
            "The train-step contract (inputs trainable::*, state::*, step, lr; outputs new_*) is in",
            "bundle/manifest.json; device_runtime/trainer.py is the reference driver of that loop.",
            f"Runtime packages: {'; '.join(profile['runtime'].get('packages', []))}",
        ]
    else:
        lines += [
            "On the device (Python 3.10-3.13, 64-bit OS):",
            "  python3 -m pip install -r requirements.txt",
            "  python3 run_personalization.py --data user.npz --eval-data held_out.npz --steps 100 \\",
            "      --checkpoint-dir ckpt --adapter-out adapter",
            "run_personalization.py checks every file against package.json before it trains.",
        ]
    return "\n".join(lines) + "\n"


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def build_package(bundle_dir: Path | str, target: str, out_path: Path | str) -> PackageResult:
    """Verify the bundle, gather everything the target needs and write `out_path` (.tar.gz) atomically."""
    bundle = read_bundle(bundle_dir)
    profile = load_profile(target)
    out_path = Path(out_path)
    mobile = profile["kind"] in ("android", "ios")
    files: dict[str, bytes] = {}
    for name in sorted(bundle.manifest["files"]) + ["manifest.json"]:
        files[f"bundle/{name}"] = (bundle.path / name).read_bytes()
    for source in sorted(RUNTIME_DIR.glob("*.py")):
        files[f"device_runtime/{source.name}"] = source.read_bytes()
    files["run_personalization.py"] = LAUNCHER.read_bytes()
    runtime: dict = {"kind": profile["kind"], "os_abi": profile["os_abi"]}
    if mobile:
        import onnxruntime

        with tempfile.TemporaryDirectory(prefix="edgepeft-ort-") as tmp:
            files.update(_mobile_files(bundle, Path(tmp)))
        runtime.update(packages=profile["runtime"].get("packages", []), converter_onnxruntime=onnxruntime.__version__,
                       note="use the onnxruntime mobile package of the same version as the converter "
                            f"({onnxruntime.__version__}) to load these ORT-format graphs")
    else:
        requirements = (REQUIREMENTS_DIR / "linux-aarch64.txt").read_bytes()
        pins = [ln for ln in requirements.decode().splitlines() if "==" in ln and not ln.startswith("#")]
        _check_graphs_loadable(bundle, ", ".join(pins))
        files["requirements.txt"] = requirements
        runtime.update(requirements=pins, why=[ln[2:] for ln in requirements.decode().splitlines()
                                                if ln.startswith("# ")])
    files["README.txt"] = _readme(profile, mobile).encode()
    manifest = {
        "format": PACKAGE_FORMAT, "format_version": PACKAGE_FORMAT_VERSION,
        "created_by": f"edgepeft {__import__('edgepeft').__version__}",
        "target": {"id": profile["id"], "name": profile["name"]},
        "bundle_id": bundle.bundle_id, "model": bundle.manifest["model"],
        "launcher": None if mobile else "run_personalization.py",
        "runtime": runtime,
        "files": {name: {"size": len(data), "sha256": _sha256(data)} for name, data in sorted(files.items())},
    }
    files["package.json"] = (json.dumps(manifest, indent=2) + "\n").encode()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; a package is meant to be copied around and read
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for name in sorted(files):
                        mode = 0o755 if name == "run_personalization.py" else 0o644
                        _add(tar, name, files[name], mode)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_name, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    data = out_path.read_bytes()
    return PackageResult(out_path, target, manifest["files"], len(data), _sha256(data))
