"""What the traced graphs look like to onnxruntime: fixed sizes are numbers, dynamic ones are read off the inputs.

Both shape properties decide how well onnxruntime plans memory (it reuses a buffer only for a tensor it can prove
the same size), which the parity tests cannot see: a graph can compute the right numbers with worse plans.
"""

from __future__ import annotations

import onnx
import pytest

from exporters.onnx import plan_export

from .parity_cases import build_model, example_inputs


@pytest.fixture(scope="module")
def train_step() -> onnx.ModelProto:
    plan = plan_export(build_model("transformer", "lora+bitfit"), example_inputs("transformer"))
    return plan.trace("train_step")


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_only_the_declared_dims_are_symbolic(train_step: onnx.ModelProto) -> None:
    dims = {value.name: _dims(value) for value in train_step.graph.input}
    assert dims["input_ids"] == dims["attention_mask"] == ["batch", "seq"] and dims["labels"] == ["batch"]
    fixed = {name: shape for name, shape in dims.items() if name not in ("input_ids", "attention_mask", "labels")}
    assert len(fixed) > 20
    assert all(isinstance(size, int) for shape in fixed.values() for size in shape), \
        {name: shape for name, shape in fixed.items() if not all(isinstance(size, int) for size in shape)}


def test_view_shapes_read_their_dims_off_the_graph_inputs(train_step: onnx.ModelProto) -> None:
    """Every Reshape target built at run time reads batch and seq from the inputs, not from an activation."""
    graph = train_step.graph
    producer = {out: node for node in graph.node for out in node.output}
    inputs = {value.name for value in graph.input}

    def shape_sources(name: str, seen: set[str]) -> set[str]:
        node = producer.get(name)
        if node is None or name in seen:
            return set()
        seen.add(name)
        if node.op_type == "Shape":
            return {node.input[0]}
        return set().union(*(shape_sources(i, seen) for i in node.input if i)) if node.input else set()

    computed = [node for node in graph.node if node.op_type == "Reshape"
                and producer.get(node.input[1]) is not None and producer[node.input[1]].op_type != "Constant"]
    sources = set().union(*(shape_sources(node.input[1], set()) for node in computed))
    assert len(computed) > 20
    assert sources and sources <= inputs, sources - inputs
