"""Bytes on the wire per round and client: the adapter's tensors plus Flower's framing, never the frozen base.

The loopback grid rebuilds every message from its serialized Flower objects alone, so the bytes counted are the
bytes that carried the round; the strategy's own accounting (`wire_breakdown`) must agree with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepeft.fleet.client_app import make_client_app
from edgepeft.fleet.partition import PartitionConfig, partition_digits
from edgepeft.fleet.server_app import FleetConfig
from edgepeft.fleet.simulate import safetensors_data_bytes

from .fleet_support import fleet_bundle, run_loopback  # noqa: F401  (fixture)

NPY_HEADER = 128  # numpy's .npy v1 header, padded to 128 bytes for these shapes: Flower ships each tensor as .npy


@pytest.fixture(scope="module")
def run(fleet_bundle: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    data_dir = partition_digits(PartitionConfig(num_clients=12, seed=0)).write(tmp_path_factory.mktemp("clients"))
    config = FleetConfig(rounds=2, local_steps=5, personalize_steps=0, min_clients=2)
    return run_loopback(fleet_bundle, [make_client_app(fleet_bundle, data_dir)] * 12, config)


def test_bytes_per_round_are_the_adapter_plus_framing(fleet_bundle: Path, run) -> None:  # noqa: ANN001
    strategy, grid = run
    manifest = json.loads((fleet_bundle / "manifest.json").read_text())
    tensors = len(manifest["trainable"])
    tensor_bytes = sum(4 * int(np.prod(t["shape"])) for t in manifest["trainable"])
    adapter_file = fleet_bundle / "adapter.safetensors"
    assert safetensors_data_bytes(adapter_file) == tensor_bytes  # the adapter file holds exactly these tensors

    sent = [size for kind, _, size in grid.wire if kind == "train"]
    received = [size for kind, _, size in grid.wire if kind == "reply"]
    assert len(sent) == len(received) == 24  # 12 clients x 2 rounds
    rows = [row for record in strategy.history for row in record.clients]
    assert sorted(sent) == sorted(row.downlink_bytes for row in rows)  # the strategy counts what really travelled
    assert sorted(received) == sorted(row.uplink_bytes for row in rows)
    for row in rows:
        assert row.payload_bytes == tensor_bytes
        framing = row.uplink_bytes - row.payload_bytes
        assert tensors * NPY_HEADER < framing < tensors * 600  # .npy headers, object headers, ids, metrics
    for record in strategy.history:
        up = record.uplink_breakdown
        # ArrayChunks carry the .npy bytes: the tensors plus one 128-byte header each, plus a short object header
        assert tensor_bytes + tensors * NPY_HEADER < up["ArrayChunk"] < tensor_bytes + tensors * (NPY_HEADER + 32)
    # Round 1 sends the initial adapter, whose two LoRA B matrices are zeros of one shape: one object on the wire.
    first, second = strategy.history[0].downlink_breakdown, strategy.history[1].downlink_breakdown
    b_matrix = 128 * 4 * 4
    assert second["ArrayChunk"] - first["ArrayChunk"] == pytest.approx(b_matrix + NPY_HEADER, abs=32)
    frozen = (fleet_bundle / "weights.bin").stat().st_size
    assert max(sent + received) < 0.15 * frozen  # the frozen base never travels
