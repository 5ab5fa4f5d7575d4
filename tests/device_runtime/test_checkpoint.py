"""Checkpoints: round trip, exact resume, refusal of foreign/corrupt/mismatched files, atomic replacement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from .handmade_bundle import B_NAME, W_NAME, Handmade, build_bundle, make_batch
from safetensors.numpy import save_file

import device_runtime.checkpoint as checkpoint_module
from device_runtime import CheckpointError, Trainer, load_checkpoint, save_checkpoint
from device_runtime.checkpoint import CHECKPOINT_FILE, payload_sha256


def _tensors(hm: Handmade, scale: float = 1.0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    trainable = {W_NAME: hm.weight * scale, B_NAME: hm.bias * scale}
    state = {s.name: np.full(s.shape, 0.5, np.float32) for s in hm.bundle.optimizer_state}
    return trainable, state


def _write_raw(path: Path, tensors: dict[str, np.ndarray], **metadata: str) -> None:
    """A checkpoint written around the runtime's checks, to test that loading catches what saving prevents."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "edgepeft-checkpoint", "format_version": "1", "step": "3",
            "payload_sha256": payload_sha256(tensors), **metadata}
    save_file(tensors, str(path / CHECKPOINT_FILE), metadata=meta)


def test_round_trip(tmp_path: Path, adamw_bundle: Handmade) -> None:
    trainable, state = _tensors(adamw_bundle)
    file = save_checkpoint(tmp_path / "ck", adamw_bundle.bundle.bundle_id, 7, trainable, state)
    assert file == tmp_path / "ck" / "checkpoint.safetensors"
    step, loaded_t, loaded_s = load_checkpoint(tmp_path / "ck", adamw_bundle.bundle)
    assert step == 7
    assert loaded_t.keys() == trainable.keys() and loaded_s.keys() == state.keys()
    for name in trainable:
        np.testing.assert_array_equal(loaded_t[name], trainable[name])
    for name in state:
        np.testing.assert_array_equal(loaded_s[name], state[name])


def test_resume_continues_identically(tmp_path: Path, adamw_bundle: Handmade) -> None:
    rng = np.random.default_rng(10)
    batches = [make_batch(rng, n=5) for _ in range(6)]
    straight = Trainer.open(adamw_bundle.bundle.path, threads=1)
    for batch in batches[:3]:
        straight.step(batch)
    straight.save_checkpoint(tmp_path / "ck")
    straight_losses = [straight.step(batch) for batch in batches[3:]]

    resumed = Trainer.open(adamw_bundle.bundle.path, checkpoint=tmp_path / "ck", threads=1)
    assert resumed.step_count == 3
    assert [resumed.step(batch) for batch in batches[3:]] == straight_losses
    assert resumed.step_count == straight.step_count == 6
    for mine, theirs in ((resumed.trainable_state(), straight.trainable_state()),
                         (resumed.optimizer_state(), straight.optimizer_state())):
        for name in theirs:
            np.testing.assert_array_equal(mine[name], theirs[name])


def test_checkpoint_of_another_bundle_is_refused(tmp_path: Path, adamw_bundle: Handmade) -> None:
    tr = Trainer.open(adamw_bundle.bundle.path)
    tr.save_checkpoint(tmp_path / "ck")
    other = build_bundle(tmp_path / "other", adamw_bundle.optimizer, seed=3)
    with pytest.raises(CheckpointError, match="belongs to the bundle with id") as info:
        Trainer.open(other.bundle.path, checkpoint=tmp_path / "ck")
    assert adamw_bundle.bundle.bundle_id in str(info.value)
    assert other.bundle.bundle_id in str(info.value)


