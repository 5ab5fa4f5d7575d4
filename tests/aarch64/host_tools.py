"""What the deployment tests need from the machine: Debian tools installed on demand, exported bundles, PNG pixels.

Tests install what they need themselves (CI runs as root on a fresh machine) and skip only when the package
registries cannot be reached, saying so.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
_OFFLINE = ("Temporary failure resolving", "Could not resolve", "Failed to fetch", "Network is unreachable",
            "Connection timed out", "No address associated")


def ensure_apt_tool(binary: str, package: str) -> str:
    """Path of `binary`, apt-get installing `package` if it is missing; skip only if apt cannot reach Debian."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip(f"{binary} is missing and installing {package} needs root for apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=600)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            output = update.stdout + update.stderr + proc.stdout + proc.stderr
            if any(marker in output for marker in _OFFLINE):
                pytest.skip(f"apt-get cannot reach the Debian archive to install {package}: {output[-300:]}")
            pytest.fail(f"apt-get install {package} failed although the archive answered:\n{output[-1500:]}")
    found = shutil.which(binary)
    assert found, f"{package} installed but {binary} is not on PATH"
    return found


def is_offline(output: str) -> bool:
    return any(marker in output for marker in _OFFLINE)


def export_builtin(name: str, out: Path, methods: str = "lora", **model_kwargs) -> Path:
    """Export a built-in model (seeded) with LoRA (+ BitFit if asked) and AdamW to `out`; returns `out`."""
    import torch

    import edgepeft
    from exporters import export

    torch.manual_seed(0)
    model = edgepeft.load_model(name, **model_kwargs)
    configs = [edgepeft.LoRAConfig(r=8, alpha=16)] + ([edgepeft.BitFitConfig()] if "bitfit" in methods else [])
    edgepeft.apply(model, *configs)
    export(model, edgepeft.make_example_batch(model, batch_size=3, seq_len=7), out=out, loss="cross_entropy",
           optimizer=edgepeft.AdamW(lr=1e-2), model_id=name, model_source=f"builtin:{name}")
    return out


def digits_npz(path: Path, n: int = 256, seed: int = 0) -> Path:
    """The first `n` of a seeded shuffle of scikit-learn's digits as the mlp bundle's arrays (x, labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))[:n]
    np.savez(path, x=(digits.data[order] / 16.0).astype(np.float32), labels=digits.target[order].astype(np.int64))
    return path


def read_png_rgb(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) to an [h, w, 3] uint8 array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unsupported PNG layout {header}"
    channels = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
    stride = width * channels
    out = np.zeros((height, stride), np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        prev = out[y - 1] if y else np.zeros(stride, np.int32)
        if kind == 0:
            out[y] = line
        elif kind == 1:  # sub: a running sum per channel
            out[y] = np.cumsum(line.reshape(width, channels), axis=0).reshape(-1) & 0xFF
        elif kind == 2:  # up
            out[y] = (line + prev) & 0xFF
        else:  # 3 average, 4 paeth: each byte depends on the decoded byte to its left, so decode serially
            cur, up, raw_line = [0] * stride, prev.tolist(), line.tolist()
            for x in range(stride):
                left = cur[x - channels] if x >= channels else 0
                if kind == 3:
                    pred = (left + up[x]) // 2
                else:
                    corner = up[x - channels] if x >= channels else 0
                    p = left + up[x] - corner
                    pa, pb, pc = abs(p - left), abs(p - up[x]), abs(p - corner)
                    pred = left if pa <= pb and pa <= pc else (up[x] if pb <= pc else corner)
                cur[x] = (raw_line[x] + pred) & 0xFF
            out[y] = cur
    return out.reshape(height, width, channels)[:, :, :3].astype(np.uint8)
