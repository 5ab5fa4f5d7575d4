"""Bundle integrity: damage to ANY bundle file (bit flips, truncation, growth, swaps, deletion) and tampering with
the manifest are refused with an error that names the damaged file; unknown format versions are refused.

test_bundle.py covers one example of each failure; this suite sweeps every file of a handmade bundle and of a
real exported one, flips bits all over manifest.json, and separates a lying-but-consistent manifest (names the
file it lies about) from a manifest edited after export (names manifest.json).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
from .damage import flipped
from .handmade_bundle import Handmade, build_bundle, edit_manifest

from device_runtime import AdamW, BundleError, BundleIntegrityError, BundleVersionError, Trainer, read_bundle
from device_runtime.bundle import Bundle

FILES = ["manifest.json", "train_step.onnx", "eval.onnx", "infer.onnx", "weights.bin", "adapter.safetensors"]


def flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[min(len(data) - 1, int(len(data) * where))] ^= 0x04
    path.write_bytes(bytes(data))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "flip_first_byte": lambda p: flip(p, 0.0),
    "flip_middle_byte": lambda p: flip(p, 0.5),
    "flip_last_byte": lambda p: flip(p, 1.0),
    "truncate": lambda p: p.write_bytes(p.read_bytes()[:-7]),
    "append": lambda p: p.write_bytes(p.read_bytes() + b"{}"),
    "empty": lambda p: p.write_bytes(b""),
    "delete": lambda p: p.unlink(),
}


@pytest.fixture
def fresh(tmp_path: Path) -> Handmade:
    return build_bundle(tmp_path / "bundle")


def refused(bundle_dir: Path, verify: bool = True) -> BundleError:
    with pytest.raises(BundleError) as info:
        read_bundle(bundle_dir, verify=verify)
    return info.value


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", FILES)
def test_any_damage_to_any_file_is_refused_naming_it(fresh: Handmade, name: str, damage: str) -> None:
    DAMAGE[damage](fresh.bundle.path / name)
    error = refused(fresh.bundle.path)
    assert str(error).startswith(str(fresh.bundle.path / name) + ":"), str(error)
    if name != "manifest.json" or damage == "delete":
        assert isinstance(error, BundleIntegrityError)


@pytest.mark.parametrize("name", FILES[1:])
def test_size_changes_are_caught_even_without_hashing(fresh: Handmade, name: str) -> None:
    """verify=False skips the sha256 pass (slow on big weights) but still checks sizes, which catches truncation."""
    DAMAGE["truncate"](fresh.bundle.path / name)
    error = refused(fresh.bundle.path, verify=False)
    assert isinstance(error, BundleIntegrityError) and f"{name}: size is" in str(error)


@pytest.mark.parametrize(
    ("name", "source"),
    [("train_step.onnx", "other/train_step.onnx"), ("eval.onnx", "infer.onnx"), ("infer.onnx", "eval.onnx"),
     ("weights.bin", "other/weights.bin"), ("adapter.safetensors", "other/adapter.safetensors")],
)
def test_a_swapped_file_is_refused(tmp_path: Path, fresh: Handmade, name: str, source: str) -> None:
    """A file from another bundle (other weights, other optimizer) or a mixed-up graph of the same bundle."""
    build_bundle(tmp_path / "other", AdamW(), seed=5)
    origin = tmp_path / source if source.startswith("other/") else fresh.bundle.path / source
    assert origin.read_bytes() != (fresh.bundle.path / name).read_bytes()
    shutil.copyfile(origin, fresh.bundle.path / name)
    assert str(refused(fresh.bundle.path)).startswith(str(fresh.bundle.path / name) + ":")


def test_every_bit_flip_across_the_manifest_is_refused(fresh: Handmade) -> None:
    """All 8 bits of every byte of manifest.json (a few thousand reads: the checksum needs no file hashing)."""
    path = fresh.bundle.path / "manifest.json"
    original = json.loads(path.read_bytes())
    outcomes = {"integrity": 0, "json": 0, "same_content": 0}
    for offset in range(path.stat().st_size):
        for bit in range(8):
            with flipped(path, offset, 1 << bit):
                try:
                    bundle = read_bundle(fresh.bundle.path, verify=False)
                except BundleError as exc:
                    assert str(exc).startswith(str(path)), str(exc)  # blames the manifest, never another file
                    outcomes["integrity" if isinstance(exc, BundleIntegrityError) else "json"] += 1
                    continue
            assert bundle.manifest == original  # only a whitespace byte can change harmlessly
            outcomes["same_content"] += 1
    # Most flips keep valid JSON and change a value (only the checksum catches those); the rest break the JSON.
    total = sum(outcomes.values())
    assert outcomes["integrity"] > total // 3 and outcomes["json"] > total // 10, outcomes
    assert outcomes["same_content"] < 20, outcomes


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["optimizer"].update(lr=0.5),  # would silently change every step's default lr
        lambda m: m["loss"].update(ignore_index=-1),  # would silently change which labels count
        lambda m: m.update(created_by="someone else"),
        lambda m: m["files"]["weights.bin"].update(sha256="ab" * 32),
        lambda m: m["files"].pop("infer.onnx"),
        lambda m: m.pop("manifest_sha256"),
    ],
    ids=["lr", "ignore_index", "created_by", "file_hash", "file_entry", "checksum"],
)
def test_manifest_edited_after_export_is_refused(fresh: Handmade, edit: Callable) -> None:
    edit_manifest(fresh.bundle.path, edit, reseal=False)
    error = refused(fresh.bundle.path, verify=False)
    assert isinstance(error, BundleIntegrityError)
    assert str(error).startswith(str(fresh.bundle.path / "manifest.json") + ": ")
    assert "manifest_sha256" in str(error)


@pytest.mark.parametrize("name", FILES[1:])
def test_consistent_manifest_that_lies_about_a_file_names_that_file(fresh: Handmade, name: str) -> None:
    """A manifest whose checksum is right but whose size or hash for a file is wrong (a buggy exporter)."""
    edit_manifest(fresh.bundle.path, lambda m: m["files"][name].update(size=m["files"][name]["size"] + 1))
    assert f"{name}: size is" in str(refused(fresh.bundle.path, verify=False))
    edit_manifest(fresh.bundle.path, lambda m: m["files"][name].update(size=m["files"][name]["size"] - 1,
                                                                        sha256="0" * 64))
    assert f"{name}: sha256 is" in str(refused(fresh.bundle.path))


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000 + b"]" * 100_000, b'{"format": ' + b"1" * 5000 + b"}", b"\xff\xfe{}", b"null", b"[]",
     b'{"format": NaN}', b"\x00" * 64],
    ids=["deep_nesting", "huge_int", "not_utf8", "null", "list", "nan", "zeros"],
)
def test_hostile_manifest_json_is_refused_cleanly(fresh: Handmade, content: bytes) -> None:
    (fresh.bundle.path / "manifest.json").write_bytes(content)
    assert str(refused(fresh.bundle.path)).startswith(str(fresh.bundle.path / "manifest.json") + ":")


@pytest.mark.parametrize(
    ("version", "error", "message"),
    [
        (2, BundleVersionError, r"format_version is 2, this runtime reads format_version 1"),
        (0, BundleVersionError, r"format_version is 0, this runtime reads format_version 1"),
        (10**30, BundleVersionError, r"format_version is 1000000000000000000000000000000"),
        ("1", BundleError, r"'format_version' must be an integer, got str"),
        (1.0, BundleError, r"'format_version' must be an integer, got float"),
        (True, BundleError, r"'format_version' must be an integer, got bool"),
        (None, BundleError, r"'format_version' must be an integer, got NoneType"),
    ],
)
def test_unknown_format_versions_are_refused(fresh: Handmade, version: object, error: type, message: str) -> None:
    # Resealed: the version check must win over the checksum either way, so a future bundle reads as "too new".
    for reseal in (True, False):
        edit_manifest(fresh.bundle.path, lambda m: m.update(format_version=version), reseal=reseal)
        with pytest.raises(error, match=message):
            read_bundle(fresh.bundle.path)
    edit_manifest(fresh.bundle.path, lambda m: m.pop("format_version"))
    with pytest.raises(BundleError, match="required key 'format_version' is missing"):
        read_bundle(fresh.bundle.path)


def test_trainer_open_refuses_damage_before_building_sessions(fresh: Handmade) -> None:
    flip(fresh.bundle.path / "weights.bin", 0.5)  # would give silently wrong frozen weights if not caught
    with pytest.raises(BundleIntegrityError, match=r"weights\.bin: sha256"):
        Trainer.open(fresh.bundle.path)


# ---- the same sweep over a real exported bundle (onnx graphs with external data, a real adapter) ----
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip_middle_byte", "flip_last_byte", "truncate"])
def test_real_exported_bundle_every_file(tmp_path: Path, exported_mlp: Bundle, damage: str) -> None:
    names = sorted(exported_mlp.manifest["files"]) + ["manifest.json"]
    assert {"train_step.onnx", "eval.onnx", "infer.onnx", "weights.bin", "adapter.safetensors"} <= set(names)
    for name in names:
        copy = tmp_path / f"{name}-{damage}"
        shutil.copytree(exported_mlp.path, copy)
        read_bundle(copy)  # the copy itself is fine
        DAMAGE[damage](copy / name)
        error = refused(copy)
        assert str(error).startswith(str(copy / name) + ":"), str(error)
