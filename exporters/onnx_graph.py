"""Trace a flat-argument torch function to ONNX and turn its frozen inputs into shared external initializers.

Tracing: `make_fx` (symbolic dynamic dims, core-aten decompositions) records the function *including* its
`torch.autograd.grad` call as plain aten ops; torch.onnx's per-node translator turns that graph into ONNX. Graph
surgery afterwards works on the ONNX protobuf, each step a function named after what it does; `tidy` hands the
graph to onnx-ir's exact passes.
"""

from __future__ import annotations

import logging
import operator
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import external_data_helper
from .decompositions import decomposition_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv, StatelessSymbolicContext,
                                                   StrictMinMaxConstraint)
from torch.utils._sympy.value_ranges import ValueRanges

from .errors import ExportError
from .custom_op_translations import onnx_registry

__all__ = ["FROZEN_PREFIX", "WeightsFile", "write_weights_file", "trace_to_onnx", "bind_frozen_to_weights",
           "rename_outputs", "tidy"]

FROZEN_PREFIX = "frozen::"  # graph names of weights.bin tensors (the device runtime binds the same names)
_ALIGN = 64  # offsets aligned so a runtime may mmap tensors in place
_MAX_DIM = 1 << 20  # a dynamic dim's upper bound when the model names none


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


def _fake_inputs(example_args: Sequence[torch.Tensor], dynamic_dims: Sequence[dict[int, str] | None],
                 dim_bounds: dict[str, int]) -> list[torch.Tensor]:
    """Fake copies of the example args whose dynamic axes, and only those, are symbols.

    Left to itself, make_fx's symbolic mode makes *every* size a symbol, weights' included: the trace then does
    sympy arithmetic for every shape (most of the export time) and the graph computes fixed shapes at run time.
    Here a weight's sizes are plain ints. Equal example sizes share a symbol (duck shaping), which is exactly the
    naming `plan_export` enforces: one example size per dynamic dim, distinct across dims. Each symbol ranges over
    [2, bound] like make_fx's own (0/1 are specialized by tracing, never by the graph, which is rank-generic).
    """
    shape_env = ShapeEnv()
    mode = FakeTensorMode(allow_fallback_kernels=False, shape_env=shape_env)
    fakes = []
    for tensor, dims in zip(example_args, dynamic_dims):
        dims = dims or {}
        context = StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC if axis in dims else DimDynamic.STATIC for axis in range(tensor.dim())],
            constraint_sizes=[
                StrictMinMaxConstraint(vr=ValueRanges(lower=2, upper=dim_bounds.get(dims[axis], _MAX_DIM)),
                                       warn_only=False) if axis in dims else None
                for axis in range(tensor.dim())
            ],
        )
        fakes.append(mode.from_tensor(tensor, symbolic_context=context))
    return fakes


def trace_to_onnx(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    example_args: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_dims: Sequence[dict[int, str] | None],
    dim_bounds: dict[str, int],
    train_step: bool = False,
) -> onnx.ModelProto:
    """Trace `fn` over flat tensors and export it to an ONNX model with the given input/output names.

    `train_step`: translate with onnxruntime's fused kernels too (`TRAIN_STEP_TRANSLATIONS`), for a graph that
    only onnxruntime's CPU provider runs."""
    if len(example_args) != len(input_names) or len(dynamic_dims) != len(input_names):
        raise ExportError("internal: example_args, input_names and dynamic_dims must have the same length")
    fakes = _fake_inputs(example_args, dynamic_dims, dim_bounds)
    try:
        graph_module = make_fx(fn, tracing_mode="symbolic", decomposition_table=decomposition_table())(*fakes)
    except ExportError:
        raise
    except Exception as exc:  # make_fx reports data-dependent control flow etc. with its own exception types
        raise ExportError(
            f"tracing the step with make_fx failed: {type(exc).__name__}: {exc}. The model's forward must be "
            "traceable without data-dependent Python control flow"
        ) from exc
    with warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")
        try:
            model = _translate_traced(graph_module, input_names, output_names, dynamic_dims, train_step)
        except Exception as exc:
            raise ExportError(f"translating the traced step to ONNX failed: {type(exc).__name__}: {exc}") from exc
    rename_outputs(model, list(output_names))
    strip_debug_metadata(model)
    return model


def strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Drop torch.onnx's per-node stack traces and FX dumps: they are most of a graph file's bytes, and a device has
    no use for them (a 2-layer transformer's train step shrinks ~4x)."""
    for node in model.graph.node:
        del node.metadata_props[:]


def read_dims_from_inputs(graph_module: torch.fx.GraphModule) -> None:
    """Make every `sym_size` read its dims from the graph inputs that define them, once per dim.

    make_fx asks whichever tensor is at hand for its size, so a view's target shape reads the batch size (or
    batch*seq) off the previous matmul's output. onnxruntime's shape inference cannot see that this is the input's
    batch again, so its memory planner cannot prove two activations the same size and reuses fewer buffers.
    Sizes that are products or sums of dims (batch*seq) are rebuilt from the per-dim nodes; one `sym_size` per
    dim, right after the inputs.
    """
    graph = graph_module.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if not placeholders:
        return
    defining: dict[object, tuple[torch.fx.Node, int]] = {}
    for node in placeholders:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            for axis, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    defining.setdefault(size.node.expr, (node, axis))
    dims: dict[object, torch.fx.Node] = {}
    for symbol, (source, axis) in defining.items():
        with graph.inserting_after(placeholders[-1]):
            dims[symbol] = graph.call_function(torch.ops.aten.sym_size.int, (source, axis))
        dims[symbol].meta["val"] = source.meta["val"].shape[axis]
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.sym_size.int or node in dims.values():
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.SymInt) or not value.node.expr.free_symbols <= dims.keys():
            continue
        with graph.inserting_before(node):
            rebuilt = _size_expression(graph, value.node.expr, dims)
        if not isinstance(rebuilt, torch.fx.Node):  # not a sum or product of dims; leave it as make_fx wrote it
            continue
        node.replace_all_uses_with(rebuilt)
        graph.erase_node(node)
    for node in dims.values():
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    graph_module.recompile()


