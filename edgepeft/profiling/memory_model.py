"""The planned memory of training a bundle: frozen weights, trainable, optimizer state, activations, runtime.

How each item is estimated (the same rules drive `edgepeft plan`):
- frozen weights: the bytes of `weights.bin` (the frozen tensors, stored once and shared by the graphs) plus the
  constants embedded in the graph files that are opened (train_step and infer); of a row table (manifest
  `weights.row_tables`) only as many rows as one batch can name, the runtime stages no more;
- trainable and optimizer state: from the manifest's specs, counted twice, because a step binds the current
  tensors as inputs while the graph writes the updated ones into new buffers before the trainer drops the old;
- activations: every intermediate value of the train-step graph is given its concrete shape at this batch size /
  sequence length (`exporters.graph_stats.concrete_shapes`: one onnxruntime run on zeros with every value exposed),
  and its dtype from onnx shape inference (4 bytes where inference gives none); walking the nodes in graph order,
  a value is live from the node that makes it to its last reader, and the estimate is the largest total of live
  values. onnxruntime's planner follows the same graph order but also reuses buffers in place and fuses nodes
  (which lowers the real figure) and rounds allocations up in its arena (which raises it);
- runtime baseline: not modelled; it is measured (RSS after importing numpy + onnxruntime + device_runtime).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

from exporters.graph_stats import concrete_shapes

__all__ = ["MemoryPlan", "graph_dims", "activation_bytes", "plan_memory", "spec_bytes"]


@dataclass(frozen=True)
class MemoryPlan:
    """Planned bytes by item; `total` excludes the runtime baseline, which is measured, not planned."""

    frozen_weights: int
    graph_constants: int
    trainable: int
    optimizer_state: int
    activations_peak_live: int
    activations_all_values: int
    batch_size: int
    seq_len: int

    @property
    def total(self) -> int:
        return (self.frozen_weights + self.graph_constants + 2 * self.trainable + 2 * self.optimizer_state
                + self.activations_peak_live)

    def as_dict(self) -> dict:
        return {
            "frozen_weights": self.frozen_weights, "graph_constants": self.graph_constants,
            "trainable": self.trainable, "trainable_in_step": 2 * self.trainable,
            "optimizer_state": self.optimizer_state, "optimizer_state_in_step": 2 * self.optimizer_state,
            "activations_peak_live": self.activations_peak_live,
            "activations_all_values": self.activations_all_values, "total_without_runtime": self.total,
            "batch_size": self.batch_size, "seq_len": self.seq_len,
        }


def spec_bytes(specs) -> int:
    """Bytes of a list of TensorSpecs with fixed shapes (trainable tensors, optimizer state)."""
    return sum(math.prod(s.shape) * s.numpy_dtype.itemsize for s in specs)


def graph_dims(model: onnx.ModelProto, batch_size: int, seq_len: int) -> dict[str, int]:
    """Values for the graph's symbolic dims: 'batch' is the batch size, every other one the sequence length."""
    names = {d.dim_param for v in model.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    return {name: batch_size if name == "batch" else seq_len for name in names}


def _itemsizes(model: onnx.ModelProto) -> dict[str, int]:
    typed = shape_inference.infer_shapes(model)
    sizes = {}
    for value in [*typed.graph.value_info, *typed.graph.output, *typed.graph.input]:
        elem = value.type.tensor_type.elem_type
        if elem:
            sizes[value.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize
    return sizes


def activation_bytes(model: onnx.ModelProto, batch_size: int, seq_len: int) -> tuple[int, int]:
    """(peak bytes of live intermediate values in graph order, bytes of all intermediate values) at this size.

    Graph inputs, initializers and graph outputs are not activations (they are counted as weights, trainable and
    state); `model` must have its external data loaded.
    """
    shapes = concrete_shapes(model, graph_dims(model, batch_size, seq_len))
    itemsize = _itemsizes(model)
    boundary = {v.name for v in model.graph.input} | {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    last_use: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            if name:
                last_use[name] = index

    def size(name: str) -> int:
        return math.prod(shapes.get(name, [])) * itemsize.get(name, 4)

    live: dict[str, int] = {}
    peak = total = 0
    for index, node in enumerate(model.graph.node):
        for name in node.output:
            if name and name not in boundary and name not in outputs:
                live[name] = size(name)
                total += live[name]
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last_use.get(n, -1) <= index]:
            del live[name]
    return peak, total


def _unstaged_row_bytes(bundle, dims: dict[str, int]) -> int:
    """Bytes of the row tables' rows that a batch at these dims cannot name (never resident on the device)."""
    weights = bundle.manifest.get("weights") or {}
    specs = {spec.name: spec for spec in bundle.inputs}
    unstaged = 0
    for name, index in (weights.get("row_tables") or {}).items():
        tensor = weights["tensors"][name]
        rows = tensor["shape"][0]
        ids = math.prod(d if isinstance(d, int) else dims.get(d, 1) for d in specs[index].shape)
        unstaged += (rows - min(rows, ids)) * (tensor["length"] // max(rows, 1))
    return unstaged


def _graph_constant_bytes(path: Path) -> int:
    """Bytes of tensors stored inside a graph file (Constant nodes, small initializers), not in weights.bin."""
    model = onnx.load(str(path), load_external_data=False)
    inline = sum(len(t.raw_data) for t in model.graph.initializer if not t.external_data)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                inline += len(attr.t.raw_data) or attr.t.ByteSize()
    return inline


def plan_memory(bundle, batch_size: int, seq_len: int) -> MemoryPlan:
    """The planned breakdown for training `bundle` (a device_runtime Bundle) at this batch size / sequence length."""
    weights = bundle.path / "weights.bin"
    frozen = weights.stat().st_size if weights.is_file() else 0
    train_model = onnx.load(str(bundle.graph_path("train_step")))
    frozen -= _unstaged_row_bytes(bundle, graph_dims(train_model, batch_size, seq_len))
    peak, total = activation_bytes(train_model, batch_size, seq_len)
    constants = sum(_graph_constant_bytes(bundle.graph_path(g)) for g in ("train_step", "infer"))
    return MemoryPlan(
        frozen_weights=frozen, graph_constants=constants, trainable=spec_bytes(bundle.trainable),
        optimizer_state=spec_bytes(bundle.optimizer_state), activations_peak_live=peak,
        activations_all_values=total, batch_size=batch_size, seq_len=seq_len,
    )
