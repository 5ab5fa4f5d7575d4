"""Crash-safe file and directory writes, and chunked sha256 hashing, shared by bundles, checkpoints and adapters.

Devices lose power mid-write. Every file the runtime produces is therefore written next to its final place,
fsynced, and renamed over the old one, so a reader sees either the old version or the new one, never a torn
file. Hashing reads in fixed-size chunks because bundle graphs and weights can be hundreds of MB.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputPathError

__all__ = [
    "CHUNK_SIZE",
    "atomic_write_file",
    "copy_and_hash",
    "fsync_dir",
    "fsync_file",
    "remove_stale_temps",
    "sha256_file",
    "staged_dir",
    "write_and_hash",
]

CHUNK_SIZE = 1 << 20


def sha256_file(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks so large weights never sit in memory whole."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def copy_and_hash(src: Path, dst: Path) -> tuple[int, str]:
    """Copy `src` to `dst` and hash it in the same pass (one read of a large file instead of two)."""
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(CHUNK_SIZE):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return size, digest.hexdigest()


def write_and_hash(data: bytes, dst: Path) -> tuple[int, str]:
    """Write `data` to a new file `dst` (fsynced) and return its size and sha256."""
    with open(dst, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data), hashlib.sha256(data).hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk so that a later rename cannot expose an empty file after a crash."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk; a no-op where directories cannot be opened."""
    if os.name == "nt":  # Windows cannot open a directory for fsync; NTFS journals the rename itself.
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp files that `atomic_write_file(path, ...)` left behind when its process was killed mid-write.

    Only the caller knows no other writer of `path` is running (a checkpoint directory has one trainer), so this
    is a separate call rather than something every write does. Returns what was removed.
    """
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for leftover in path.parent.glob(f"{glob.escape(_temp_prefix(path))}*.tmp"):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def atomic_write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Have `write` fill a temp file beside `path`, then fsync it and `os.replace` it into place.

    The temp file lives in the same directory so the rename never crosses a filesystem (which would make it a
    non-atomic copy). On any failure the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _check_replaceable(out_dir: Path, marker: str) -> None:
    """Refuse to replace anything but a missing dir, an empty dir, or one of ours (it holds `marker`).

    Replacing a directory deletes the old one; without this check a typo such as `-o ~` would erase a home dir.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputPathError(f"{out_dir} exists and is not a directory; pass a new directory path")
    if any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise OutputPathError(
            f"refusing to replace {out_dir}: it is not empty and has no {marker}, so it was not written by "
            "edgepeft; pass a new or empty directory"
        )


def _replace_dir(staged: Path, out_dir: Path) -> None:
    """Rename `staged` to `out_dir`, moving an existing `out_dir` aside first and deleting it only afterwards."""
    old: Path | None = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()  # mkdtemp only reserved a unique name; rename needs it absent
        os.rename(out_dir, old)
    try:
        os.rename(staged, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)  # put the previous version back: never leave out_dir missing
        raise
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(out_dir: Path, marker: str) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success fsync its files and swap it in, on error delete it.

    `marker` is the file that identifies a directory we wrote (e.g. `manifest.json`), which is what allows an
    existing `out_dir` to be replaced. Files written into the staged dir should already be fsynced by the
    caller; the directory itself is fsynced here before the rename.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_replaceable(out_dir, marker)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        yield staged
        for root, _dirs, _files in os.walk(staged):
            fsync_dir(Path(root))
        _check_replaceable(out_dir, marker)  # again: someone may have created it while we were writing
        _replace_dir(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
