"""Trace a flat-argument torch function to ONNX and turn its frozen inputs into shared external initializers.

Tracing: `make_fx` (symbolic shapes, core-aten decompositions) records the function *including* its
`torch.autograd.grad` call as plain aten ops; `torch.onnx.export(dynamo=True)` translates that graph. Graph surgery
afterwards works on the ONNX protobuf with `onnx.helper`-level calls, each step a function named after what it does.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import external_data_helper
from .decompositions import decomposition_table
from torch.fx.experimental import _config as fx_config
from torch.fx.experimental.proxy_tensor import make_fx

from .errors import ExportError
from .custom_op_translations import ONNX_TRANSLATIONS

__all__ = ["FROZEN_PREFIX", "WeightsFile", "write_weights_file", "trace_to_onnx", "bind_frozen_to_weights",
           "rename_outputs"]

FROZEN_PREFIX = "frozen::"  # graph names of weights.bin tensors (the device runtime binds the same names)
_ALIGN = 64  # offsets aligned so a runtime may mmap tensors in place


@dataclass(frozen=True)
class WeightEntry:
    offset: int
    length: int
    array: np.ndarray


@dataclass(frozen=True)
class WeightsFile:
    """Where each frozen tensor lives inside the one weights file that all graphs of a bundle share."""

    location: str
    entries: dict[str, WeightEntry]


def write_weights_file(frozen: dict[str, np.ndarray], path: Path) -> WeightsFile:
    """Write every frozen tensor once, little-endian, 64-byte aligned, in the given order."""
    entries: dict[str, WeightEntry] = {}
    offset = 0
    with open(path, "wb") as f:
        for name, array in frozen.items():
            data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(data)
            entries[name] = WeightEntry(offset, len(data), array)
            offset += len(data)
    return WeightsFile(path.name, entries)


class _CallGraph(torch.nn.Module):
    """torch.onnx.export wants a Module; this one just calls the traced graph."""

    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args: torch.Tensor):
        return self.graph_module(*args)


def _dynamic_shapes(dynamic_dims: Sequence[dict[int, str] | None], bounds: dict[str, int]) -> tuple:
    dims: dict[str, torch.export.Dim] = {}

    def dim(symbol: str) -> torch.export.Dim:
        if symbol not in dims:
            dims[symbol] = torch.export.Dim(symbol, min=1, max=bounds.get(symbol, 1 << 20))
        return dims[symbol]

    return (tuple(None if not d else {axis: dim(sym) for axis, sym in d.items()} for d in dynamic_dims),)


def trace_to_onnx(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    example_args: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_dims: Sequence[dict[int, str] | None],
    dim_bounds: dict[str, int],
) -> onnx.ModelProto:
    """Trace `fn` over flat tensors and export it to an ONNX model with the given input/output names."""
    if len(example_args) != len(input_names) or len(dynamic_dims) != len(input_names):
        raise ExportError("internal: example_args, input_names and dynamic_dims must have the same length")
    try:
        # Without duck shaping, a dynamic size equal to a fixed one (batch 3 next to a 3-wide weight) gets its own
        # symbol instead of being tied to that size and specialized.
        with fx_config.patch(use_duck_shape=False):
            graph_module = make_fx(fn, tracing_mode="symbolic", decomposition_table=decomposition_table())(
                *example_args
            )
    except ExportError:
        raise
    except Exception as exc:  # make_fx reports data-dependent control flow etc. with its own exception types
        raise ExportError(
            f"tracing the step with make_fx failed: {type(exc).__name__}: {exc}. The model's forward must be "
            "traceable without data-dependent Python control flow"
        ) from exc
    dynamic_shapes = _dynamic_shapes(dynamic_dims, dim_bounds)
    with warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")
        try:
            program = _translate_traced(graph_module, example_args, dynamic_shapes, input_names, output_names)
        except Exception as exc:
            raise ExportError(f"translating the traced step to ONNX failed: {type(exc).__name__}: {exc}") from exc
    model = program.model_proto
    rename_outputs(model, list(output_names))
    strip_debug_metadata(model)
    return model


def strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Drop torch.onnx's per-node stack traces and FX dumps: they are most of a graph file's bytes, and a device has
    no use for them (a 2-layer transformer's train step shrinks ~4x)."""
    for node in model.graph.node:
        del node.metadata_props[:]


