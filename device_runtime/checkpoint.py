"""Training checkpoints: trainable tensors, optimizer state and step in one atomically replaced safetensors file.

A checkpoint is a directory holding `checkpoint.safetensors` with tensors `trainable::<name>` and
`state::<name>` and string metadata (format, format_version, step, bundle_id, payload_sha256, metadata_sha256).
It is written to a temp file in that directory, fsynced and `os.replace`d, so a crash leaves the previous
checkpoint intact. Loading refuses anything that would resume training wrongly: another bundle's checkpoint, a
flipped bit in a tensor (the payload hash checks the data) or in the metadata (a step of 5 read as 4 would skew
AdamW's bias correction; the metadata hash checks those strings), or names, shapes, dtypes and non-finite values
that do not fit the bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as serialize

from .atomic_io import atomic_write_file, remove_stale_temps
from .bundle import Bundle
from .errors import CheckpointError
from .graph_contract import STATE, TRAINABLE
from .tensor_spec import check_named_tensors

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "load_checkpoint",
    "metadata_sha256",
    "payload_sha256",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "edgepeft-checkpoint"
CHECKPOINT_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_STEP = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() also accepts '²', which int() then rejects


def metadata_sha256(metadata: Mapping[str, str]) -> str:
    """sha256 over the metadata strings (sorted keys, without this hash itself)."""
    body = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode("ascii")).hexdigest()


def save_file(tensors: Mapping[str, np.ndarray], filename: Union[str, Path], metadata: dict[str, str]) -> None:
    """safetensors' `save_file`, but serialized in memory and written to exactly `filename`.

    safetensors' own writer streams into a temp file of its own (`.tmpXXXXXX`) beside the target and renames it,
    so a process killed mid-save leaves that file in the checkpoint directory, where nothing would ever remove
    it. A checkpoint is adapter-sized, so building it in memory costs little.
    """
    with open(filename, "wb") as f:
        f.write(serialize(dict(tensors), metadata=metadata))


def payload_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over the tensors in sorted-name order: name, dtype, shape and little-endian C-order bytes.

    Defined on the tensors rather than the file so it does not depend on how safetensors lays out its header.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{name}\0{arr.dtype.str}\0{list(arr.shape)}\0".encode("utf-8"))
        digest.update(arr.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def save_checkpoint(
    path: Union[str, Path],
    bundle_id: str,
    step: int,
    trainable: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
) -> Path:
    """Write `<path>/checkpoint.safetensors` atomically (creating `path`); return the file's path.

    Non-finite tensors are refused here rather than at load time, so a bad state never replaces a good one.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory; a checkpoint is a directory, "
                              "pass a directory path")
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{directory}: step must be a non-negative int, got {step!r}")
    if not _SHA256.match(bundle_id):
        raise CheckpointError(f"{directory}: bundle_id must be the bundle's 64-hex sha256, got {bundle_id!r}; "
                              "pass Bundle.bundle_id")
    tensors = {TRAINABLE + k: np.ascontiguousarray(v) for k, v in trainable.items()}
    tensors.update({STATE + k: np.ascontiguousarray(v) for k, v in state.items()})
    for name, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CheckpointError(f"{directory}: refusing to save {name!r}, it holds NaN or Inf; "
                                  "keep the last good checkpoint and lower the learning rate")
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_VERSION),
        "step": str(int(step)),
        "bundle_id": bundle_id,
        "payload_sha256": payload_sha256(tensors),
    }
    metadata["metadata_sha256"] = metadata_sha256(metadata)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    # A process killed mid-save leaves its temp file; without this a device that crashes often fills its disk.
    remove_stale_temps(target)
    atomic_write_file(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return target


def _read(file: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    try:
        with safe_open(str(file), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: np.array(f.get_tensor(k), copy=True) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc}); it is corrupt, "
                              "resume from an earlier checkpoint or start from the bundle") from exc
    return metadata, tensors


def load_checkpoint(path: Union[str, Path], bundle: Bundle) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read and validate `<path>/checkpoint.safetensors` for `bundle`; return (step, trainable, state)."""
    file = Path(path) / CHECKPOINT_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; pass a directory written by Trainer.save_checkpoint")
    metadata, tensors = _read(file)
    fix = "resume from another checkpoint or start from the bundle"
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file}: metadata format is {metadata.get('format')!r}, not {CHECKPOINT_FORMAT!r}, "
                              f"so this is not an edgepeft checkpoint; {fix}")
    if metadata.get("format_version") != str(CHECKPOINT_VERSION):
        raise CheckpointError(f"{file}: checkpoint format_version is {metadata.get('format_version')!r}, this "
                              f"runtime reads {CHECKPOINT_VERSION}; resume with the runtime that wrote it")
    owner = metadata.get("bundle_id")
    if owner != bundle.bundle_id:
        raise CheckpointError(f"{file}: belongs to the bundle with id {owner}, not to {bundle.path} "
                              f"(id {bundle.bundle_id}); open the bundle it was trained from, or start fresh")
    step_text = metadata.get("step", "")
    if not isinstance(step_text, str) or not _STEP.fullmatch(step_text):
        raise CheckpointError(f"{file}: metadata step is {step_text!r}, not a non-negative integer; {fix}")
    if metadata.get("payload_sha256") != payload_sha256(tensors):
        raise CheckpointError(f"{file}: tensor data does not match its payload_sha256 (the file is corrupt); {fix}")

    trainable = {k[len(TRAINABLE):]: v for k, v in tensors.items() if k.startswith(TRAINABLE)}
    state = {k[len(STATE):]: v for k, v in tensors.items() if k.startswith(STATE)}
    stray = sorted(k for k in tensors if not k.startswith((TRAINABLE, STATE)))
    if stray:
        raise CheckpointError(f"{file}: unexpected tensors {stray} (names must start with "
                              f"{TRAINABLE!r} or {STATE!r}); {fix}")
    check_named_tensors(trainable, bundle.trainable, where=f"{file} (trainable)", error=CheckpointError, fix=fix)
    check_named_tensors(state, bundle.optimizer_state, where=f"{file} (optimizer state)", error=CheckpointError,
                        fix=fix)
    # Last, so that a checkpoint written around save_checkpoint (tests do) still gets the specific errors above.
    if metadata.get("metadata_sha256") != metadata_sha256(metadata):
        raise CheckpointError(f"{file}: metadata does not match its metadata_sha256 (the step, bundle id or a "
                              f"hash was altered; the file is corrupt); {fix}")
    return int(step_text), trainable, state
