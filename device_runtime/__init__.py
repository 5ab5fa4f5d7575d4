"""edgepeft's on-device runtime: read and verify a bundle, train, evaluate, predict, checkpoint; no torch.

`personalize` runs the whole on-device loop (sample buffer, replay, schedule, early stopping, quality and memory
guards, checkpoints); `safe_extract` unpacks a package tarball without letting it write outside its directory.

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
    LoopConfigError,
    MemoryBudgetError,
    NonFiniteStepError,
    OptimizerSpecError,
    OutputPathError,
    PackageError,
    RuntimeErrorBase,
    RuntimeOptionError,
    SampleBufferError,
)
from .loop import EvaluationEvent, LoopConfig, LoopReport, StepEvent, personalize
from .open import open_trainer
from .optim_spec import SGD, AdamW, OptimizerSpec, optimizer_from_manifest
from .safe_unpack import safe_extract
from .sample_buffer import SampleBuffer
from .tensor_spec import TensorSpec
from .trainer import Trainer, TrainerSnapshot

__all__ = [
    "SGD",
    "AdamW",
    "BatchError",
    "Bundle",
    "BundleError",
    "BundleIntegrityError",
    "BundleVersionError",
    "CheckpointError",
    "EvaluationEvent",
    "LoopConfig",
    "LoopConfigError",
    "LoopReport",
    "MemoryBudgetError",
    "NonFiniteStepError",
    "OptimizerSpec",
    "OptimizerSpecError",
    "OutputPathError",
    "PackageError",
    "RuntimeErrorBase",
    "RuntimeOptionError",
    "SampleBuffer",
    "SampleBufferError",
    "StepEvent",
    "TensorSpec",
    "Trainer",
    "TrainerSnapshot",
    "errors",
    "load_checkpoint",
    "open_trainer",
    "optimizer_from_manifest",
    "personalize",
    "read_bundle",
    "safe_extract",
    "save_checkpoint",
    "validate_batch",
    "write_bundle",
]
