"""Rematerialization of cheap saved activations: rebuild them in the backward instead of keeping them alive.

A train step keeps every forward tensor its backward reads. Some of those are cheap to rebuild from tensors the
backward keeps anyway: a transformer layer's attention probabilities are softmax(Q K^T * scale + mask), and Q and
K stay saved for the gradients of K and Q; a LayerNorm's output is rebuilt from its input, which its own backward
keeps; a reshaped copy of a saved tensor is one copy away. At batch 8 x seq 64, MiniLM's attention probabilities
alone, with the reshaped copy its P @ V matmul keeps, are 3 MB per layer.

This pass finds those tensors by a cost model rather than by pattern:

- a saved tensor is rebuilt only through *cheap* ops: data movement, elementwise arithmetic, softmax, LayerNorm,
  and matmuls whose operands are both activations (attention). A matmul against a weight, a custom or random op,
  or a control-flow node is not re-run: that is what `exporters.recompute` is for, at a price in time. With
  `expanding_matmuls=True` one kind is: a weight matmul (any domain: DynamicQuantizeMatMul too) whose output is at
  least twice the activation it reads, a transformer's FFN up-projection. Its output (the GELU's input, 4x the
  hidden size) is the largest tensor a layer saves, and it is rebuilt from the LayerNorm output, itself rebuilt
  from a tensor kept anyway: one matmul per layer re-run for 3 MB on MiniLM at batch 8 x 64;
- walking up from a saved tensor, each input is either free (saved anyway, a graph input, an initializer) or must
  be kept alive for the rebuild, costing its bytes, or rebuilt in turn; the walk takes the cheaper, weighing
  tensors at the bundle's declared dim bounds (else the example's sizes: batch, and seq where unbounded);
- a tensor is rebuilt when the bytes newly kept for it are less than its own, and nothing the rebuild materializes
  (a clone's output, a gated copy) is larger than it: every rewrite lowers what the backward holds at its start
  without a big transient for a small saving (a LayerNorm re-run for its 2 KB of statistics);
- tensors of the last two LayerNorm segments stay: their backward runs first, while everything is still live, so
  a rebuild there only adds transients at the peak.

The rebuild is a clone of the forward nodes, gated like `exporters.recompute`'s (every activation it starts from
gets `+ 0 * g`, g a gradient computed right before the first read) so onnxruntime runs it where the backward needs
it. Values are bit-identical to the originals: same kernels, same inputs.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from .graph_rewrite import TrainStep, clone_node, gate_nodes, gate_tensor, replace_nodes

__all__ = ["RematerializeReport", "rematerialize_cheap"]

_SUFFIX = "__remat"
# Ops that are cheap to run again relative to the bytes their outputs hold. Deterministic only: Dropout and the
# random ops are not here, and neither are weight matmuls, Conv, Gather (an embedding lookup) or custom domains.
_CHEAP = frozenset({
    "Reshape", "Transpose", "Expand", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "CastLike", "Slice",
    "Concat",
    "Shape", "Constant", "ConstantOfShape", "Range",
    "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Pow", "Erf", "Tanh", "Exp", "Log", "Abs", "Relu",
    "Sigmoid", "Where", "Not", "And", "Or", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
    "Softmax", "LogSoftmax", "LayerNormalization", "MatMul",
})
_ELEMENT_BYTES = {TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2,
                  TensorProto.INT64: 8, TensorProto.INT32: 4, TensorProto.INT8: 1, TensorProto.UINT8: 1,
                  TensorProto.BOOL: 1}
# Ops whose output is small when their inputs are (shape arithmetic), and what counts as small there.
_SHAPE_PRESERVING = frozenset({"Concat", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Gather", "Cast", "Identity",
                               "Shape", "Add", "Sub", "Mul", "Div", "Neg", "Equal", "Not", "Where"})
_SMALL = 256
_MAX_RANK = 8
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


@dataclass(frozen=True)
class RematerializeReport:
    """What the pass did, for the manifest: tensors rebuilt, nodes cloned to do it, and the bytes it released
    from the backward's start and newly kept there instead, weighed at `dims`."""

    tensors: int
    cloned_nodes: int
    released_bytes: int
    kept_bytes: int
    dims: dict[str, int]
    expanding_matmuls: bool = False

    def manifest_entry(self) -> dict[str, object]:
        return {"tensors": self.tensors, "cloned_nodes": self.cloned_nodes, "released_bytes": self.released_bytes,
                "kept_bytes": self.kept_bytes, "weighed_at": dict(self.dims),
                "expanding_matmuls": self.expanding_matmuls}