def _size_expression(graph: torch.fx.Graph, expr, dims: dict[object, torch.fx.Node]) -> torch.fx.Node | int | None:
    """fx nodes computing `expr` (sums and products of dims and integers) from `dims`; None for anything else."""
    if expr.is_Symbol:
        return dims[expr]
    if expr.is_Integer:
        return int(expr)
    if not (expr.is_Mul or expr.is_Add):
        return None
    combine = operator.mul if expr.is_Mul else operator.add
    terms = [_size_expression(graph, arg, dims) for arg in expr.args]
    if any(term is None for term in terms):
        return None
    value = lambda term: term.meta["val"] if isinstance(term, torch.fx.Node) else term  # noqa: E731
    result = terms[0]
    for term in terms[1:]:
        combined = graph.call_function(combine, (result, term))
        combined.meta["val"] = combine(value(result), value(term))  # the translator reads each node's value
        result = combined
    return result


def _translate_traced(graph_module: torch.fx.GraphModule, input_names: Sequence[str], output_names: Sequence[str],
                      dynamic_dims: Sequence[dict[int, str] | None], train_step: bool = False) -> onnx.ModelProto:
    """Translate our make_fx graph with torch.onnx's per-node translator, without torch.onnx.export around it.

    `torch.onnx.export` would first torch.export the graph (a full re-trace) and then decompose it again (a second
    one); our graph is already core aten with only the dynamic sizes symbolic, so both were pure cost (~2/3 of the
    export time). The translator wants an fx graph whose nodes carry `meta["val"]`, which make_fx records; inputs
    are the placeholders in order and outputs the output node's leaves. Only the fx passes the translation needs
    (explicit type promotion, assertion removal) are run. These are torch.onnx internals, which is why torch is
    pinned exactly; the parity suite checks every op family through this path.
    """
    from onnxscript import ir
    from torch.onnx._internal.exporter import _constants, _core, _fx_passes, _ir_passes

    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        _fx_passes.insert_type_promotion_nodes(graph_module)
        graph_module = _fx_passes.remove_assertion_nodes(graph_module)
    read_dims_from_inputs(graph_module)
    model = ir.Model(ir.Graph([], [], nodes=[], name="main_graph"), ir_version=_constants.ONNX_IR_VERSION,
                     producer_name="edgepeft")
    values = _core._translate_fx_graph(graph_module.graph, model, graph_like=model.graph, owned_graphs={},
                                       lower="at_conversion", registry=onnx_registry(train_step))
    model.graph.outputs.clear()
    output_node = next(node for node in graph_module.graph.nodes if node.op == "output")
    for leaf in torch.utils._pytree.tree_leaves(output_node.args[0]):
        if not isinstance(leaf, torch.fx.Node):
            raise ExportError(f"internal: the traced step returns a constant ({leaf!r}) instead of a tensor")
        model.graph.outputs.append(values[leaf.name])
    if len(model.graph.inputs) != len(input_names) or len(model.graph.outputs) != len(output_names):
        raise ExportError(f"internal: traced {len(model.graph.inputs)} inputs / {len(model.graph.outputs)} outputs, "
                          f"expected {len(input_names)} / {len(output_names)}")
    _ir_passes.add_opset_imports(model)
    # Symbols are named after make_fx's (s0, s1, ...); each becomes its dim's name wherever it appears, also
    # inside expressions such as batch*seq.
    symbol_names: dict[str, str] = {}
    for value, dims in zip(model.graph.inputs, dynamic_dims):
        for axis, name in (dims or {}).items():
            dim = value.shape[axis]
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                symbol_names[dim.value] = name
    _ir_passes.rename_inputs(model, list(input_names))
    _ir_passes.rename_axis(model, symbol_names)
    return ir.serde.serialize_model(model)


def tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop Identity nodes, merge exact duplicates (CSE) and remove dead nodes, with onnx-ir's generic passes.

    The translation emits one Constant per use and repeats shape computations; MiniLM's train step halves (4,485 ->
    1,960 nodes) and its fp32 peak falls ~17 MB: onnxruntime holds less graph and plans memory over fewer values.
    Only exact rewrites: CSE compares constants byte for byte and skips random ops (unlike onnxscript's optimizer,
    which once folded AdamW's `+ eps` away). Run it *after* `recompute_segments`: its clones carry a data
    dependency that keeps them from being merged back, while tidying first measured a worse recompute plan
    (MiniLM int8 peak 175 MB instead of 141).
    """
    from onnx_ir import serde
    from onnx_ir.passes import common

    ir_model = serde.deserialize_model(model)
    for tidy_pass in (common.IdentityEliminationPass(), common.CommonSubexpressionEliminationPass(),
                      common.RemoveUnusedNodesPass()):
        ir_model = tidy_pass(ir_model).model
    return serde.serialize_model(ir_model)


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
