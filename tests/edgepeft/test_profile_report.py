"""`edgepeft profile`: measured numbers from a torch-free child, checked against independent counts and tools.

- FLOPs of the mlp's graphs equal a hand count of its matmuls (base layers + LoRA factors);
- the roofline projection is max(FLOPs / peak, bytes / bandwidth) with the target profile's numbers;
- peak RSS agrees with `/usr/bin/time -v` running the very same child command (within 10%);
- the planned activations of a hand-built graph equal the liveness walk done by hand;
- the HTML report renders in headless Chromium (the screenshot shows the charts' bar colours).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from device_runtime import read_bundle
from edgepeft.profiles import load_profile
from edgepeft.profiling import profile_bundle
from edgepeft.profiling.html_report import PALETTE, render_html
from edgepeft.profiling.measure import measure_command, parse_child_output
from edgepeft.profiling.memory_model import activation_bytes

from ..aarch64.host_tools import ensure_apt_tool, export_builtin, read_png_rgb

pytestmark = pytest.mark.slow
BATCH = 32


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory) -> Path:
    return export_builtin("mlp", tmp_path_factory.mktemp("mlp") / "bundle", methods="lora,bitfit")


@pytest.fixture(scope="module")
def report(mlp_bundle: Path) -> dict:
    return profile_bundle(mlp_bundle, "rpi4", batch_size=BATCH, seq_len=1, warmup=3, steps=20)


def test_children_are_torch_free_and_training_happens(report: dict) -> None:
    measured = report["measured"]
    # The same seeded batch every step: AdamW at lr 1e-2 must lower its loss.
    assert measured["loss_last"] < measured["loss_first"] - 0.05
    for graph in ("train_step", "infer"):
        t = measured[graph]
        assert t["n"] == 20 and 0 < t["min_ms"] <= t["median_ms"] <= t["p90_ms"]
    rss = measured["rss"]
    assert rss["rss_start"] < rss["rss_imports"] <= rss["rss_train_session"] <= rss["peak_rss"]


def test_flops_match_a_hand_count(report: dict) -> None:
    # mlp: 64 -> 128 -> 128 -> 10, LoRA r=8 on fc1 and fc2 (x @ A^T then @ B^T): 2 FLOPs per multiply-add.
    base = 64 * 128 + 128 * 128 + 128 * 10
    lora = (64 * 8 + 8 * 128) + (128 * 8 + 8 * 128)
    assert report["compute"]["infer"]["flops"] == 2 * BATCH * (base + lora)
    # The train step adds the backward: every LoRA factor's gradient and the input gradients down to fc1's LoRA.
    assert report["compute"]["train_step"]["flops"] > report["compute"]["infer"]["flops"]


def test_projection_is_the_documented_roofline(report: dict) -> None:
    profile = load_profile("rpi4")
    for graph in ("train_step", "infer"):
        cost, proj = report["compute"][graph], report["projection"][graph]
        compute_ms = cost["flops"] / (profile["peak_fp32_gflops"] * 1e9) * 1e3
        memory_ms = cost["bytes_moved"] / (profile["memory_bandwidth_gbs"] * 1e9) * 1e3
        assert proj["projected_ms"] == pytest.approx(max(compute_ms, memory_ms))
        assert "PROJECTION" in proj["label"]
        assert proj["scaled_ms"] >= proj["projected_ms"]
    assert "MEASURED" in report["measured"]["label"]


def test_ops_come_from_the_onnxruntime_profiler(report: dict) -> None:
    ops = report["ops"]["train_step"]
    assert ops["runs"] == 20
    op_types = {o["op_type"] for o in ops["by_op_type"]}
    assert op_types & {"Gemm", "MatMul", "FusedMatMul"}
    assert sum(o["share"] for o in ops["by_op_type"]) <= 1.0 + 1e-9
    assert ops["arena_in_use_peak_bytes"] > 0


def test_peak_rss_agrees_with_usr_bin_time(mlp_bundle: Path, tmp_path: Path) -> None:
    """The child's own VmHWM vs GNU time's maxrss (from wait4) for the very same command."""
    gnu_time = ensure_apt_tool("/usr/bin/time", "time") if not Path("/usr/bin/time").exists() else "/usr/bin/time"
    options = {"batch_size": 64, "seq_len": 1, "warmup": 3, "steps": 20, "threads": None}
    proc = subprocess.run([gnu_time, "-v", *measure_command("measure", mlp_bundle, options)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    child = parse_child_output(proc.stdout)
    time_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    ours = child["peak_rss"]
    assert child["peak_rss_source"] == "VmHWM"
    assert abs(ours - time_kib * 1024) <= 0.10 * time_kib * 1024, (ours, time_kib * 1024)
    (tmp_path / "rss.json").write_text(json.dumps({"ours": ours, "usr_bin_time": time_kib * 1024}))


def test_activation_liveness_on_a_hand_built_graph() -> None:
    """x[B,4] -> MatMul(W1[4,8]) = h[B,8] -> Relu = r[B,8] -> MatMul(W2[8,2]) = y (graph output, not counted).

    In graph order h is live while Relu makes r (both alive: 2 x B x 8 x 4 bytes), then h dies; the peak of
    intermediate values is therefore 64 B per example, and their sum is the same 64 B per example.
    """
    w1 = helper.make_tensor("W1", TensorProto.FLOAT, [4, 8], np.ones(32, np.float32))
    w2 = helper.make_tensor("W2", TensorProto.FLOAT, [8, 2], np.ones(16, np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    peak, total = activation_bytes(model, batch_size=5, seq_len=1)
    assert peak == 5 * 2 * 8 * 4
    assert total == 5 * 2 * 8 * 4


def test_html_report_renders_in_headless_chromium(report: dict, tmp_path: Path) -> None:
    page = render_html(report)
    assert page.count("<svg") >= 3 and "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    html = tmp_path / "report.html"
    html.write_text(page, encoding="utf-8")
    chromium = ensure_apt_tool("chromium", "chromium")
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
         html.as_uri()], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = read_png_rgb(shot)
    assert pixels.shape == (1600, 1200, 3)
    # The first bar of every chart is drawn in PALETTE[0]; the memory chart's stacked bars use the next colours.
    for colour in PALETTE[:3]:
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        assert np.all(pixels == rgb, axis=-1).sum() > 500, f"no {colour} bars in the screenshot"
    assert (pixels < 100).all(axis=-1).sum() > 2000  # dark text was drawn
