"""Which nodes of a bundle's graphs each mobile execution provider could take, and which fall back to the CPU EP.

This uses onnxruntime's own mobile usability checker (`onnxruntime.tools.mobile_helpers.usability_checker`, the
code behind `python -m onnxruntime.tools.check_onnx_model_mobile_usability`), which replays onnxruntime's
partitioning (`CreateSupportedPartitionNodeGroups`) over a graph given a table of the ops an EP supports:
- NNAPI and Core ML (MLProgram): the op tables onnxruntime ships with that tool;
- QNN (Hexagon HTP) and XNNPACK: tables in `edgepeft/profiles/ep_ops/`, in the same format, read from the EPs'
  sources (each file says where from); for XNNPACK the rule that MatMul / Gemm weights must be constant is checked,
  which is what keeps it off every LoRA matmul (their B input is a trainable graph input).

As a mobile deployment would, the graphs are first given fixed shapes (the profiled batch size and sequence
length, as `python -m onnxruntime.tools.make_dynamic_shape_fixed` does) and optimized at the basic level (as the
ORT-format conversion does). What this cannot see: an op's attribute/dtype caveats (listed, not checked) and the
EP's run-time validation on the phone. It is an op-coverage analysis, not a measurement on an NPU.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path

import onnx
from onnxruntime.tools import onnx_model_utils
from onnxruntime.tools.mobile_helpers import usability_checker

from .memory_model import graph_dims

__all__ = ["EP_PATHS", "npu_report", "analyze_graph"]

EP_OPS_DIR = Path(__file__).resolve().parent.parent / "profiles" / "ep_ops"
_MLPROGRAM = "coreml_supported_mlprogram_ops.md"
EP_PATHS = {
    "qnn": "QNN (Qualcomm Hexagon HTP)",
    "nnapi": "NNAPI (Android)",
    "coreml": "Core ML MLProgram (Apple ANE/GPU/CPU)",
    "xnnpack": "XNNPACK (CPU)",
}


class _ConstantWeightChecker(usability_checker._SupportedOpsChecker):
    """XNNPACK takes MatMul / Gemm only with a constant B (its kernels pack the weights once)."""

    def __init__(self, filename: Path, initializers: set[str]) -> None:
        super().__init__(filename)
        self._initializers = initializers

    def is_op_supported(self, node: onnx.NodeProto) -> bool:
        if node.op_type in ("MatMul", "Gemm") and (len(node.input) < 2 or node.input[1] not in self._initializers):
            return False
        return super().is_op_supported(node)


def _prepared_model(graph_path: Path, batch_size: int, seq_len: int, workdir: Path) -> onnx.ModelProto:
    """The graph with fixed input shapes, optimized at the basic level, with shape information."""
    model = onnx.load(str(graph_path))
    for name, value in graph_dims(model, batch_size, seq_len).items():
        onnx_model_utils.make_dim_param_fixed(model.graph, name, value)
    onnx_model_utils.fix_output_shapes(model)
    fixed = workdir / f"{graph_path.stem}.fixed.onnx"
    onnx.save(model, str(fixed), save_as_external_data=True, location=f"{graph_path.stem}.fixed.data")
    optimized = workdir / f"{graph_path.stem}.basic.onnx"
    onnx_model_utils.optimize_model(fixed, optimized, use_external_initializers=True)
    return onnx_model_utils.ModelProtoWithShapeInfo(optimized).model_with_shape_info


def _partitioning(model: onnx.ModelProto, ep: str) -> usability_checker.PartitioningInfo:
    if ep == "nnapi":
        return usability_checker.check_nnapi_partitions(model, True)
    if ep == "coreml":
        return usability_checker.check_coreml_partitions(model, True, _MLPROGRAM)
    table = EP_OPS_DIR / f"{ep}_supported_ops.md"
    if ep == "xnnpack":
        checker = _ConstantWeightChecker(table, {i.name for i in model.graph.initializer})
    else:
        checker = usability_checker._SupportedOpsChecker(table)
    return usability_checker.check_partitioning(model.graph, checker, True)


def analyze_graph(model: onnx.ModelProto, ep: str) -> dict:
    """Partitioning of one prepared graph for one EP: coverage, partitions, CPU fallbacks by op, caveats."""
    info = _partitioning(model, ep)
    taken = {id(node) for group in info.supported_groups for node in group}
    by_op_total = Counter(n.op_type for n in model.graph.node)
    fallback = Counter(n.op_type for n in model.graph.node if id(n) not in taken)
    return {
        "nodes": info.num_nodes,
        "ep_nodes": info.num_supported_nodes,
        "cpu_nodes": info.num_nodes - info.num_supported_nodes,
        "coverage": info.num_supported_nodes / info.num_nodes if info.num_nodes else 0.0,
        "partitions": info.num_partitions,
        "partition_sizes": sorted((len(g) for g in info.supported_groups), reverse=True),
        "cpu_fallback_ops": dict(fallback.most_common()),
        "ops_total": dict(by_op_total.most_common()),
        "unsupported_op_types": sorted(info.unsupported_ops),
        "nodes_unsupported_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
        "caveats": info.supported_ops_checker.get_caveats(),
        "suitability": info.suitability().name,
        "node_assignment": [{"node": n.name, "op_type": n.op_type, "ep": id(n) in taken} for n in model.graph.node],
    }


def npu_report(bundle, batch_size: int, seq_len: int, paths: list[str] | None = None) -> dict:
    """For each EP path, the analysis of the infer and train_step graphs (module docstring says how)."""
    paths = list(paths or EP_PATHS)
    # The checker logs through the root logger's handlers when it is configured; keep the report quiet.
    logging.getLogger("usability_checker").setLevel(logging.WARNING)
    report: dict = {"method": "onnxruntime.tools.mobile_helpers.usability_checker partitioning, fixed shapes "
                              f"batch={batch_size} seq={seq_len}, basic optimization",
                    "paths": {}}
    with tempfile.TemporaryDirectory(prefix="edgepeft-npu-") as tmp:
        prepared = {g: _prepared_model(bundle.graph_path(g), batch_size, seq_len, Path(tmp))
                    for g in ("infer", "train_step")}
        for ep in paths:
            report["paths"][ep] = {"name": EP_PATHS[ep],
                                   **{g: analyze_graph(model, ep) for g, model in prepared.items()}}
    return report