def _dim_value(dim: onnx.TensorShapeProto.Dimension, dims: Mapping[str, int]) -> int | None:
    """A dim's size at the example: a number, a symbol, or the exporter's sums and products of symbols."""
    if dim.HasField("dim_value"):
        return dim.dim_value
    if not dim.dim_param:
        return None

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in dims:
            return dims[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(dim.dim_param)

    try:
        return value(ast.parse(dim.dim_param, mode="eval").body)
    except (SyntaxError, ValueError, KeyError):
        return None


def _tensor_sizes(graph: onnx.GraphProto, dims: Mapping[str, int]) -> tuple[dict[str, int], set[str]]:
    """Bytes of every typed value at `dims` (values of unknown size are absent, so never rebuilt through), and
    the values with a symbolic dim: activations, as opposed to weights and constants, whose shapes are fixed."""
    sizes, dynamic = {}, set()
    for info in [*graph.value_info, *graph.input, *graph.output]:
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        if any(not dim.HasField("dim_value") for dim in tensor.shape.dim):
            dynamic.add(info.name)
        if tensor.elem_type not in _ELEMENT_BYTES:
            continue
        count = 1
        for dim in tensor.shape.dim:
            size = _dim_value(dim, dims)
            if size is None:
                break
            count *= size
        else:
            sizes[info.name] = count * _ELEMENT_BYTES[tensor.elem_type]
    for tensor in graph.initializer:
        if tensor.data_type in _ELEMENT_BYTES:
            sizes.setdefault(tensor.name, math.prod(tensor.dims) * _ELEMENT_BYTES[tensor.data_type])
    _size_shape_arithmetic(graph, sizes)
    return sizes, dynamic


def _size_shape_arithmetic(graph: onnx.GraphProto, sizes: dict[str, int]) -> None:
    """Give the untyped values of shape arithmetic a size: Constant outputs their value's, and the outputs of ops
    whose small inputs make a small output (Concat of sizes, Reshape, Gather, scalar arithmetic; not Expand, Range
    or ConstantOfShape, which size their output by value) the inputs' total. The exporter leaves these without
    value_info; unweighed, they would look unaffordable and block every rebuild that reads a shape."""
    for node in graph.node:
        outputs = [name for name in node.output if name and name not in sizes]
        if not outputs:
            continue
        if node.op_type == "Constant" and node.attribute:
            attribute = node.attribute[0]
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in _ELEMENT_BYTES:
                sizes[outputs[0]] = math.prod(attribute.t.dims) * _ELEMENT_BYTES[attribute.t.data_type]
            elif attribute.type in (onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT):
                sizes[outputs[0]] = 8
            elif attribute.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS):
                sizes[outputs[0]] = 8 * max(len(attribute.ints), len(attribute.floats))
        elif node.op_type in _SHAPE_PRESERVING and all(sizes.get(n, _SMALL + 1) <= _SMALL for n in node.input if n):
            for name in outputs:
                sizes[name] = sum(sizes.get(n, 0) for n in node.input if n)
        elif node.op_type == "Shape":  # int64 dims of any tensor: small whatever the input
            sizes[outputs[0]] = 8 * _MAX_RANK
        elif node.op_type == "CastLike" and sizes.get(node.input[0], _SMALL + 1) <= _SMALL:
            # A constant cast to an activation's type (torch's full_like): input 0's elements, at most 8 bytes each.
            sizes[outputs[0]] = 8 * sizes[node.input[0]]


def _weight_op(node: onnx.NodeProto, dynamic: set[str]) -> bool:
    """A matmul, Gemm or convolution (any domain, quantized ones too) with an operand of fixed shape: a weight."""
    return (any(word in node.op_type for word in ("MatMul", "Gemm", "Conv"))
            and any(name and name not in dynamic for name in node.input[:2]))


@dataclass
class _Plan:
    """A rebuild: forward nodes to clone, tensors the clones read from outside (gated ones included), the gated
    ones, and the saved tensors it rebuilds."""

    nodes: set[int]
    reads: set[str]
    gated: set[str]
    names: list[str]

    def merge(self, other: _Plan) -> None:
        self.nodes |= other.nodes
        self.reads |= other.reads
        self.gated |= other.gated
        self.names.extend(other.names)


