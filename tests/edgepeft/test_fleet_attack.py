"""Poisoned updates: one of twelve clients sends NaN, Inf and 1e6-norm adapters; the global adapter shrugs them off.

The attacker trains honestly, then replaces what it sends. With screening on, its update is rejected every round
(and logged), so the global adapter is the one the eleven honest clients make without it; with screening off, the
same attack ruins the global adapter, which is what shows the screening is doing the work.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from edgepeft.fleet.client_app import ARRAYS_KEY, arrays_to_record, make_client_app, record_to_arrays
from edgepeft.fleet.partition import PartitionConfig, partition_digits
from edgepeft.fleet.robust import update_norm
from edgepeft.fleet.server_app import FleetConfig

from .fleet_support import fleet_bundle, run_loopback  # noqa: F401  (fixture)

CONFIG = FleetConfig(rounds=3, local_steps=10, personalize_steps=0, min_clients=2)
POISON = {1: "nan", 2: "huge", 3: "inf"}  # server round -> what the attacker sends


def _poisoned(sent: dict[str, np.ndarray], kind: str, seed: int) -> dict[str, np.ndarray]:
    if kind == "nan":
        return {n: np.full_like(v, np.nan) for n, v in sent.items()}
    if kind == "inf":
        return {**sent, "head.bias": np.full_like(sent["head.bias"], np.inf)}
    rng = np.random.default_rng(seed)
    direction = {n: rng.normal(size=v.shape) for n, v in sent.items()}
    scale = 1e6 / update_norm(direction)  # an update of norm 1e6 from the global adapter
    return {n: (v + scale * direction[n]).astype(v.dtype) for n, v in sent.items()}


def _attacker(honest: ClientApp, schedule: dict[int, str] = POISON) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = honest(message, context)
        server_round = int(message.content["config"]["server-round"])
        sent = record_to_arrays(message.content[ARRAYS_KEY])
        reply.content[ARRAYS_KEY] = arrays_to_record(_poisoned(sent, schedule[server_round], server_round))
        return reply

    return app


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return partition_digits(PartitionConfig(num_clients=12, seed=0)).write(tmp_path_factory.mktemp("clients"))


@pytest.fixture(scope="module")
def without_attacker(fleet_bundle: Path, data_dir: Path):  # noqa: ANN201
    """The eleven honest clients alone (the attacker's client 0 is not in the fleet)."""
    honest = make_client_app(fleet_bundle, data_dir)
    strategy, _ = run_loopback(fleet_bundle, [honest] * 11, CONFIG, client_ids=list(range(1, 12)))
    return strategy


def test_poisoned_updates_are_rejected_and_the_global_adapter_is_the_honest_one(
        fleet_bundle: Path, data_dir: Path, without_attacker, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    honest = make_client_app(fleet_bundle, data_dir)
    with caplog.at_level(logging.WARNING, logger="edgepeft.fleet"):
        strategy, _ = run_loopback(fleet_bundle, [_attacker(honest)] + [honest] * 11, CONFIG)
    final, reference = strategy.final, without_attacker.final
    assert all(np.isfinite(v).all() for v in final.values())
    moved = update_norm({n: reference[n].astype(np.float64) for n in reference})
    gap = update_norm({n: final[n].astype(np.float64) - reference[n] for n in final})
    assert gap <= 1e-6 * moved, (gap, moved)  # the same adapter, up to float32 rounding
    for record in strategy.history:
        actions = {row.client_id: row.action for row in record.clients}
        assert actions == {0: "rejected", **{i: "accepted" for i in range(1, 12)}}, record.round
        assert record.accepted == 11
    reasons = [record.clients[0].reason for record in strategy.history]
    assert "non-finite" in reasons[0] and "x cohort median" in reasons[1] and "non-finite" in reasons[2]
    assert strategy.history[1].clients[0].update_norm == pytest.approx(1e6, rel=1e-4)
    logged = [r.getMessage() for r in caplog.records if r.name == "edgepeft.fleet"]
    assert sum("client 0: update rejected" in m for m in logged) == 3


def test_without_screening_the_same_attack_ruins_the_global_adapter(fleet_bundle: Path, data_dir: Path) -> None:
    honest = make_client_app(fleet_bundle, data_dir)
    unguarded = replace(CONFIG, rounds=1, robust=None)
    nan_run, _ = run_loopback(fleet_bundle, [_attacker(honest, {1: "nan"})] + [honest] * 11, unguarded)
    assert not all(np.isfinite(v).all() for v in nan_run.final.values())
    huge_run, _ = run_loopback(fleet_bundle, [_attacker(honest, {1: "huge"})] + [honest] * 11, unguarded)
    share = huge_run.history[0].clients[0].num_examples / sum(r.num_examples for r in huge_run.history[0].clients)
    assert huge_run.history[0].global_update_norm == pytest.approx(1e6 * share, rel=0.01)  # the attacker's pull
