"""`edgepeft fleet simulate` end to end on Flower's simulation engine (Ray): 12 non-IID clients, real numbers.

A subprocess, like a user's shell: Ray starts its workers, the ServerApp runs in the driver, every client trains
with device_runtime in a Ray worker. The claims checked are the issue's: the federated adapter beats the average
locally-trained adapter on everyone's held-out data, each client's personalized adapter beats the global one on its
own data, the clients never load torch, and a round moves the adapter's bytes plus framing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgepeft.fleet.simulate import safetensors_data_bytes

from .fleet_support import fleet_bundle  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fleet_simulate_on_flowers_engine(fleet_bundle: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "edgepeft.cli", "fleet", "simulate", str(fleet_bundle), "--clients", "12",
         "--rounds", "5", "--local-steps", "20", "--personalize-steps", "30", "--json", "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert json.loads((tmp_path / "report.json").read_text())["fleet_accuracy"] == report["fleet_accuracy"]
    assert report["versions"]["flwr"] == "1.42.0"

    fleet, own = report["fleet_accuracy"], report["own_accuracy"]
    # Shared skill: on every client's held-out digits the federated adapter beats the local-only ones.
    assert fleet["global"] > fleet["local_mean"] + 0.10, fleet
    assert fleet["global"] > fleet["local_max"], fleet
    assert fleet["global"] > fleet["base"] + 0.2, fleet
    # Personal on top: fine-tuning the global adapter locally wins on the client's own data.
    assert own["personal"] > own["global"] + 0.1, own
    assert own["personal"] >= own["local"] - 0.02, own
    assert sum(c["personal_accuracy"] >= c["global_accuracy"] for c in report["clients"]) >= 11

    assert report["torch_loaded_on_clients"] is False
    assert report["screening"] == {"accepted": 60, "clipped": 0, "rejected": 0}
    assert [len(r["clients"]) for r in report["rounds"]] == [12] * 5

    b = report["bytes"]
    assert b["tensor_bytes"] == b["adapter_safetensors_tensor_data"] == safetensors_data_bytes(
        fleet_bundle / "adapter.safetensors")
    for direction in ("uplink_per_client_round", "downlink_per_client_round"):
        assert b["tensor_bytes"] < b[direction]["max"] < b["tensor_bytes"] + 600 * b["tensors"], b
    assert b[direction]["max"] < 0.15 * b["frozen_base_bytes"]