class _Planner:
    """The cost walk: which saved tensors to rebuild, from which tensors, with which forward nodes."""

    def __init__(self, nodes: list[onnx.NodeProto], producer: dict[str, int], forward: set[int],
                 external: set[str], sizes: dict[str, int], dynamic: set[str], gateable: set[str], saved: set[str],
                 expanding_matmuls: bool = False):
        self.nodes, self.producer, self.forward, self.external = nodes, producer, forward, external
        self.sizes, self.dynamic, self.gateable, self.kept = sizes, dynamic, gateable, set(saved)
        self.expanding_matmuls = expanding_matmuls
        self._cost: dict[str, float] = {}

    def _cheap(self, index: int) -> bool:
        node = self.nodes[index]
        if index not in self.forward:
            return False
        if _weight_op(node, self.dynamic):
            return self.expanding_matmuls and self._expands(node)
        return node.domain in ("", "ai.onnx") and node.op_type in _CHEAP

    def _expands(self, node: onnx.NodeProto) -> bool:
        """A weight matmul whose output is at least twice its one activation operand. Per FLOP every weight matmul
        releases the same (its work is output elements x contraction); this one's output is what a layer saves
        most of (the GELU's input), while the others' outputs are either not saved or Q/K/V, which the attention
        rebuilds need kept."""
        activations = [name for name in node.input[:2] if name in self.dynamic]
        out = self.sizes.get(node.output[0])
        source = self.sizes.get(activations[0]) if len(activations) == 1 else None
        return bool(out and source and out >= 2 * source)

    def _free(self, name: str) -> bool:
        return not name or name in self.external or name in self.kept

    def _own(self, name: str) -> float:
        return float(self.sizes.get(name, float("inf")))

    def cost(self, name: str) -> float:
        """Bytes newly kept alive to have `name` in the backward: 0 if kept anyway, else its own size or the cost
        of rebuilding it from its inputs, whichever is less (iterative: chains of cheap ops can be long)."""
        stack = [name]
        while stack:
            tensor = stack[-1]
            if self._free(tensor) or tensor in self._cost:
                stack.pop()
                continue
            index = self.producer[tensor]
            if not self._cheap(index):
                self._cost[tensor] = self._own(tensor)
                stack.pop()
                continue
            inputs = self.nodes[index].input
            pending = [n for n in inputs if not self._free(n) and n not in self._cost]
            if pending:
                stack.extend(pending)
                continue
            rebuild = sum(self._cost.get(n, 0.0) for n in inputs if not self._free(n))
            self._cost[tensor] = min(self._own(tensor), rebuild)
            stack.pop()
        return 0.0 if self._free(name) else self._cost[name]

    def rebuild(self, name: str) -> _Plan | None:
        """Nodes that rebuild saved tensor `name`, and the tensors they start from; None if not worth it."""
        if not self._cheap(self.producer[name]) or name not in self.sizes:
            return None
        self.kept.discard(name)
        self._cost.clear()
        nodes: set[int] = set()
        starts: set[str] = set()
        stack = [name]
        while stack:
            tensor = stack.pop()
            if not tensor or tensor in self.external:
                continue
            at = self.producer[tensor]
            if tensor != name and (tensor in self.kept or not self._cheap(at)
                                   or self.cost(tensor) >= self._own(tensor)):
                starts.add(tensor)
                continue
            if at not in nodes:
                nodes.add(at)
                stack.extend(self.nodes[at].input)
        plan = self._clones(nodes, starts)
        new = sum(self._own(t) for t in plan.reads if t not in self.kept)
        built = [self._own(t) for t in plan.gated] + [self._own(t) for i in plan.nodes
                                                      for t in self.nodes[i].output if t]
        if self.producer[name] not in plan.nodes or new >= self.sizes[name] or max(built) > self.sizes[name]:
            self.kept.add(name)
            self._cost.clear()
            return None
        self.kept |= plan.reads
        self._cost.clear()
        plan.names.append(name)
        return plan

    def _clones(self, nodes: set[int], starts: set[str]) -> _Plan:
        """What the rewrite will really clone: the nodes downstream of a start it can gate (a float activation:
        `+ 0 * g`); the others stay originals, and every tensor the clones read from outside becomes kept."""
        gated = {s for s in starts if s in self.gateable}
        cloned: set[int] = set()
        made: set[str] = set()
        for index in sorted(nodes):
            if any(n in gated or n in made for n in self.nodes[index].input):
                cloned.add(index)
                made.update(n for n in self.nodes[index].output if n)
        reads = {n for i in cloned for n in self.nodes[i].input if n and n not in made and n not in self.external}
        return _Plan(cloned, reads, gated & reads, [])