def test_flipped_tensor_byte_is_refused(tmp_path: Path, adamw_bundle: Handmade) -> None:
    trainable, state = _tensors(adamw_bundle)
    file = save_checkpoint(tmp_path / "ck", adamw_bundle.bundle.bundle_id, 1, trainable, state)
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x10  # the last bytes are tensor data: safetensors alone would not notice
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"safetensors: tensor data does not match its payload_sha256"):
        load_checkpoint(tmp_path / "ck", adamw_bundle.bundle)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_file_is_refused(tmp_path: Path, sgd_bundle: Handmade, damage: str) -> None:
    trainable, state = _tensors(sgd_bundle)
    file = save_checkpoint(tmp_path / "ck", sgd_bundle.bundle.bundle_id, 1, trainable, state)
    file.write_bytes(file.read_bytes()[:40] if damage == "truncate" else b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"checkpoint\.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path / "ck", sgd_bundle.bundle)


def test_missing_checkpoint(tmp_path: Path, sgd_bundle: Handmade) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint\.safetensors: missing"):
        load_checkpoint(tmp_path / "nothing", sgd_bundle.bundle)


@pytest.mark.parametrize(
    ("mutate", "metadata", "message"),
    [
        (lambda t: t.pop(f"trainable::{B_NAME}"), {}, r"missing \['head.bias'\]"),
        (lambda t: t.update({"trainable::extra": np.zeros(2, np.float32)}), {}, r"unexpected \['extra'\]"),
        (lambda t: t.update({"junk": np.zeros(2, np.float32)}), {}, r"unexpected tensors \['junk'\]"),
        (lambda t: t.update({f"trainable::{B_NAME}": np.zeros(4, np.float32)}), {}, r"has shape \[4\]"),
        (lambda t: t.update({f"trainable::{B_NAME}": np.zeros(3, np.float16)}), {}, r"has dtype float16"),
        (lambda t: t[f"trainable::{W_NAME}"].__setitem__((0, 0), np.nan), {}, r"holds NaN or Inf"),
        (lambda t: None, {"format_version": "2"}, r"format_version is '2', this runtime reads 1"),
        (lambda t: None, {"format": "other"}, r"not an edgepeft checkpoint"),
        (lambda t: None, {"step": "-1"}, r"step is '-1'"),
    ],
)
def test_mismatched_contents_are_refused(  # type: ignore[no-untyped-def]
    tmp_path: Path, sgd_bundle: Handmade, mutate, metadata, message
) -> None:
    tensors = {f"trainable::{W_NAME}": sgd_bundle.weight.copy(), f"trainable::{B_NAME}": sgd_bundle.bias.copy()}
    mutate(tensors)
    _write_raw(tmp_path / "ck", tensors, bundle_id=sgd_bundle.bundle.bundle_id, **metadata)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(tmp_path / "ck", sgd_bundle.bundle)
    assert "checkpoint.safetensors" in str(info.value)


def test_save_refuses_non_finite_and_keeps_the_old_checkpoint(tmp_path: Path, sgd_bundle: Handmade) -> None:
    trainable, state = _tensors(sgd_bundle)
    save_checkpoint(tmp_path / "ck", sgd_bundle.bundle.bundle_id, 1, trainable, state)
    trainable[B_NAME] = np.array([0.0, np.inf, 0.0], np.float32)
    with pytest.raises(CheckpointError, match="refusing to save 'trainable::head.bias'"):
        save_checkpoint(tmp_path / "ck", sgd_bundle.bundle.bundle_id, 2, trainable, state)
    assert load_checkpoint(tmp_path / "ck", sgd_bundle.bundle)[0] == 1


def test_failed_write_keeps_the_old_checkpoint(tmp_path: Path, sgd_bundle: Handmade,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    trainable, state = _tensors(sgd_bundle)
    save_checkpoint(tmp_path / "ck", sgd_bundle.bundle.bundle_id, 1, trainable, state)

    def half_write(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        Path(filename).write_bytes(b"half a file")
        raise OSError("power cut (simulated)")

    monkeypatch.setattr(checkpoint_module, "save_file", half_write)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ck", sgd_bundle.bundle.bundle_id, 2, _tensors(sgd_bundle, 2.0)[0], state)
    step, loaded, _ = load_checkpoint(tmp_path / "ck", sgd_bundle.bundle)
    assert step == 1
    np.testing.assert_array_equal(loaded[W_NAME], sgd_bundle.weight)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["checkpoint.safetensors"]


def test_save_argument_checks(tmp_path: Path, sgd_bundle: Handmade) -> None:
    trainable, state = _tensors(sgd_bundle)
    with pytest.raises(CheckpointError, match="step must be a non-negative int"):
        save_checkpoint(tmp_path / "ck", sgd_bundle.bundle.bundle_id, -1, trainable, state)
    with pytest.raises(CheckpointError, match="bundle_id must be the bundle's 64-hex sha256"):
        save_checkpoint(tmp_path / "ck", "not-an-id", 1, trainable, state)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        save_checkpoint(tmp_path / "file", sgd_bundle.bundle.bundle_id, 1, trainable, state)
