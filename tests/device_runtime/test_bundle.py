"""Bundle reader and writer: parsed fields, every integrity failure named, atomic replacement."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import pytest
from .handmade_bundle import B_NAME, W_NAME, Handmade, base_manifest, build_bundle, edit_manifest

import device_runtime.bundle as bundle_module
from device_runtime import (
    SGD,
    AdamW,
    BundleError,
    BundleIntegrityError,
    BundleVersionError,
    OutputPathError,
    TensorSpec,
    read_bundle,
    write_bundle,
)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def fresh(tmp_path: Path) -> Handmade:
    return build_bundle(tmp_path / "bundle")


def test_read_parses_every_piece(adamw_bundle: Handmade) -> None:
    b = read_bundle(adamw_bundle.bundle.path)
    assert b.inputs == (TensorSpec("x", "float32", ("batch", 4)),)
    assert b.labels == TensorSpec("labels", "int64", ("batch",))
    assert b.output == TensorSpec("logits", "float32", ("batch", 3))
    assert b.trainable == (TensorSpec(W_NAME, "float32", (3, 3)), TensorSpec(B_NAME, "float32", (3,)))
    assert b.optimizer == AdamW(lr=0.05, weight_decay=0.1)
    assert b.state_names == [f"exp_avg/{W_NAME}", f"exp_avg/{B_NAME}", f"exp_avg_sq/{W_NAME}", f"exp_avg_sq/{B_NAME}"]
    assert b.loss == {"name": "cross_entropy", "ignore_index": -100, "num_classes": 3}
    assert b.graphs == {"train_step": "train_step.onnx", "eval": "eval.onnx", "infer": "infer.onnx"}
    assert b.bundle_id == hashlib.sha256((b.path / "manifest.json").read_bytes()).hexdigest()
    assert b.bundle_id == adamw_bundle.bundle.bundle_id  # the writer's Bundle names the same bytes


def test_manifest_lists_every_file_with_size_and_hash(sgd_bundle: Handmade) -> None:
    root = sgd_bundle.bundle.path
    files = sgd_bundle.bundle.manifest["files"]
    assert sorted(files) == ["adapter.safetensors", "eval.onnx", "infer.onnx", "train_step.onnx", "weights.bin"]
    for name, entry in files.items():
        data = (root / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert files["weights.bin"]["size"] == 4 * 3 * 4  # P is 4x3 float32


def test_bit_flip_in_graph_is_named(fresh: Handmade) -> None:
    flip_byte(fresh.bundle.path / "train_step.onnx", 10)
    with pytest.raises(BundleIntegrityError, match=r"train_step\.onnx: sha256"):
        read_bundle(fresh.bundle.path)
    read_bundle(fresh.bundle.path, verify=False)  # same size: only the hash can catch it


def test_truncated_adapter_is_named(fresh: Handmade) -> None:
    path = fresh.bundle.path / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(BundleIntegrityError, match=r"adapter\.safetensors: size is \d+ bytes.*truncated"):
        read_bundle(fresh.bundle.path, verify=False)  # size is checked even without hashing


def test_edited_hash_in_manifest_is_named(fresh: Handmade) -> None:
    edit_manifest(fresh.bundle.path, lambda m: m["files"]["weights.bin"].update(sha256="ab" * 32))
    with pytest.raises(BundleIntegrityError, match=r"weights\.bin: sha256 .* manifest\.json says abab"):
        read_bundle(fresh.bundle.path)


def test_missing_file_is_named(fresh: Handmade) -> None:
    (fresh.bundle.path / "eval.onnx").unlink()
    with pytest.raises(BundleIntegrityError, match=r"eval\.onnx: listed in manifest\.json but missing"):
        read_bundle(fresh.bundle.path)


def test_missing_manifest(fresh: Handmade) -> None:
    (fresh.bundle.path / "manifest.json").unlink()
    with pytest.raises(BundleIntegrityError, match=r"manifest\.json: missing"):
        read_bundle(fresh.bundle.path)


def test_unknown_format_version_names_both_versions(fresh: Handmade) -> None:
    # A future manifest may drop keys too; the version must be reported before any schema complaint.
    edit_manifest(fresh.bundle.path, lambda m: (m.update(format_version=2), m.pop("loss")))
    with pytest.raises(BundleVersionError, match=r"format_version is 2, this runtime reads format_version 1"):
        read_bundle(fresh.bundle.path)


@pytest.mark.parametrize("bad_name", ["../escape.bin", "/etc/passwd", "sub/../../x", "a\\b", "./weights.bin"])
def test_escaping_file_names_are_refused(fresh: Handmade, bad_name: str) -> None:
    edit_manifest(fresh.bundle.path, lambda m: m["files"].update({bad_name: {"size": 1, "sha256": "0" * 64}}))
    with pytest.raises(BundleError, match="not a plain relative path") as info:
        read_bundle(fresh.bundle.path)
    assert repr(bad_name) in str(info.value)


def test_graph_not_listed_in_files(fresh: Handmade) -> None:
    edit_manifest(fresh.bundle.path, lambda m: m["files"].pop("infer.onnx"))
    with pytest.raises(BundleError, match=r"graph 'infer' refers to 'infer\.onnx', which files does not list"):
        read_bundle(fresh.bundle.path)


def test_adapter_not_listed_in_files(fresh: Handmade) -> None:
    edit_manifest(fresh.bundle.path, lambda m: m["files"].pop("adapter.safetensors"))
    with pytest.raises(BundleError, match=r"files does not list adapter\.safetensors"):
        read_bundle(fresh.bundle.path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("loss"), r"required key 'loss' is missing"),
        (lambda m: m.update(format="onnx-thing"), r"not an edgepeft bundle"),
        (lambda m: m.update(format_version="1"), r"'format_version' must be an integer, got str"),
        (lambda m: m["inputs"][0].update(dtype="float64"), r"dtype 'float64', known dtypes are"),
        (lambda m: m["trainable"][0].update(shape=["r", 3]), r"each dimension must be a non-negative int"),
        (lambda m: m["inputs"][0].update(shape=[-1, 4]), r"dimension -1"),
        (lambda m: m["loss"].update(name="hinge"), r"loss.name is 'hinge'"),
        (lambda m: m["loss"].pop("num_classes"), r"required key loss.'num_classes' is missing"),
        (lambda m: m["optimizer"].update(lr=-1.0), r"optimizer entry is invalid \(lr must be a positive"),
        (lambda m: m["graphs"].pop("eval"), r"an onnx bundle needs graphs .* missing \['eval'\]"),
        (lambda m: m["inputs"][0].update(name="lr"), r"input name 'lr' collides with the graph contract"),
        (lambda m: m["files"]["eval.onnx"].update(size=-3), r"needs a size >= 0"),
        (lambda m: m["trainable"].append(m["trainable"][0]), r"trainable names must be unique"),
    ],
)
def test_schema_errors_name_the_key(fresh: Handmade, edit: Callable[[dict[str, Any]], None], message: str) -> None:
    edit_manifest(fresh.bundle.path, edit)
    with pytest.raises(BundleError, match=message) as info:
        read_bundle(fresh.bundle.path, verify=False)
    assert "manifest.json" in str(info.value)


def test_state_names_must_match_the_optimizer(tmp_path: Path) -> None:
    hm = build_bundle(tmp_path / "b", AdamW())
    edit_manifest(hm.bundle.path, lambda m: m["optimizer"]["state"].reverse())
    with pytest.raises(BundleError, match=r"optimizer\.state names .* do not match what adamw needs"):
        read_bundle(hm.bundle.path, verify=False)


def test_invalid_json(fresh: Handmade) -> None:
    (fresh.bundle.path / "manifest.json").write_text('{"format": ')
    with pytest.raises(BundleError, match=r"manifest\.json: not valid UTF-8 JSON"):
        read_bundle(fresh.bundle.path)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a directory"):
        read_bundle(tmp_path / "nope")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_write_failure_leaves_no_partial_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = bundle_module.write_and_hash

    def failing(data: bytes, dst: Path) -> tuple[int, str]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real(data, dst)

    monkeypatch.setattr(bundle_module, "write_and_hash", failing)
    with pytest.raises(OSError, match="simulated"):
        build_bundle(tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    assert _leftovers(tmp_path) == []


def test_failed_rewrite_keeps_the_old_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = build_bundle(tmp_path / "bundle")

    def failing(data: bytes, dst: Path) -> tuple[int, str]:
        raise OSError("power cut (simulated)")

    monkeypatch.setattr(bundle_module, "write_and_hash", failing)
    with pytest.raises(OSError, match="simulated"):
        build_bundle(tmp_path / "bundle", seed=1)
    assert read_bundle(tmp_path / "bundle").bundle_id == old.bundle.bundle_id
    assert _leftovers(tmp_path) == []


def test_rewrite_replaces_the_bundle(tmp_path: Path) -> None:
    old = build_bundle(tmp_path / "bundle")
    (tmp_path / "bundle" / "stale.txt").write_text("from the old bundle")
    new = build_bundle(tmp_path / "bundle", SGD(lr=0.2), seed=1)
    assert new.bundle.bundle_id != old.bundle.bundle_id
    assert read_bundle(tmp_path / "bundle").bundle_id == new.bundle.bundle_id
    assert not (tmp_path / "bundle" / "stale.txt").exists()
    assert _leftovers(tmp_path) == []


def test_write_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    with pytest.raises(OutputPathError, match="not empty and has no manifest.json"):
        build_bundle(home)
    assert (home / "notes.txt").read_text() == "precious"


def test_write_copies_path_sources(tmp_path: Path, sgd_bundle: Handmade) -> None:
    src = sgd_bundle.bundle.path
    files = {name: src / name for name in sgd_bundle.bundle.manifest["files"]}
    b = write_bundle(tmp_path / "copy", base_manifest(SGD(lr=0.1)), files)
    assert b.bundle_id == sgd_bundle.bundle.bundle_id  # same manifest, same files -> same bytes, same id
    assert read_bundle(tmp_path / "copy").bundle_id == b.bundle_id


def test_write_validates_before_writing(tmp_path: Path) -> None:
    manifest = base_manifest(SGD())
    manifest["loss"]["num_classes"] = 0
    with pytest.raises(BundleError, match="loss.num_classes must be >= 1"):
        write_bundle(tmp_path / "b", manifest, {"adapter.safetensors": b"", "train_step.onnx": b"",
                                                 "eval.onnx": b"", "infer.onnx": b""})
    with pytest.raises(BundleError, match="already has a 'files' entry"):
        write_bundle(tmp_path / "b", {**base_manifest(SGD()), "files": {}}, {})
    with pytest.raises(BundleError, match=r"files does not list adapter\.safetensors"):
        write_bundle(tmp_path / "b", base_manifest(SGD()), {"train_step.onnx": b"", "eval.onnx": b"",
                                                             "infer.onnx": b""})
    with pytest.raises(BundleError, match="not a plain relative path"):
        write_bundle(tmp_path / "b", base_manifest(SGD()), {"../x": b""})
    assert os.listdir(tmp_path) == []
