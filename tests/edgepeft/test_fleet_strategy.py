"""AdapterStrategy's options over the loopback grid: only adapter tensors are aggregated, DP and server momentum."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from edgepeft.errors import ConfigError
from edgepeft.fleet.client_app import ARRAYS_KEY, METRICS_KEY, arrays_to_record, make_client_app, record_to_arrays
from edgepeft.fleet.partition import PartitionConfig, partition_digits
from edgepeft.fleet.robust import DPConfig
from edgepeft.fleet.server_app import FleetConfig

from .fleet_support import fleet_bundle, run_loopback  # noqa: F401  (fixture)

CONFIG = FleetConfig(rounds=2, local_steps=5, personalize_steps=0, min_clients=2)
CLIENTS = 6


@pytest.fixture(scope="module")
def honest(fleet_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> ClientApp:
    data_dir = partition_digits(PartitionConfig(num_clients=12, seed=0)).write(tmp_path_factory.mktemp("clients"))
    return make_client_app(fleet_bundle, data_dir)


def _tampering(honest: ClientApp, tamper) -> ClientApp:  # noqa: ANN001
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = honest(message, context)
        tamper(reply)
        return reply

    return app


def _with_frozen_weight(reply: Message) -> None:
    tensors = record_to_arrays(reply.content[ARRAYS_KEY])
    tensors["head.weight"] = np.zeros((10, 128), np.float32)  # a frozen tensor smuggled in
    reply.content[ARRAYS_KEY] = arrays_to_record(tensors)


def _wrong_shape(reply: Message) -> None:
    tensors = record_to_arrays(reply.content[ARRAYS_KEY])
    tensors["head.bias"] = np.zeros(11, np.float32)
    reply.content[ARRAYS_KEY] = arrays_to_record(tensors)


def _bad_count(reply: Message) -> None:
    reply.content[METRICS_KEY]["num-examples"] = -5


@pytest.mark.parametrize("tamper, reason", [(_with_frozen_weight, "unexpected ['head.weight']"),
                                            (_wrong_shape, "shape [11]"), (_bad_count, "num-examples")])
def test_malformed_replies_are_dropped_and_the_round_goes_on(fleet_bundle: Path, honest: ClientApp,
                                                             tamper, reason: str) -> None:  # noqa: ANN001
    strategy, _ = run_loopback(fleet_bundle, [_tampering(honest, tamper)] + [honest] * (CLIENTS - 1),
                               replace(CONFIG, rounds=1))
    rows = strategy.history[0].clients
    assert rows[0].action == "rejected" and rows[0].reason.startswith("malformed reply") and reason in rows[0].reason
    assert [r.action for r in rows[1:]] == ["accepted"] * (CLIENTS - 1)
    assert sorted(strategy.final) == sorted(t.name for t in strategy.trainable)  # the adapter, nothing else


def test_dp_clips_every_update_and_reports_the_noise(fleet_bundle: Path, honest: ClientApp) -> None:
    dp = DPConfig(clip_norm=0.5, noise_multiplier=1.0, seed=3)
    strategy, _ = run_loopback(fleet_bundle, [honest] * CLIENTS, replace(CONFIG, dp=dp))
    for record in strategy.history:
        assert record.dp["noise_std"] == pytest.approx(1.0 * 0.5 / CLIENTS)
        assert record.dp["clipped"] == sum(r.update_norm > 0.5 for r in record.clients) == CLIENTS
        # the clipped mean has norm <= 0.5; the noise adds about std * sqrt(#coordinates)
        coordinates = sum(v.size for v in strategy.final.values())
        assert record.global_update_norm < 0.5 + 3 * record.dp["noise_std"] * np.sqrt(coordinates)
    assert all(np.isfinite(v).all() for v in strategy.final.values())


def test_server_momentum_is_fedavg_in_round_one_and_accelerates_after(fleet_bundle: Path, honest: ClientApp) -> None:
    plain, _ = run_loopback(fleet_bundle, [honest] * CLIENTS, replace(CONFIG, rounds=1))
    first, _ = run_loopback(fleet_bundle, [honest] * CLIENTS, replace(CONFIG, rounds=1, server_momentum=0.9))
    for name, value in plain.final.items():
        np.testing.assert_array_equal(first.final[name], value)  # v = mean update in the first round
    two_plain, _ = run_loopback(fleet_bundle, [honest] * CLIENTS, CONFIG)
    two_momentum, _ = run_loopback(fleet_bundle, [honest] * CLIENTS, replace(CONFIG, server_momentum=0.9))
    assert two_momentum.history[1].global_update_norm > 1.3 * two_plain.history[1].global_update_norm


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"server_momentum": 1.0}, {"proximal_mu": -0.1},
                                    {"fraction_train": 0.0}, {"personalize_steps": -1}])
def test_fleet_config_refuses_nonsense(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        FleetConfig(**kwargs)


def test_run_config_overrides_for_flwr_run() -> None:
    config = FleetConfig.from_run_config({"num-server-rounds": 7, "local-steps": 12, "lr": 0.02,
                                          "dp-clip-norm": 1.5, "dp-noise-multiplier": 0.8, "outlier-action": "clip"})
    assert (config.rounds, config.local_steps, config.lr) == (7, 12, 0.02)
    assert config.dp == DPConfig(1.5, 0.8) and config.robust.outlier_action == "clip"
