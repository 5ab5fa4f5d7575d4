"""Profile a bundle: measured latency and memory here, a planned memory breakdown, a roofline projection for a
target device, and a report of which nodes each mobile NPU path could take.

Everything labelled MEASURED comes from fresh child processes that import only the device runtime
(`device_child.py`); everything labelled PROJECTION or planned is computed from the graphs and a device profile.
`profile_bundle` returns one JSON-ready dict; `render_html` (in `html_report`) turns it into a page.
"""

from __future__ import annotations

import os
import platform
from collections import defaultdict
from pathlib import Path
from typing import Any

from device_runtime import read_bundle

from ..profiles import load_profile
from .measure import ProfileError, run_child, summarize_ms
from .memory_model import plan_memory
from .npu_report import EP_PATHS, npu_report
from .roofline import graph_cost, project

__all__ = ["ProfileError", "profile_bundle", "DEFAULT_SETTINGS"]

DEFAULT_SETTINGS = {"batch_size": 32, "seq_len": 64, "warmup": 5, "steps": 30, "threads": None}
TOP_OPS = 12


def _ops_summary(profiled: dict[str, Any]) -> dict[str, Any]:
    """Top nodes and per-op-type totals from the profiler child's per-node medians."""
    nodes = profiled["nodes"]
    total = sum(n["us_per_run"] for n in nodes) or 1.0
    by_type: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for node in nodes:
        by_type[node["op_type"]] += node["us_per_run"]
        counts[node["op_type"]] += 1
    types = sorted(by_type.items(), key=lambda kv: -kv[1])
    return {
        "runs": profiled["runs"],
        "sum_of_node_medians_us": total,
        "profiled_run_median_us": profiled["model_run_us_median"],
        "arena_in_use_peak_bytes": profiled["arena_in_use_peak_bytes"],
        "top_nodes": [{**n, "share": n["us_per_run"] / total} for n in nodes[:TOP_OPS]],
        "by_op_type": [{"op_type": t, "us_per_run": us, "nodes": counts[t], "share": us / total}
                       for t, us in types[:TOP_OPS]],
    }


def _memory_breakdown(plan, measured: dict[str, Any], ops: dict[str, Any] | None) -> dict[str, Any]:
    """Planned vs measured, item by item (planned items follow memory_model's rules; measured are RSS deltas)."""
    m = measured
    baseline = m["rss_imports"]
    rows = [
        {"item": "runtime baseline (python + numpy + onnxruntime + device_runtime)", "planned": None,
         "measured": baseline, "how": "RSS after imports (measured, not modelled)"},
        {"item": "frozen weights + graph constants", "planned": plan.frozen_weights + plan.graph_constants,
         "measured": None, "how": "planned: weights.bin + constants in train_step/infer graphs"},
        {"item": "trainable (current + updated)", "planned": 2 * plan.trainable, "measured": None,
         "how": "planned: manifest specs x2"},
        {"item": "optimizer state (current + updated)", "planned": 2 * plan.optimizer_state, "measured": None,
         "how": "planned: manifest specs x2"},
        {"item": "train-step session (verify + load graph, weights, adapter)",
         "planned": plan.frozen_weights + plan.graph_constants + 2 * plan.trainable + 2 * plan.optimizer_state,
         "measured": m["rss_train_session"] - baseline, "how": "measured: RSS after Trainer.open - baseline"},
        {"item": "activations (train step)", "planned": plan.activations_peak_live,
         "measured": ops["train_step"]["arena_in_use_peak_bytes"] if ops else None,
         "how": "planned: peak live values in graph order; measured: onnxruntime arena in-use peak (profiler)"},
        {"item": "growth during train steps", "planned": None, "measured": m["rss_after_train"] - m["rss_train_session"],
         "how": "measured: RSS after steps - RSS after open (arena growth, allocator caches)"},
        {"item": "inference session", "planned": None, "measured": m["rss_infer_session"] - m["rss_after_train"],
         "how": "measured: RSS after first predict - RSS after training"},
    ]
    planned_total = baseline + plan.total
    return {"rows": rows, "planned": plan.as_dict(), "planned_peak_with_baseline": planned_total,
            "measured_peak": m["peak_rss"], "measured_peak_source": m["peak_rss_source"],
            "planned_over_measured": planned_total / m["peak_rss"] if m["peak_rss"] else None}


