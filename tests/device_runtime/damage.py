"""Damaging files in place for the reliability suite: flip bits without truncating, then put the byte back.

Rewriting a file with write_bytes truncates it, and ext4 flushes a truncated-and-rewritten file on close, which
costs milliseconds per call; sweeping thousands of bit flips that way took half a minute. Writing the one byte in
place (r+b, no truncation) is the same damage for the reader and costs microseconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["flipped"]


@contextmanager
def flipped(path: Path, offset: int, mask: int) -> Iterator[bytes]:
    """XOR the byte at `offset` with `mask` while the block runs; yields the damaged byte."""
    with open(path, "r+b") as f:
        f.seek(offset)
        original = f.read(1)
        damaged = bytes([original[0] ^ mask])
        f.seek(offset)
        f.write(damaged)
        f.flush()
        try:
            yield damaged
        finally:
            f.seek(offset)
            f.write(original)
            f.flush()