def _translate_traced(graph_module, example_args, dynamic_shapes, input_names, output_names):
    """torch.onnx's exporter minus its second decomposition pass.

    `torch.onnx.export` re-runs a full decomposition of the program (a second make_fx trace) before translating; our
    graph is already core-aten from our own make_fx, and that pass was ~60% of export time. Only the passes the
    translation needs (explicit type promotion, assertion removal) are kept. This uses torch.onnx's internal
    modules, which is why torch is pinned exactly; the parity suite checks every op family through this path.
    """
    from torch.onnx._internal.exporter import _core, _fx_passes, _ir_passes, _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    for torch_op, onnx_fn in ONNX_TRANSLATIONS.items():
        registry.register_op(torch_op, onnx_fn, is_complex=False)
    # Deferred asserts: a guard sympy cannot prove over the dim range (prompt tuning's contiguity check
    # Min(8*(seq+n), 32*(seq+n)) == 8*(seq+n)) becomes an assertion node, removed below, instead of an error.
    exported = torch.export.export(_CallGraph(graph_module), tuple(example_args), dynamic_shapes=dynamic_shapes,
                                   strict=False, prefer_deferred_runtime_asserts_over_guards=True)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        module = exported.graph_module
        _fx_passes.insert_type_promotion_nodes(module)
        exported._graph_module = _fx_passes.remove_assertion_nodes(module)
    program = _core._exported_program_to_onnx_program(exported, registry=registry)
    _ir_passes.rename_inputs(program.model, list(input_names))
    _ir_passes.rename_outputs(program.model, list(output_names))
    program._rename_dynamic_axes(dynamic_shapes)
    return program


class _quiet_loggers:
    """torch.onnx and torch.export log progress and torchvision warnings; an export inside our CLI should not."""

    _NAMES = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "torch._export")

    def __enter__(self) -> "_quiet_loggers":
        self._saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in self._NAMES]
        for logger, _ in self._saved:
            logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc: object) -> bool:
        for logger, level in self._saved:
            logger.setLevel(level)
        return False


def rename_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Give graph outputs the contract names, via Identity nodes so no internal value is renamed twice."""
    graph = model.graph
    if len(graph.output) != len(names):
        raise ExportError(f"internal: graph has {len(graph.output)} outputs, expected {len(names)}: {names}")
    for output, wanted in zip(graph.output, names):
        if output.name == wanted:
            continue
        graph.node.append(onnx.helper.make_node("Identity", [output.name], [wanted], name=f"output/{wanted}"))
        output.name = wanted


def bind_frozen_to_weights(model: onnx.ModelProto, weights: WeightsFile, prefix: str = FROZEN_PREFIX) -> None:
    """Turn `frozen::<name>` graph inputs into initializers stored in the shared weights file.

    Inputs the traced graph no longer uses are dropped, so each graph references only what it reads.
    """
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    used |= {name for node in graph.node for attr in node.attribute if attr.g for n in attr.g.node for name in n.input}
    kept_inputs = []
    for value in graph.input:
        if not value.name.startswith(prefix):
            kept_inputs.append(value)
            continue
        weight_name = value.name[len(prefix) :]
        if value.name not in used:
            continue
        entry = weights.entries.get(weight_name)
        if entry is None:
            raise ExportError(f"internal: frozen tensor {weight_name!r} is not in the weights file")
        tensor = onnx.TensorProto()
        tensor.name = value.name
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(entry.array.dtype)
        tensor.dims.extend(entry.array.shape)
        tensor.raw_data = b""  # set_external_data requires the field; the bytes live in the weights file
        external_data_helper.set_external_data(tensor, weights.location, offset=entry.offset, length=entry.length)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        graph.initializer.append(tensor)
    del graph.input[:]
    graph.input.extend(kept_inputs)
