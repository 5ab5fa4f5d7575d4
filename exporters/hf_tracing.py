"""Capture a model's forward with torch.export before the train step is traced (Hugging Face transformers models).

The train step is traced with `make_fx` (see `onnx_graph.py`), which runs the model's Python as is. transformers'
forwards branch on tensor values in places (mask shortcuts such as "is every token real?"); they skip those
branches when torch.export / dynamo is tracing, so torch.export captures them as one straight-line aten graph with
symbolic batch and sequence sizes. `run_decompositions` then lowers fused kernels (scaled_dot_product_attention)
to plain ops whose backward exports to ONNX, but keeps `detach`: the default table rewrites it to `alias`, which
would let gradients flow where the model stops them (DoRA's detached weight norm). The returned module runs that
graph with the original parameter names and `requires_grad` flags, so the rest of the export (trainable/frozen
split, `functional_call`, backward by autograd, the ONNX translation) is the same as for any model, and parity is
still against the original model.

A model asks for this with `model.edgepeft_tracing = "torch.export"` (set by `edgepeft.models.hf`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .decompositions import fold_matmuls
from .errors import ExportError
from .onnx import _symbolic_dims

__all__ = ["TORCH_EXPORT", "needs_torch_export", "ExportedForward", "capture_with_torch_export"]

TORCH_EXPORT = "torch.export"
_DEFAULT_MAX = 1 << 16
# Attributes that describe a model to the exporter (dims, manifest); carried over to the captured module.
_DESCRIPTIVE = ("input_specs", "num_classes", "max_len", "vocab_size")


def needs_torch_export(model: nn.Module) -> bool:
    """Whether `model` asked to be captured with torch.export before tracing."""
    return getattr(model, "edgepeft_tracing", None) == TORCH_EXPORT


class ExportedForward(nn.Module):
    """Runs a torch.export graph; its submodules (hence parameter and buffer names) are the original model's.

    The submodules are shared with the graph module, so `torch.func.functional_call` on this module swaps the
    tensors the graph reads. eval()/train() only reach those submodules: the graph itself was captured in eval mode.
    """

    def __init__(self, graph_module: nn.Module, source: nn.Module):
        super().__init__()
        if graph_module._parameters:
            raise ExportError(f"internal: torch.export left parameters {list(graph_module._parameters)} at the top "
                              "level of the graph module; they could not be swapped for the step's inputs")
        for name, child in graph_module.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_graph_module", graph_module)  # not a child: its eval() is not supported
        for name, value in vars(source).items():
            if name in _DESCRIPTIVE or name.startswith("edgepeft_"):
                setattr(self, name, value)

    def forward(self, **inputs: torch.Tensor):
        return self._graph_module(**inputs)


def capture_with_torch_export(
    model: nn.Module, example_inputs: Mapping[str, torch.Tensor], dim_bounds: Mapping[str, int] | None = None
) -> ExportedForward:
    """torch.export `model` (in eval mode) over keyword `example_inputs` with the model's symbolic dims."""
    model = model.eval()
    example = {k: v.detach() for k, v in example_inputs.items()}
    bounds = {"seq": int(model.max_len)} if isinstance(getattr(model, "max_len", None), int) else {}
    bounds.update(dim_bounds or {})
    dims: dict[str, torch.export.Dim] = {}

    def dim(symbol: str) -> torch.export.Dim:
        if symbol not in dims:
            dims[symbol] = torch.export.Dim(symbol, min=1, max=bounds.get(symbol, _DEFAULT_MAX))
        return dims[symbol]

    symbolic = _symbolic_dims(model, example)
    dynamic = {name: {axis: dim(sym) for axis, sym in axes.items()} or None for name, axes in symbolic.items()}
    try:
        program = torch.export.export(model, (), example, dynamic_shapes=dynamic, strict=False)
        program = program.run_decompositions(_decompositions_keeping_detach())
    except Exception as exc:  # torch.export reports guards and unsupported Python with many exception types
        raise ExportError(f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
    return ExportedForward(program.module(), model)


def _decompositions_keeping_detach() -> dict:
    """torch.export's default table, keeping `detach`, and folding `[..., K] @ [K, N]` into one `mm` (see
    `exporters.decompositions.fold_matmuls`: otherwise a projection whose input comes out of a permute, like
    attention's output, is captured as a per-example copy of its weight and a `bmm`)."""
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.detach.default, None)
    return fold_matmuls(table)
