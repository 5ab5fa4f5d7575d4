"""Host-side exporters: a PEFT-injected torch model in, a device bundle out (ONNX today)."""

from __future__ import annotations

from .errors import ExportError, UnsupportedLossError

__all__ = ["ExportError", "UnsupportedLossError", "export"]


def export(model, example_inputs, *, backend: str = "onnx", **kwargs):
    """Export to the named backend; see `exporters.onnx.export` for the arguments."""
    if backend == "onnx":
        from . import onnx as onnx_backend

        return onnx_backend.export(model, example_inputs, **kwargs)
    raise ExportError(f"unknown backend {backend!r}; this build supports 'onnx'")
