"""Host-side exporters: a PEFT-injected torch model in, a device bundle out (ONNX or ExecuTorch)."""

from __future__ import annotations

from device_runtime.open import BACKENDS  # the bundle format's backends: what a device runtime can open

from .errors import ExportError, UnsupportedLossError

__all__ = ["BACKENDS", "ExportError", "UnsupportedLossError", "export"]


def export(model, example_inputs, *, backend: str = "onnx", **kwargs):
    """Export to the named backend; see `exporters.onnx.export` / `exporters.executorch.export` for the arguments.

    For ONNX, a model that asks for it (Hugging Face models: `edgepeft_tracing = "torch.export"`) is captured with
    torch.export first (see `exporters.hf_tracing`); the ExecuTorch exporter captures with torch.export anyway.
    """
    if backend == "onnx":
        from . import onnx as onnx_backend
        from .hf_tracing import capture_with_torch_export, needs_torch_export

        if needs_torch_export(model):
            model = capture_with_torch_export(model, example_inputs, kwargs.get("dim_bounds"))
        return onnx_backend.export(model, example_inputs, **kwargs)
    if backend == "executorch":
        from . import executorch as executorch_backend  # imports executorch itself on first use, with a clear error

        return executorch_backend.export(model, example_inputs, **kwargs)
    raise ExportError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
