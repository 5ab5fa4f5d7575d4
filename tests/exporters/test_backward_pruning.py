"""The train-step graph computes no gradient for frozen weights and no backward below the lowest trainable tensor.

A 4-layer transformer gets LoRA on query/value in its top k layers. We read the exported train-step graph itself:
per layer, the matmul FLOPs that read that layer's weights (forward, plus dX = dY W for the backward through it),
compared with the inference graph; the consumers of every frozen weight; and whether any matmul produces a tensor
shaped like a frozen weight (that would be its gradient dW = dY^T X).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepeft import LoRAConfig, apply, load_model
from edgepeft.models import make_example_batch
from exporters.graph_stats import costs_by_layer, matmul_costs, weight_consumers
from exporters.onnx import plan_export

N_LAYERS = 4
DIMS = {"batch": 3, "seq": 7}
CONFIG = dict(vocab_size=50, d_model=32, n_layers=N_LAYERS, n_heads=4, d_ff=64, max_len=16, num_classes=5)
LAYER = r"layers\.(\d+)\."

pytestmark = pytest.mark.slow


def _graphs(top_k: int):
    torch.manual_seed(0)
    model = load_model("transformer", **CONFIG)
    apply(model, LoRAConfig(r=4, alpha=8, target_modules=["query", "value"],
                            layers_to_transform=list(range(N_LAYERS - top_k, N_LAYERS))))
    plan = plan_export(model, make_example_batch(model, batch_size=DIMS["batch"], seq_len=DIMS["seq"]))
    return plan, plan.trace("train_step"), plan.trace("infer")


@pytest.fixture(scope="module")
def exported() -> dict[int, tuple]:
    return {k: _graphs(k) for k in (1, 2, N_LAYERS)}


@pytest.mark.parametrize("top_k", [1, 2])
def test_layers_below_the_lowest_trainable_run_forward_only(exported, top_k: int) -> None:
    plan, train, infer = exported[top_k]
    train_flops = costs_by_layer(matmul_costs(train, DIMS), LAYER)
    infer_flops = costs_by_layer(matmul_costs(infer, DIMS), LAYER)
    train_uses, infer_uses = weight_consumers(train), weight_consumers(infer)
    lowest = N_LAYERS - top_k
    for layer in range(N_LAYERS):
        key = str(layer)
        if layer < lowest:
            assert train_flops[key] == infer_flops[key], f"layer {layer} has backward matmuls"
            frozen = [w for w in infer_uses if w.startswith(f"frozen::layers.{layer}.")]
            assert frozen
            for weight in frozen:
                assert train_uses[weight] == infer_uses[weight], f"{weight} is read by the backward"
        else:
            # The backward passes through this layer: dX matmuls make it dearer than its forward.
            assert train_flops[key] > infer_flops[key]


@pytest.mark.parametrize("top_k", [1, 2, N_LAYERS])
def test_no_gradient_is_computed_for_any_frozen_weight(exported, top_k: int) -> None:
    from exporters.graph_stats import concrete_shapes

    plan, train, _ = exported[top_k]
    shapes = concrete_shapes(train, DIMS)
    frozen_matrix_shapes = {tuple(t.shape) for t in plan.frozen.values() if t.dim() == 2}
    produced = {tuple(shapes[n.output[0]]) for n in train.graph.node
                if n.op_type in ("MatMul", "Gemm") and n.output[0] in shapes}
    assert not produced & frozen_matrix_shapes


def test_backward_cost_grows_with_the_number_of_trained_layers(exported) -> None:
    totals, nodes = {}, {}
    for k, (_, train, infer) in exported.items():
        train_total = sum(c.flops for c in matmul_costs(train, DIMS))
        infer_total = sum(c.flops for c in matmul_costs(infer, DIMS))
        totals[k] = (train_total - infer_total) / infer_total  # backward FLOPs relative to one forward
        nodes[k] = len(train.graph.node)
    # Training only the top layer costs a fraction of a forward; training all layers costs more than that per layer.
    assert 0 < totals[1] < totals[2] < totals[N_LAYERS]
    assert totals[1] < 0.5
    assert nodes[1] < nodes[2] < nodes[N_LAYERS]
    print({k: round(v, 3) for k, v in totals.items()}, nodes)
