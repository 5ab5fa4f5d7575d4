"""`open_trainer`: open a bundle with the trainer of its backend (onnxruntime `Trainer` or `ExecuTorchTrainer`).

The ExecuTorch backend is imported only for executorch bundles, so opening an ONNX bundle never loads torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from .bundle import read_bundle
from .errors import BundleError

__all__ = ["open_trainer", "BACKENDS"]

BACKENDS = ("onnx", "executorch")


def open_trainer(bundle_dir: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None, *,
                 verify: bool = True, **options: Any) -> Any:
    """`Trainer.open` or `ExecuTorchTrainer.open`, by the manifest's `backend`; `options` go to that `open`.

    Both trainers have the same API (step, evaluate, predict, save_checkpoint, export_adapter, trainable_state,
    step_count, snapshot / restore), so callers switch backend by exporting the other bundle, nothing else.
    """
    backend = read_bundle(bundle_dir, verify=False).manifest["backend"]  # schema and sizes only; open verifies
    if backend == "onnx":
        from .trainer import Trainer

        return Trainer.open(bundle_dir, checkpoint=checkpoint, verify=verify, **options)
    if backend == "executorch":
        from .executorch_backend import ExecuTorchTrainer

        return ExecuTorchTrainer.open(bundle_dir, checkpoint=checkpoint, verify=verify, **options)
    raise BundleError(f"{bundle_dir}: backend {backend!r} is not one this runtime runs ({list(BACKENDS)}); "
                      "re-export the bundle with --backend onnx or --backend executorch")
