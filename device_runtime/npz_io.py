"""Read the named arrays of an `.npz` file without pickle, turning every way a damaged file fails into one error.

A damaged zip can fail in zipfile (bad CRC, unknown compression, truncated directory), in zlib, or in numpy's
header parser, each with its own exception type; callers (the sample buffer, the CLI's data files) want one
error of their own that names the file.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["NPZ_READ_ERRORS", "read_npz"]

# What reading an untrusted .npz raises, besides our own ValueError for a bare .npy: zipfile's BadZipFile,
# NotImplementedError (a flipped compression method) and RuntimeError (an "encrypted" flag), zlib errors,
# EOFError on truncation, KeyError on a damaged directory, and numpy's ValueError for a bad array header.
NPZ_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
                   zlib.error)


def read_npz(path: Union[str, Path]) -> dict[str, np.ndarray]:
    """All arrays of an .npz by name; raises one of NPZ_READ_ERRORS if the file is not a readable .npz."""
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("it holds a single array (.npy), not named arrays (.npz)")
    with data:
        return {name: data[name] for name in data.files}
