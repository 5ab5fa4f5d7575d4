"""Adapter files: read a bundle's initial trainable tensors, and export trained ones for the host to merge.

An exported adapter is a directory with `adapter.safetensors` (trainable tensors keyed by parameter name, the
same layout as the bundle's own `adapter.safetensors`) and `adapter_config.json` saying which bundle, methods
and step it came from, so the host (merge, FedAvg) can refuse to mix adapters of different bundles.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .atomic_io import fsync_file, staged_dir, write_and_hash
from .bundle import ADAPTER_FILE, Bundle
from .errors import BundleIntegrityError
from .tensor_spec import check_named_tensors

__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_FORMAT", "ADAPTER_FORMAT_VERSION", "read_initial_adapter", "write_adapter"]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FORMAT = "edgepeft-adapter"
ADAPTER_FORMAT_VERSION = 1


def read_initial_adapter(bundle: Bundle) -> dict[str, np.ndarray]:
    """Load `adapter.safetensors` from the bundle and check it against the manifest's trainable specs.

    The sha256 check in `read_bundle` proves the file is the one exported; this check proves the exporter
    wrote what the manifest promises (names, shapes, dtypes, finite values).
    """
    path = bundle.adapter_path
    fix = "re-export the bundle"
    try:
        tensors = {k: np.array(v, copy=True) for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleIntegrityError(f"{path}: not a readable safetensors file ({exc}); copy the bundle to the "
                                   f"device again or {fix}") from exc
    check_named_tensors(tensors, bundle.trainable, where=str(path), error=BundleIntegrityError, fix=fix)
    return tensors


def write_adapter(path: Union[str, Path], bundle: Bundle, step: int, tensors: Mapping[str, np.ndarray]) -> Path:
    """Write an adapter directory atomically (replacing an earlier adapter there); return its path."""
    config: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "bundle_id": bundle.bundle_id,
        "model": bundle.manifest["model"],
        "methods": bundle.manifest["methods"],
        "step": int(step),
        "trainable": [t.to_manifest() for t in bundle.trainable],
    }
    out_dir = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with staged_dir(out_dir, marker=ADAPTER_CONFIG_FILE) as staged:
        weights = staged / ADAPTER_FILE
        save_file(arrays, str(weights), metadata={"bundle_id": bundle.bundle_id, "step": str(int(step))})
        fsync_file(weights)
        write_and_hash((json.dumps(config, indent=2) + "\n").encode("utf-8"), staged / ADAPTER_CONFIG_FILE)
    return out_dir
