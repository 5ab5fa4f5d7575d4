"""Exceptions raised by the device runtime; each message names the problem and the fix."""

from __future__ import annotations

__all__ = [
    "RuntimeErrorBase",
    "BundleError",
    "BundleIntegrityError",
    "BundleVersionError",
    "BatchError",
    "CheckpointError",
    "LoopConfigError",
    "MemoryBudgetError",
    "NonFiniteStepError",
    "OptimizerSpecError",
    "OutputPathError",
    "PackageError",
    "RuntimeOptionError",
    "SampleBufferError",
]


class RuntimeErrorBase(Exception):
    """Base of every error the device runtime raises on purpose."""


class BundleError(RuntimeErrorBase):
    """The bundle directory or its manifest is unusable."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing, has the wrong size, or its sha256 does not match the manifest."""


class BundleVersionError(BundleError):
    """The bundle was written in a format version this runtime does not read."""


class BatchError(RuntimeErrorBase, ValueError):
    """A batch does not match the bundle's input spec (names, dtypes, shapes, label range, finiteness)."""


class CheckpointError(RuntimeErrorBase):
    """A checkpoint is missing, corrupt, or belongs to another bundle."""


class NonFiniteStepError(RuntimeErrorBase, FloatingPointError):
    """A training step produced a non-finite loss or gradient; the state was left as it was."""


class OptimizerSpecError(RuntimeErrorBase, ValueError):
    """An optimizer's hyper-parameters are out of range."""


class OutputPathError(RuntimeErrorBase, ValueError):
    """An output path cannot be written safely (it would replace a foreign directory or write into a bundle)."""


class RuntimeOptionError(RuntimeErrorBase, ValueError):
    """An option passed to the runtime (such as the thread count) is out of range."""


class LoopConfigError(RuntimeErrorBase, ValueError):
    """The personalization loop's settings contradict each other or the data it was given."""


class MemoryBudgetError(RuntimeErrorBase):
    """Training would start above the RAM budget (or with too little free RAM on the device)."""


class SampleBufferError(RuntimeErrorBase):
    """A saved sample buffer is unreadable, corrupt, or does not fit the examples it should hold."""


class PackageError(RuntimeErrorBase):
    """A package tarball is unreadable, or holds an entry that could write outside the target directory."""
