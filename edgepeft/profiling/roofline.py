"""Roofline projection of a bundle's train step and inference onto a target device profile (a PROJECTION).

    projected time = max(FLOPs / peak fp32 FLOP/s, bytes moved / memory bandwidth)

- FLOPs: 2 x multiply-adds of every MatMul / Gemm / Conv node, and of the quantized matmuls (MatMulNBits,
  DynamicQuantizeMatMul; projected at the fp32 peak too, pessimistic where int8 dot products run faster), at this
  batch size and sequence length
  (`exporters.graph_stats.matmul_costs`); element-wise ops, softmax and norms are left out (a few % of a step).
- bytes moved: every frozen weight read once, trainable tensors and optimizer state read once and written once,
  and every intermediate value written once and read once (no cache reuse: for models that fit in cache this term
  is pessimistic, which is why the larger of the two terms is what is reported).
- peak FLOP/s and bandwidth come from the target's profile (see its `sources`): fp32 peak, because the train step
  computes in fp32 (int4/int8 frozen weights are dequantized in the kernel).

The roofline is a lower bound: it ignores per-node dispatch cost, which dominates small graphs (the same bound
computed for this host, with its measured GEMM throughput, is reported beside the measured time to show the gap).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from exporters.graph_stats import matmul_costs

from .memory_model import activation_bytes, graph_dims, spec_bytes

__all__ = ["GraphCost", "graph_cost", "project"]


@dataclass(frozen=True)
class GraphCost:
    graph: str
    flops: int
    bytes_moved: int
    matmul_nodes: int
    nodes: int


def graph_cost(bundle, graph: str, batch_size: int, seq_len: int) -> GraphCost:
    """FLOPs and bytes moved by one run of `graph` of `bundle` at this size (rules in the module docstring)."""
    model = onnx.load(str(bundle.graph_path(graph)))
    costs = matmul_costs(model, graph_dims(model, batch_size, seq_len))
    _, all_values = activation_bytes(model, batch_size, seq_len)
    weights = bundle.path / "weights.bin"
    frozen = weights.stat().st_size if weights.is_file() else 0
    trainable = spec_bytes(bundle.trainable)
    state = spec_bytes(bundle.optimizer_state) if graph == "train_step" else 0
    updated = 2 if graph == "train_step" else 1  # read, and for the train step also written back
    moved = frozen + updated * (trainable + state) + 2 * all_values
    return GraphCost(graph, sum(c.flops for c in costs), moved, len(costs), len(model.graph.node))


def project(cost: GraphCost, profile: dict) -> dict:
    """Roofline time of `cost` on a device profile, labelled as a projection."""
    compute_s = cost.flops / (profile["peak_fp32_gflops"] * 1e9)
    memory_s = cost.bytes_moved / (profile["memory_bandwidth_gbs"] * 1e9)
    return {
        "label": "PROJECTION (roofline lower bound, not a measurement)",
        "target": profile["id"],
        "compute_ms": compute_s * 1e3,
        "memory_ms": memory_s * 1e3,
        "projected_ms": max(compute_s, memory_s) * 1e3,
        "bound": "compute" if compute_s >= memory_s else "memory",
        "peak_fp32_gflops": profile["peak_fp32_gflops"],
        "memory_bandwidth_gbs": profile["memory_bandwidth_gbs"],
    }
