"""Count nodes and estimate matmul FLOPs of an exported ONNX graph, per node and per named layer.

Used by the pruning tests (a frozen layer below the lowest trainable tensor must cost the same in the train step as
in inference: forward only) and by profiling (the compute floor of a step). Estimates count the multiply-adds of
MatMul / Gemm / Conv and of the quantized matmuls (MatMulNBits, DynamicQuantizeMatMul) as 2 FLOPs each, after shape
inference with concrete values for the symbolic dims.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import onnx
from onnx import shape_inference

__all__ = ["NodeCost", "concrete_shapes", "matmul_costs", "weight_consumers", "costs_by_layer"]

# onnxruntime's quantized matmuls: A [..., K] times a [K, N] matrix stored packed (MatMulNBits) or as uint8 codes
# (DynamicQuantizeMatMul); the multiply-adds are those of the fp32 MatMul they replace.
_QUANTIZED_MATMULS = ("MatMulNBits", "DynamicQuantizeMatMul")
_PASS_THROUGH = {"Transpose", "Reshape", "Identity", "Cast", "Unsqueeze", "Squeeze", "DequantizeLinear", "Flatten"}


@dataclass(frozen=True)
class NodeCost:
    node: str
    op_type: str
    flops: int
    weights: tuple[str, ...]  # initializers / trainable inputs that feed this node (through reshapes/transposes)


def concrete_shapes(model: onnx.ModelProto, dims: dict[str, int]) -> dict[str, list[int]]:
    """Shapes of every value when the graph runs with the symbolic dims set to `dims`.

    onnx's static shape inference cannot follow the shape arithmetic torch.onnx emits (Shape -> Gather -> Concat
    -> Reshape), so the graph is run once in onnxruntime on zero inputs with every intermediate value exposed.
    External initializers must already be loaded into `model`.
    """
    import numpy as np
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    typed = shape_inference.infer_shapes(model)
    elem_type = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
    exposed = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in exposed and elem_type.get(name):
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type[name], None))
                exposed.add(name)
    feeds = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        shape = []
        for d in tensor_type.shape.dim:
            if d.dim_param and d.dim_param not in dims:
                raise KeyError(f"no value given for symbolic dim {d.dim_param!r}")
            shape.append(dims[d.dim_param] if d.dim_param else d.dim_value)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = np.ones(shape, dtype) if value.name == "step" else np.zeros(shape, dtype)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    shapes = {name: list(np.shape(v)) for name, v in zip(names, session.run(names, feeds))}
    shapes.update({name: list(np.shape(v)) for name, v in feeds.items()})
    shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    return shapes


def _sources(model: onnx.ModelProto) -> dict[str, set[str]]:
    """For each value, the weights it is a plain view of (through transposes, reshapes, casts...)."""
    weights = {i.name for i in model.graph.initializer} | {
        i.name for i in model.graph.input if i.name.startswith(("trainable::", "frozen::"))
    }
    source: dict[str, set[str]] = {w: {w} for w in weights}
    for node in model.graph.node:
        if node.op_type in _PASS_THROUGH and node.input and node.input[0] in source:
            for out in node.output:
                source[out] = source[node.input[0]]
    return source


def weight_consumers(model: onnx.ModelProto) -> Counter:
    """How many compute nodes read each weight (directly or through a view): 1 = forward only for a Linear."""
    source = _sources(model)
    counts: Counter = Counter()
    for node in model.graph.node:
        if node.op_type in _PASS_THROUGH:
            continue
        for name in node.input:
            for weight in source.get(name, ()):
                counts[weight] += 1
    return counts


def matmul_costs(model: onnx.ModelProto, dims: dict[str, int]) -> list[NodeCost]:
    """FLOPs of every MatMul / Gemm / Conv / quantized matmul node, with the weights that feed it."""
    shapes = concrete_shapes(model, dims)
    source = _sources(model)
    costs = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv", *_QUANTIZED_MATMULS):
            continue
        a, b, out = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if a is None or b is None or out is None:
            raise ValueError(f"shape inference left {node.name} ({node.op_type}) without concrete shapes")
        if node.op_type == "Conv":
            # out = N x Cout x spatial; each output element needs Cin/groups x kernel MACs
            flops = 2 * math.prod(out) * math.prod(b[1:])
        else:
            inner = a[0] if node.op_type == "Gemm" and _attr(node, "transA") else a[-1]
            flops = 2 * math.prod(out) * inner
        feeding = tuple(sorted({w for name in node.input for w in source.get(name, ())}))
        costs.append(NodeCost(node.name, node.op_type, flops, feeding))
    return costs


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def costs_by_layer(costs: list[NodeCost], layer_pattern: str) -> dict[str, int]:
    """Sum FLOPs per layer, a node's layer read from its weights' names with `layer_pattern` (one group)."""
    totals: dict[str, int] = defaultdict(int)
    regex = re.compile(layer_pattern)
    for cost in costs:
        layers = {m.group(1) for w in cost.weights if (m := regex.search(w))}
        key = layers.pop() if len(layers) == 1 else ("unattributed" if not layers else "mixed")
        totals[key] += cost.flops
    return dict(totals)
