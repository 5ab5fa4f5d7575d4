"""edgepeft's on-device runtime: read and verify a bundle, train, evaluate, predict, checkpoint; no torch.

Imports only the stdlib, numpy, onnxruntime and safetensors, so it installs on a device with
`pip install edgepeft[device]`. The bundle format is defined here (`bundle.py`) and written by the exporters.
"""

from . import errors
from .batch import validate_batch
from .bundle import Bundle, read_bundle, write_bundle
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import (
    BatchError,
    BundleError,
    BundleIntegrityError,
    BundleVersionError,
    CheckpointError,
    NonFiniteStepError,
    OptimizerSpecError,
    OutputPathError,
    RuntimeErrorBase,
    RuntimeOptionError,
)
from .optim_spec import SGD, AdamW, OptimizerSpec, optimizer_from_manifest
from .tensor_spec import TensorSpec
from .trainer import Trainer

__all__ = [
    "SGD",
    "AdamW",
    "BatchError",
    "Bundle",
    "BundleError",
    "BundleIntegrityError",
    "BundleVersionError",
    "CheckpointError",
    "NonFiniteStepError",
    "OptimizerSpec",
    "OptimizerSpecError",
    "OutputPathError",
    "RuntimeErrorBase",
    "RuntimeOptionError",
    "TensorSpec",
    "Trainer",
    "errors",
    "load_checkpoint",
    "optimizer_from_manifest",
    "read_bundle",
    "save_checkpoint",
    "validate_batch",
    "write_bundle",
]
