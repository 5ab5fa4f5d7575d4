"""Exceptions raised while exporting a model to a bundle; each names the problem and the fix."""

from __future__ import annotations

__all__ = ["ExportError", "UnsupportedLossError"]


class ExportError(Exception):
    """The model, its example inputs or the export options cannot produce a correct bundle."""


class UnsupportedLossError(ExportError, ValueError):
    """The requested loss is unknown or does not fit the model's output."""
