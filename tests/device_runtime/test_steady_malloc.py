"""On glibc the runtime pins the mmap threshold: freeing a big block no longer moves it (see `steady_malloc`).

Checked in fresh interpreters through glibc's own counters (mallinfo2: blocks served by their own mapping). The
control run, without pinning, shows the dynamic behaviour the pin removes, so the check can fail.
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                                reason="glibc >= 2.33 only")

_PROBE = """
import ctypes, sys
pin = sys.argv[1] == "pin"
if pin:
    from device_runtime.steady_malloc import pin_mmap_threshold
    assert pin_mmap_threshold()
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
big = libc.malloc(8 << 20)   # above any threshold: its own mapping
libc.free(big)               # glibc's dynamic rule would now raise the threshold to 8 MB
before = libc.mallinfo2().hblks
block = libc.malloc(6 << 20)
print("mapped" if libc.mallinfo2().hblks > before else "heap")
libc.free(block)
"""


def _where_6mb_goes(mode: str) -> str:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* variables from the caller
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    return out.stdout.strip()


def test_pinned_threshold_survives_a_big_free() -> None:
    assert _where_6mb_goes("control") == "heap"  # glibc raised its threshold: the dynamic rule is live
    assert _where_6mb_goes("pin") == "mapped"    # pinned at 4 MB: a 6 MB block still gets its own mapping


def test_a_threshold_the_user_chose_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import device_runtime.steady_malloc as steady

    monkeypatch.setattr(steady, "_PINNED", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert steady.pin_mmap_threshold() is False