def rematerialize_cheap(model: onnx.ModelProto, dims: Mapping[str, int], loss: str = "loss",
                        keep_last: int = 2, expanding_matmuls: bool = False) -> RematerializeReport:
    """Rewrite `model` (a traced train step, in topological order) in place; see the module docstring.

    `dims`: a size for every symbolic dim, to weigh tensors. `keep_last`: how many of the last LayerNorm segments
    keep their tensors, as in `exporters.recompute` (0: none). `expanding_matmuls`: also re-run weight matmuls
    that expand their input (see the module docstring). A graph with nothing to rebuild (an MLP keeps little
    besides weight-matmul inputs) is left as it was.
    """
    graph = model.graph
    step = TrainStep.index(graph, loss, "rematerialization")
    nodes, producer, consumers, forward = step.nodes, step.producer, step.consumers, step.forward
    external = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    sizes, dynamic = _tensor_sizes(graph, dims)
    heavy = [i for i in forward if nodes[i].op_type == "LayerNormalization" or _weight_op(nodes[i], dynamic)]
    if not heavy:
        return RematerializeReport(0, 0, 0, 0, dict(dims), expanding_matmuls)
    chain = step.gradient_chain(after=max(heavy))
    outputs = {o.name for o in graph.output}
    saved = {name for i in forward for name in nodes[i].output
             if name and name not in outputs and any(c not in forward for c in consumers[name])}
    floats = {info.name for info in graph.value_info if info.type.tensor_type.elem_type == TensorProto.FLOAT}
    planner = _Planner(nodes, producer, forward, external, sizes, dynamic, floats & producer.keys(), saved,
                       expanding_matmuls)
    # The last segments' tensors are read first, right after the loss, while the backward holds the most: a rebuild
    # there adds its transients at the peak instead of lowering it (MiniLM with full recompute: +3 MB).
    norms = sorted(i for i in forward if nodes[i].op_type == "LayerNormalization")
    last = norms[-keep_last] if 0 < keep_last <= len(norms) else len(nodes)
    groups: list[_Plan] = []  # rebuilds that share nodes (probabilities and their reshaped copy) clone once
    for name in sorted(saved, key=producer.__getitem__):
        if producer[name] > last:
            continue
        plan = planner.rebuild(name)
        if plan is None:
            continue
        for other in [g for g in groups if g.nodes & plan.nodes]:
            groups.remove(other)
            plan.merge(other)
        groups.append(plan)
    inserted: list[onnx.NodeProto] = []
    constants: list[TensorProto] = []
    released = cloned = tensors = 0
    read_by_clones: set[str] = set()
    for number, group in enumerate(sorted(groups, key=lambda g: min(g.nodes))):
        first = _first_chain_read(nodes, group.names, forward, chain, consumers)
        gate = gate_tensor(nodes, chain, first, producer) if first is not None else None
        if gate is None or not group.gated:
            continue
        gates, clones, gate_constants, rename = _clone_group(nodes, group, gate, f"remat/group{number}")
        inserted.extend([*gates, *clones])
        constants.extend(gate_constants)
        cloned += len(clones)
        read_by_clones |= {n for clone in clones for n in clone.input} | group.gated
        for name in group.names:
            if name not in rename:
                continue
            released += planner.sizes[name]
            tensors += 1
            step.redirect(name, rename[name], lambda c: c not in forward)
    graph.initializer.extend(constants)
    replace_nodes(graph, nodes + inserted)
    newly_kept = {n for n in read_by_clones if n in producer and producer[n] in forward and n not in saved}
    kept = sum(planner.sizes.get(name, 0) for name in newly_kept)
    return RematerializeReport(tensors, cloned, released, kept, dict(dims), expanding_matmuls)


def _clone_group(nodes: list[onnx.NodeProto], group: _Plan, gate: str, tag: str
                 ) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto], list[TensorProto], dict[str, str]]:
    """The gates of a group's starts, the clones of its nodes that depend on them (in order), the constants the
    gates need, and the map from original to rebuilt tensor names."""
    gates: list[onnx.NodeProto] = []
    new: list[onnx.NodeProto] = []
    constants: list[TensorProto] = []
    rename: dict[str, str] = {}
    for number, start in enumerate(sorted(group.gated)):
        gate_nodes_, gate_constants, rename[start] = gate_nodes(start, gate, f"{tag}/{number}")
        gates.extend(gate_nodes_)
        constants.extend(gate_constants)
    for i in sorted(group.nodes):
        node = nodes[i]
        if not any(name in rename for name in node.input):
            continue  # nothing gated reaches it: the planner counted its outputs as kept originals
        new.append(clone_node(node, i, tag, rename, _SUFFIX))
    return gates, new, constants, rename


def _first_chain_read(nodes: list[onnx.NodeProto], names: list[str], forward: set[int], chain: set[int],
                      consumers: Mapping[str, list[int]]) -> int | None:
    """Position of the first gradient-chain node that reads `names`, directly or through backward nodes outside
    the chain (the aliases torch saves, derivatives computed from forward tensors alone)."""
    first = None
    seen: set[int] = set()
    stack = [c for name in names for c in consumers.get(name, []) if c not in forward]
    while stack:
        index = stack.pop()
        if index in seen:
            continue
        seen.add(index)
        if index in chain:
            first = index if first is None else min(first, index)
        else:
            stack.extend(c for name in nodes[index].output for c in consumers.get(name, []))
    return first
