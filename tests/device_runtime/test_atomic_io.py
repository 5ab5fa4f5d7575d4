"""Chunked hashing and the temp-then-rename writers that bundles, checkpoints and adapters share."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import device_runtime.atomic_io as atomic_io
from device_runtime.atomic_io import atomic_write_file, copy_and_hash, sha256_file, staged_dir


def test_hashing_across_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic_io, "CHUNK_SIZE", 7)
    data = bytes(range(256)) * 3 + b"tail"
    src = tmp_path / "src"
    src.write_bytes(data)
    expected = (len(data), hashlib.sha256(data).hexdigest())
    assert sha256_file(src) == expected
    assert copy_and_hash(src, tmp_path / "dst") == expected
    assert (tmp_path / "dst").read_bytes() == data


def test_atomic_write_file_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_file(target, lambda tmp: tmp.write_bytes(b"old"))

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"ne")
        raise RuntimeError("crash (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        atomic_write_file(target, crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_staged_dir_swaps_in_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_dir(out, marker="mark") as staged:
        (staged / "mark").write_text("1")
    with staged_dir(out, marker="mark") as staged:
        (staged / "mark").write_text("2")
    assert (out / "mark").read_text() == "2"
    with pytest.raises(KeyError):
        with staged_dir(out, marker="mark") as staged:
            (staged / "mark").write_text("3")
            raise KeyError("crash (simulated)")
    assert (out / "mark").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
