"""Matmul FLOPs are counted the same whatever kernel a quantized base runs them on.

A quantized frozen Linear becomes MatMulNBits (int8 / int4) or DynamicQuantizeMatMul (int8-dynamic) instead of
MatMul / Gemm; the multiply-adds are the same, so the train step and inference graphs of one model must count the
same FLOPs under every scheme (profiling's roofline reads these counts), per layer wherever the weight reaches the
matmul as stored (the int8 / int4 backward dequantizes first, so its matmuls count as unattributed).
"""

from __future__ import annotations

import pytest
import torch

from edgepeft import LoRAConfig, apply, load_model
from edgepeft.models import make_example_batch
from edgepeft.quantization import quantize_frozen
from exporters.graph_stats import costs_by_layer, matmul_costs
from exporters.onnx import plan_export

DIMS = {"batch": 3, "seq": 7}
CONFIG = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16, num_classes=5)
LAYER = r"layers\.(\d+)\."

pytestmark = pytest.mark.slow


def _flops(scheme: str | None) -> dict[str, tuple[dict[str, int], set[str]]]:
    torch.manual_seed(0)
    model = apply(load_model("transformer", **CONFIG), LoRAConfig(r=4, alpha=8, target_modules=["query", "value"]))
    quantize_frozen(model, scheme)
    plan = plan_export(model, make_example_batch(model, batch_size=DIMS["batch"], seq_len=DIMS["seq"]))
    result = {}
    for graph in ("train_step", "infer"):
        costs = matmul_costs(plan.trace(graph), DIMS)
        result[graph] = (costs_by_layer(costs, LAYER), {c.op_type for c in costs})
    return result


def test_quantized_matmuls_count_like_the_fp32_ones() -> None:
    reference = _flops(None)
    kernels = {"int8": "MatMulNBits", "int4": "MatMulNBits", "int8-dynamic": "DynamicQuantizeMatMul"}
    for scheme, kernel in kernels.items():
        flops = _flops(scheme)
        for graph, (per_layer, op_types) in flops.items():
            assert kernel in op_types, (scheme, graph, op_types)
            assert sum(per_layer.values()) == sum(reference[graph][0].values()), (scheme, graph)
            if graph == "infer" or scheme == "int8-dynamic":
                assert per_layer == reference[graph][0], (scheme, graph)
