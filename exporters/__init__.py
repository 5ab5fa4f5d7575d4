"""Host-side exporters: a PEFT-injected torch model in, a device bundle out (ONNX today)."""

from __future__ import annotations

from .errors import ExportError, UnsupportedLossError

__all__ = ["ExportError", "UnsupportedLossError", "export"]


def export(model, example_inputs, *, backend: str = "onnx", **kwargs):
    """Export to the named backend; see `exporters.onnx.export` for the arguments.

    A model that asks for it (Hugging Face models: `edgepeft_tracing = "torch.export"`) is captured with
    torch.export first (see `exporters.hf_tracing`).
    """
    if backend == "onnx":
        from . import onnx as onnx_backend
        from .hf_tracing import capture_with_torch_export, needs_torch_export

        if needs_torch_export(model):
            model = capture_with_torch_export(model, example_inputs, kwargs.get("dim_bounds"))
        return onnx_backend.export(model, example_inputs, **kwargs)
    raise ExportError(f"unknown backend {backend!r}; this build supports 'onnx'")
