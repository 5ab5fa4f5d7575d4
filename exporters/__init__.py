"""Host-side exporters: a PEFT-injected torch model in, a device bundle out (ONNX or ExecuTorch)."""

from __future__ import annotations

from .errors import ExportError, UnsupportedLossError

__all__ = ["BACKENDS", "ExportError", "UnsupportedLossError", "export"]


BACKENDS = ("onnx", "executorch")


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
        try:
            from . import executorch as executorch_backend
        except ImportError as exc:
            raise ExportError(f"the executorch backend needs the executorch package ({exc}); "
                              "pip install 'edgepeft[executorch]'") from exc
        return executorch_backend.export(model, example_inputs, **kwargs)
    raise ExportError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
