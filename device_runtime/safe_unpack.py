"""Unpack a package tarball on the device without letting any entry write or point outside the target directory.

A tarball is untrusted input. An entry named `/etc/x` or `../../x`, a symlink pointing out of the target (or a
later entry written through a symlink), a hard link to a file elsewhere, or a device node can each make a naive
`extractall` write, expose or clobber files outside. So every entry is checked before anything is written, and
only regular files, directories and links that stay inside are accepted: hard links become plain copies,
symlinks are created as given and then resolved on disk to prove they stay inside (a chain of links is where
a name-only check goes wrong). Extraction goes to a staging directory beside the target that is renamed into
place, so a refused or broken tarball leaves nothing behind. Modes keep only rwx bits (no setuid/setgid, no
group/other write) and ownership is never restored. Stdlib `tarfile` only.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .atomic_io import CHUNK_SIZE, staged_dir
from .errors import PackageError
from .manifest_schema import MANIFEST_FILE

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_ENTRIES", "safe_extract"]

DEFAULT_MAX_BYTES = 4 << 30  # a bundle of a small model is MBs; this only stops decompression bombs
DEFAULT_MAX_ENTRIES = 10_000
_FILE, _DIR, _SYMLINK = "file", "dir", "symlink"
_KINDS = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO",
          tarfile.CONTTYPE: "a contiguous file"}


@dataclass(frozen=True)
class _Entry:
    name: str  # normalised relative path
    kind: str
    member: tarfile.TarInfo
    link_target: str = ""  # symlinks: as stored; hard links: the normalised name of the file it copies


def _relative_name(raw: str, refuse) -> str:  # type: ignore[no-untyped-def]
    """`raw` as a clean relative POSIX path ('' for the archive root); absolute paths and '..' are refused."""
    if "\x00" in raw or "\\" in raw or ":" in raw:
        refuse(f"has the name {raw!r} with a NUL, '\\' or ':' (a Windows path or drive)")
    if raw.startswith("/"):
        refuse(f"has the absolute path {raw!r}")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        refuse(f"has the path {raw!r}, which climbs out with '..'")
    return "/".join(parts)


def _plan(tar: tarfile.TarFile, source: Path, max_bytes: int, max_entries: int) -> list[_Entry]:
    """Check every entry before anything is written; return what to extract, in archive order."""
    kinds: dict[str, str] = {}  # every path the archive creates, explicit or as a parent, by kind
    plan: list[_Entry] = []
    sizes: dict[str, int] = {}  # regular files, for hard links that copy them
    total = 0
    for count, member in enumerate(tar, start=1):
        def refuse(problem: str, member: tarfile.TarInfo = member) -> None:
            raise PackageError(f"{source}: entry {member.name!r} {problem}; refusing to unpack this tarball "
                               "(rebuild it with `edgepeft package`, and do not install packages from unknown "
                               "sources)")

        if count > max_entries:
            refuse(f"is past the limit of {max_entries} entries (raise max_entries if the package is genuine)")
        name = _relative_name(member.name, refuse)
        if not name:
            if member.isdir():
                continue  # the archive's own root, "./"
            refuse("has an empty name")
        parents = name.split("/")[:-1]
        for depth in range(1, len(parents) + 1):
            parent = "/".join(parents[:depth])
            if kinds.setdefault(parent, _DIR) != _DIR:
                refuse(f"would be written through {parent!r}, which is a {kinds[parent]} in this archive")
        if name in kinds and not (member.isdir() and kinds[name] == _DIR):
            refuse("appears twice (a later entry would replace the earlier one)")
        if member.isreg():
            total += member.size
            if total > max_bytes:
                refuse(f"takes the unpacked size past {max_bytes} bytes (raise max_bytes if the package is genuine)")
            entry = _Entry(name, _FILE, member)
            sizes[name] = member.size
        elif member.isdir():
            entry = _Entry(name, _DIR, member)
        elif member.issym():
            target = member.linkname
            if not target or target.startswith("/") or "\x00" in target or "\\" in target or ":" in target:
                refuse(f"is a symlink to {target!r}, outside the target directory (absolute or empty)")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if resolved == ".." or resolved.startswith("../"):
                refuse(f"is a symlink to {target!r}, which points outside the target directory")
            entry = _Entry(name, _SYMLINK, member, target)
        elif member.islnk():
            # A copy of an earlier file in this archive; linking to anything else could expose a file outside.
            target = _relative_name(member.linkname, lambda p: refuse(f"is a hard link whose target {p}"))
            if kinds.get(target) != _FILE:
                refuse(f"is a hard link to {member.linkname!r}, which is not a regular file earlier in this archive")
            sizes[name] = sizes[target]
            total += sizes[target]
            if total > max_bytes:
                refuse(f"takes the unpacked size past {max_bytes} bytes (raise max_bytes if the package is genuine)")
            entry = _Entry(name, _FILE, member, target)
        else:
            refuse(f"is {_KINDS.get(member.type, f'of tar type {member.type!r}')}, which a package never needs")
        kinds[name] = entry.kind
        plan.append(entry)
    return plan


def _write_file(tar: tarfile.TarFile, entry: _Entry, path: Path, budget: list[int], source: Path) -> None:
    data = tar.extractfile(entry.member)
    if data is None:
        raise PackageError(f"{source}: entry {entry.name!r} has no readable data; the tarball is damaged")
    with data, open(path, "xb") as out:  # "x": never follow or replace something already at `path`
        while chunk := data.read(CHUNK_SIZE):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise PackageError(f"{source}: unpacking {entry.name!r} exceeds the size limit; the tarball "
                                   "declares less data than it holds")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(path, (entry.member.mode & 0o755) | 0o600)


def _extract(tar: tarfile.TarFile, plan: list[_Entry], root: Path, max_bytes: int, source: Path) -> None:
    os.chmod(root, 0o755)  # the staging dir is private (mkdtemp); the unpacked package is not
    budget = [max_bytes]
    for entry in plan:
        path = root / entry.name
        path.parent.mkdir(parents=True, exist_ok=True)
        if entry.kind == _DIR:
            path.mkdir(exist_ok=True)
        elif entry.kind == _SYMLINK:
            os.symlink(entry.link_target, path)
        else:
            _write_file(tar, entry, path, budget, source)
    # On disk every link is resolved the way the OS will resolve it later, chains of links included.
    real_root = os.path.realpath(root)
    for entry in plan:
        if entry.kind == _SYMLINK:
            resolved = os.path.realpath(root / entry.name)
            if os.path.commonpath([real_root, resolved]) != real_root:
                raise PackageError(f"{source}: entry {entry.name!r} is a symlink to {entry.link_target!r}, which "
                                   "resolves outside the target directory through other links; refusing to unpack "
                                   "this tarball")
    for entry in plan:
        if entry.kind == _DIR:
            os.chmod(root / entry.name, (entry.member.mode & 0o755) | 0o700)


def safe_extract(
    tar_path: Union[str, Path],
    dest: Union[str, Path],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    marker: str = MANIFEST_FILE,
) -> list[str]:
    """Unpack `tar_path` (plain, .gz, .bz2 or .xz) into `dest` atomically; return the unpacked names, sorted.

    `dest` must be missing, empty, or an earlier unpack: a directory holding `marker` (manifest.json for a bundle
    tarball, package.json for an `edgepeft package`). It is replaced only once the whole tarball has been
    unpacked and checked, so an update that fails leaves the previous version in place.
    """
    source = Path(tar_path)
    try:
        with tarfile.open(source, mode="r:*") as tar:
            plan = _plan(tar, source, max_bytes, max_entries)
            with staged_dir(Path(dest), marker=marker) as staged:
                _extract(tar, plan, staged, max_bytes, source)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise PackageError(f"{source}: not a readable tarball ({exc}); copy the package to the device again") from exc
    except FileNotFoundError as exc:
        if not source.is_file():
            raise PackageError(f"{source}: no such file; pass the path of the package tarball") from exc
        raise
    return sorted(entry.name for entry in plan)

