"""`edgepeft plan`: the memory model predicts a measured peak it was not calibrated on, and plans fit the budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from device_runtime import read_bundle
from edgepeft.cli import main
from edgepeft.profiles import load_profile
from edgepeft.profiling.measure import run_child
from edgepeft.profiling.planner import Candidate, MemoryModel, plan_for_target

from ..aarch64.host_tools import export_builtin

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    return export_builtin("transformer", out, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=128)


@pytest.fixture(scope="module")
def memory_model(text_bundle: Path) -> MemoryModel:
    return MemoryModel(read_bundle(text_bundle))


def test_model_predicts_a_measured_peak_it_was_not_fitted_on(memory_model: MemoryModel, text_bundle: Path) -> None:
    # Calibrated at (1, 16) and (32, 64); checked at (24, 128), where activations dominate (observed: -9%).
    planned = memory_model.breakdown(Candidate(24, 128, 8, "all", None), evaluation=False)["total"]
    measured = run_child("measure", text_bundle, {"batch_size": 24, "seq_len": 128, "warmup": 2, "steps": 3,
                                                  "threads": None})["peak_rss"]
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured)


def test_plan_fits_the_budget_and_explains_the_rejections(memory_model: MemoryModel) -> None:
    profile = load_profile("rpi-zero2w")
    big = plan_for_target(memory_model, profile, headroom=0.5, evaluation=False)
    assert big["fits"] and big["breakdown"]["total"] <= big["budget_bytes"]
    # A tighter budget must pick a cheaper configuration, and every candidate tried before it was over budget.
    tight_ram = int(big["breakdown"]["total"] * 0.8 / 0.5)
    small = plan_for_target(memory_model, profile, headroom=0.5, ram_bytes=tight_ram, evaluation=False)
    assert small["fits"] and small["breakdown"]["total"] <= small["budget_bytes"] < big["breakdown"]["total"]
    assert all(not t["fits"] for t in small["tried"][:-1]) and small["tried"][-1]["fits"]
    assert any("over budget" in line for line in small["why"])


def test_quantization_lowers_frozen_bytes(memory_model: MemoryModel) -> None:
    fp32 = memory_model.breakdown(Candidate(1, 16, 8, "all", None))["frozen weights"]
    int8 = memory_model.breakdown(Candidate(1, 16, 8, "all", "int8"))["frozen weights"]
    int4 = memory_model.breakdown(Candidate(1, 16, 8, "all", "int4"))["frozen weights"]
    assert int4 < int8 < 0.35 * fp32


def test_plan_cli_json(text_bundle: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["plan", "--target", "rpi4", "--bundle", str(text_bundle), "--json", "-"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output[result.output.index("{"):])
    assert plan["fits"] and plan["target"] == "rpi4" and plan["choice"]["quant"] is None


def test_plan_needs_a_model_or_bundle() -> None:
    result = CliRunner().invoke(main, ["plan", "--target", "rpi4"])
    assert result.exit_code == 2
