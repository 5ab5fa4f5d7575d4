"""Packaged tarballs: safe_extract unpacks a genuine package and refuses every entry that could write, link or
point outside the target directory, leaving nothing behind (no target, no staging dir, nothing outside).

The malicious tarballs are built entry by entry with tarfile, the way an attacker would build them.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Iterable

import pytest
from .handmade_bundle import Handmade

from device_runtime import OutputPathError, PackageError, Trainer, read_bundle, safe_extract


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "", mode: int = 0o644
          ) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def make_tar(path: Path, entries: Iterable[tuple[tarfile.TarInfo, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return path


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """tmp/place/{pkg.tar.gz, out/} with tmp/outside as the file an attack aims at."""
    (tmp_path / "place").mkdir()
    return tmp_path / "place"


def assert_left_nothing(place: Path) -> None:
    assert sorted(p.name for p in place.iterdir()) == ["pkg.tar.gz"]  # no target dir, no .out.staging-*
    assert not (place.parent / "outside").exists() and not (place.parent / "evil").exists()
    assert not Path("/tmp/edgepeft-evil").exists()


def test_a_packaged_bundle_unpacks_and_verifies(place: Path, adamw_bundle: Handmade) -> None:
    src = adamw_bundle.bundle.path
    with tarfile.open(place / "pkg.tar.gz", "w:gz") as tar:
        tar.add(src, arcname=".")  # like `tar -C bundle -czf pkg.tar.gz .`: names start with "./"
    names = safe_extract(place / "pkg.tar.gz", place / "out")
    assert names == sorted(p.name for p in src.iterdir())
    assert read_bundle(place / "out").bundle_id == adamw_bundle.bundle.bundle_id
    Trainer.open(place / "out")
    assert sorted(p.name for p in place.iterdir()) == ["out", "pkg.tar.gz"]
    # Unpacking a newer package over an unpacked bundle (it holds manifest.json) replaces it whole.
    make_tar(place / "pkg.tar.gz", [entry("manifest.json", data=b"{}"), entry("notes/readme.txt", data=b"hi")])
    assert safe_extract(place / "pkg.tar.gz", place / "out") == ["manifest.json", "notes/readme.txt"]
    assert sorted(p.name for p in (place / "out").iterdir()) == ["manifest.json", "notes"]
    assert stat.S_IMODE((place / "out").stat().st_mode) == 0o755
    # An `edgepeft package` is marked by package.json instead; without the marker a package dir is not replaced.
    make_tar(place / "pkg.tar.gz", [entry("package.json", data=b"{}"), entry("bundle/manifest.json", data=b"{}")])
    safe_extract(place / "pkg.tar.gz", place / "app", marker="package.json")
    safe_extract(place / "pkg.tar.gz", place / "app", marker="package.json")  # an update replaces it
    with pytest.raises(OutputPathError, match="not empty and has no manifest.json"):
        safe_extract(place / "pkg.tar.gz", place / "app")


def test_links_that_stay_inside_are_kept_and_modes_are_tamed(place: Path) -> None:
    make_tar(place / "pkg.tar.gz", [
        entry("bin", tarfile.DIRTYPE, mode=0o7777),
        entry("bin/tool", data=b"#!/bin/sh\n", mode=0o6777),  # setuid + setgid + world-writable
        entry("data/weights.bin", data=b"\x01\x02"),
        entry("data/latest", tarfile.SYMTYPE, link="weights.bin"),
        entry("data/copy.bin", tarfile.LNKTYPE, link="data/weights.bin"),
        entry("up", tarfile.SYMTYPE, link="data/../bin/tool"),
    ])
    out = place / "out"
    safe_extract(place / "pkg.tar.gz", out)
    assert stat.S_IMODE((out / "bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "bin").stat().st_mode) == 0o755
    assert os.readlink(out / "data/latest") == "weights.bin" and (out / "data/latest").read_bytes() == b"\x01\x02"
    copy = out / "data/copy.bin"
    assert not copy.is_symlink() and copy.read_bytes() == b"\x01\x02"
    assert (out / "data/weights.bin").stat().st_nlink == 1  # a copy, not a hard link
    assert (out / "up").read_bytes() == b"#!/bin/sh\n"


MALICIOUS = {
    "absolute": ([entry("/tmp/edgepeft-evil", data=b"x")], r"has the absolute path '/tmp/edgepeft-evil'"),
    "dotdot": ([entry("../evil", data=b"x")], r"has the path '../evil', which climbs out with '\.\.'"),
    "dotdot_inside": ([entry("ok/../../evil", data=b"x")], r"climbs out with '\.\.'"),
    "backslash": ([entry("..\\evil", data=b"x")], r"with a NUL, '\\' or ':'"),
    "drive": ([entry("C:evil", data=b"x")], r"with a NUL, '\\' or ':'"),
    "symlink_absolute": ([entry("link", tarfile.SYMTYPE, link="/etc/passwd")],
                         r"is a symlink to '/etc/passwd', outside the target directory"),
    "symlink_up": ([entry("link", tarfile.SYMTYPE, link="../outside")],
                   r"is a symlink to '../outside', which points outside"),
    "symlink_deep_up": ([entry("a/b/link", tarfile.SYMTYPE, link="../../../outside")], r"points outside"),
    "write_through_symlink": ([entry("link", tarfile.SYMTYPE, link="sub"), entry("sub", tarfile.DIRTYPE),
                               entry("link/evil", data=b"x")],
                              r"'link/evil' would be written through 'link', which is a symlink"),
    "symlink_chain": ([entry("x", tarfile.DIRTYPE), entry("b", tarfile.SYMTYPE, link="."),
                       entry("a", tarfile.SYMTYPE, link="b/x/../..")],
                      r"'a' is a symlink to 'b/x/\.\./\.\.', which resolves outside the target directory"),
    "hardlink_absolute": ([entry("h", tarfile.LNKTYPE, link="/etc/passwd")],
                          r"is a hard link whose target has the absolute path '/etc/passwd'"),
    "hardlink_up": ([entry("h", tarfile.LNKTYPE, link="../outside")], r"hard link whose target has the path"),
    "hardlink_unknown": ([entry("h", tarfile.LNKTYPE, link="not/here")],
                         r"is a hard link to 'not/here', which is not a regular file earlier in this archive"),
    "hardlink_to_symlink": ([entry("s", tarfile.SYMTYPE, link="f"), entry("f", data=b"x"),
                             entry("h", tarfile.LNKTYPE, link="s")], r"not a regular file earlier"),
    "char_device": ([entry("dev/null", tarfile.CHRTYPE)], r"is a character device, which a package never needs"),
    "block_device": ([entry("sda", tarfile.BLKTYPE)], r"is a block device"),
    "fifo": ([entry("pipe", tarfile.FIFOTYPE)], r"is a FIFO"),
    "duplicate": ([entry("a.txt", data=b"1"), entry("a.txt", data=b"2")], r"appears twice"),
    "file_then_symlink": ([entry("d/f", data=b"1"), entry("d", tarfile.SYMTYPE, link=".")], r"'d' appears twice"),
    "file_as_parent": ([entry("f", data=b"1"), entry("f/g", data=b"2")], r"written through 'f', which is a file"),
    "empty_name": ([entry("./", data=b"1")], r"has an empty name"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_entries_are_refused_and_nothing_is_left(place: Path, case: str) -> None:
    entries, message = MALICIOUS[case]
    make_tar(place / "pkg.tar.gz", [entry("manifest.json", data=b"{}"), *entries])
    with pytest.raises(PackageError, match=message) as info:
        safe_extract(place / "pkg.tar.gz", place / "out")
    assert str(info.value).startswith(f"{place / 'pkg.tar.gz'}: entry ")
    assert "refusing to unpack this tarball" in str(info.value)
    assert_left_nothing(place)


def test_size_and_entry_limits(place: Path) -> None:
    make_tar(place / "pkg.tar.gz", [entry("a", data=b"x" * 600), entry("b", data=b"y" * 600)])
    with pytest.raises(PackageError, match=r"'b' takes the unpacked size past 1000 bytes"):
        safe_extract(place / "pkg.tar.gz", place / "out", max_bytes=1000)
    make_tar(place / "pkg.tar.gz", [entry(f"f{i}", data=b"") for i in range(5)])
    with pytest.raises(PackageError, match=r"'f3' is past the limit of 3 entries"):
        safe_extract(place / "pkg.tar.gz", place / "out", max_entries=3)
    assert_left_nothing(place)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_tarballs(place: Path, damage: str) -> None:
    make_tar(place / "pkg.tar.gz", [entry("manifest.json", data=os.urandom(4000))])
    raw = (place / "pkg.tar.gz").read_bytes()
    data = {"garbage": b"\x1f\x8b" + b"\x00" * 100, "truncated": raw[: len(raw) // 2], "empty": b""}[damage]
    (place / "pkg.tar.gz").write_bytes(data)
    with pytest.raises(PackageError, match=r"pkg\.tar\.gz: not a readable tarball"):
        safe_extract(place / "pkg.tar.gz", place / "out")
    assert_left_nothing(place)


def test_missing_tarball_and_foreign_destination(place: Path) -> None:
    with pytest.raises(PackageError, match=r"nope\.tar\.gz: no such file"):
        safe_extract(place / "nope.tar.gz", place / "out")
    make_tar(place / "pkg.tar.gz", [entry("manifest.json", data=b"{}")])
    home = place / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    with pytest.raises(OutputPathError, match="not empty and has no manifest.json"):
        safe_extract(place / "pkg.tar.gz", home)
    assert (home / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("compression", ["w:", "w:bz2", "w:xz"])
def test_other_compressions(place: Path, compression: str) -> None:
    make_tar(place / "pkg.tar.gz", [entry("manifest.json", data=b"{}")], mode=compression)
    assert safe_extract(place / "pkg.tar.gz", place / "out") == ["manifest.json"]