SCALED_LABEL = ("scaled by host efficiency = the target's compute term x (time measured here / this host's compute "
                "floor): a second PROJECTION that assumes the target runs this graph at the same fraction of its peak "
                "as this host does (per-node dispatch included); it is an estimate, not a device measurement")


def _projection(cost, profile: dict[str, Any], measured_over_floor: float | None) -> dict[str, Any]:
    result = project(cost, profile)
    if measured_over_floor:
        result["scaled_ms"] = max(result["projected_ms"], result["compute_ms"] * measured_over_floor)
    return result


def profile_bundle(
    bundle_dir: Path | str,
    target: str | None = None,
    *,
    batch_size: int = 32,
    seq_len: int = 64,
    warmup: int = 5,
    steps: int = 30,
    threads: int | None = None,
    with_ops: bool = True,
    with_npu: bool = True,
) -> dict[str, Any]:
    """Measure, plan and project one bundle; see the module docstring for what each part means."""
    bundle = read_bundle(bundle_dir)
    profile = load_profile(target) if target else None
    options = {"batch_size": batch_size, "seq_len": seq_len, "warmup": warmup, "steps": steps, "threads": threads}
    measured = run_child("measure", bundle.path, options)
    ops = run_child("ops", bundle.path, options) if with_ops else None
    plan = plan_memory(bundle, batch_size, seq_len)
    costs = {g: graph_cost(bundle, g, batch_size, seq_len) for g in ("train_step", "infer")}
    times = {"train_step": summarize_ms(measured["train_step_seconds"]),
             "infer": summarize_ms(measured["infer_seconds"])}
    compute: dict[str, Any] = {}
    for graph, cost in costs.items():
        entry: dict[str, Any] = {"flops": cost.flops, "bytes_moved": cost.bytes_moved, "nodes": cost.nodes,
                                 "matmul_nodes": cost.matmul_nodes}
        if ops:
            floor_ms = cost.flops / (ops["gemm"]["gflops"] * 1e9) * 1e3
            entry["host_compute_floor_ms"] = floor_ms
            entry["measured_over_floor"] = times[graph]["median_ms"] / floor_ms if floor_ms else None
        compute[graph] = entry
    report: dict[str, Any] = {
        "bundle": str(bundle.path), "bundle_id": bundle.bundle_id, "model": bundle.manifest["model"],
        "methods": [m["name"] for m in bundle.manifest["methods"]],
        "target": target, "settings": options,
        "host": {"machine": platform.machine(), "system": platform.system(), "cpu_count": os.cpu_count(),
                 "python": measured["python"], "onnxruntime": ops["onnxruntime"] if ops else None,
                 "host_gemm_gflops": ops["gemm"]["gflops"] if ops else None},
        "measured": {
            "label": f"MEASURED on this host ({platform.machine()}), fresh child process importing only "
                     "device_runtime (numpy, onnxruntime, safetensors)",
            "train_step": times["train_step"], "infer": times["infer"],
            "open_seconds": measured["open_seconds"],
            "loss_first": measured["losses"][0], "loss_last": measured["losses"][-1],
            "rss": {k: measured[k] for k in ("rss_start", "rss_imports", "rss_train_session", "rss_after_train",
                                             "rss_infer_session", "peak_rss", "peak_rss_source")},
        },
        "memory": _memory_breakdown(plan, measured, ops),
        "compute": compute,
        "ops": {g: _ops_summary(ops[g]) for g in ("train_step", "infer")} if ops else None,
    }
    if profile:
        report["projection"] = {
            "label": "PROJECTION for the target from its profile (roofline lower bound), not a measurement",
            "profile": {k: profile[k] for k in ("id", "name", "peak_fp32_gflops", "memory_bandwidth_gbs",
                                                "ram_bytes")},
            "scaled_label": SCALED_LABEL,
            **{g: _projection(cost, profile, compute[g].get("measured_over_floor")) for g, cost in costs.items()},
            "fits_ram": (measured["peak_rss"] <= profile["ram_bytes"]),
            "peak_rss_share_of_ram": measured["peak_rss"] / profile["ram_bytes"],
        }
    if with_npu:
        paths = profile["npu_paths"] if profile and profile["npu_paths"] else (None if not profile else [])
        report["npu"] = npu_report(bundle, batch_size, seq_len, paths) if paths != [] else {
            "method": "none", "paths": {}, "note": f"target {target} has no NPU path; run without --target or with "
                                                  "a mobile target to see the NPU report"}
    return report
