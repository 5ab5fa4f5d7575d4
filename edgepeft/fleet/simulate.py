"""Run a fleet on one machine with Flower's simulation engine and report what federation bought each client.

`simulate_fleet` partitions the digits (non-IID), writes each client's data where the ClientApp reads it, and runs
the same ServerApp and ClientApp that real SuperLink/SuperNodes run, on Flower's Ray-based simulation engine. It
then trains the baseline without federation (each client alone, from the bundle's adapter, for as many steps as it
trained in all rounds) and reports, per client and for the whole fleet:
- accuracy of the base, local-only, global (federated) and personalized (global + local fine-tuning) adapters on
  the client's own held-out data, and of the global and every local-only adapter on everyone's held-out data;
- bytes per round and client, down and up, as Flower serializes the messages, next to the tensors' own bytes and
  the size of the bundle's `adapter.safetensors`;
- what screening did (per round and client), DP figures when on, and whether torch was ever loaded by a client.
"""

from __future__ import annotations

import importlib.metadata
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from device_runtime import AdamW, Trainer, personalize
from device_runtime.batch import validate_batch
from device_runtime.bundle import read_bundle
from device_runtime.errors import BatchError
from device_runtime.minibatches import iterate_batches

from . import client_app as client_module
from .client_app import local_loop_config, make_client_app, record_to_arrays
from .partition import ClientData, DigitsFleet, PartitionConfig, partition_digits
from .robust import gaussian_epsilon
from .server_app import AdapterStrategy, FleetConfig, make_server_app

__all__ = ["ClientSummary", "SimulationConfig", "SimulationReport", "export_digits_base", "safetensors_data_bytes",
           "simulate_fleet", "train_local_only"]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class SimulationConfig:
    """A simulated fleet: the federated run, the partition, and the engine's resources."""

    fleet: FleetConfig = field(default_factory=lambda: FleetConfig(rounds=20, local_steps=30))
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    local_only_steps: Optional[int] = None  # None: rounds x local_steps, the compute a federated client spent
    cpus: int = 2  # CPUs Ray may use; each virtual client takes one, so this many train at a time
    threads: int = 1  # onnxruntime threads per client
    verbose: bool = False  # Flower's INFO log (rounds, sampling) on stderr


@dataclass
class ClientSummary:
    """One client's numbers. Accuracies are on its own held-out data unless the name says `fleet`."""

    client_id: int
    style: str
    train_examples: int
    test_examples: int
    class_counts: list[int]
    base_accuracy: float
    local_accuracy: float
    global_accuracy: float
    personal_accuracy: Optional[float]
    local_accuracy_fleet: float  # its local-only adapter on everyone's held-out data
    downlink_bytes: list[int] = field(default_factory=list)  # per round
    uplink_bytes: list[int] = field(default_factory=list)


@dataclass
class SimulationReport:
    """Everything `simulate_fleet` measured; `to_dict()` is plain JSON."""

    clients: list[ClientSummary]
    rounds: list[dict]
    fleet_accuracy: dict[str, float]
    own_accuracy: dict[str, float]
    bytes: dict[str, Any]
    screening: dict[str, int]
    dp: Optional[dict]
    torch_loaded_on_clients: bool
    seconds: dict[str, float]
    versions: dict[str, str]
    config: dict

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_digits_base(out_dir: PathLike, partition: PartitionConfig = PartitionConfig(), rank: int = 4,
                       lr: float = 1e-2) -> Path:
    """The fleet's shared base (host side, torch): the built-in mlp pretrained on the digits' base writers (the part
    `partition_digits` keeps out of the fleet), LoRA on fc1/fc2 + BitFit, exported as an AdamW bundle."""
    import torch

    from exporters.onnx import export

    from ..methods import BitFitConfig, LoRAConfig, apply
    from ..quickstart import digits_arrays, pretrain_digits_mlp

    base = partition_digits(partition).base
    threads = torch.get_num_threads()
    # One thread: the model is tiny, and on a busy machine torch's extra threads spin-wait (measured on 2 shared
    # cores: pretraining took 14.6 s with two threads, 1.0 s with one).
    torch.set_num_threads(1)
    try:
        model = pretrain_digits_mlp(base, seed=partition.seed)
        apply(model, LoRAConfig(r=rank, alpha=2 * rank, target_modules=["fc1", "fc2"]), BitFitConfig())
        example = {"x": torch.from_numpy(digits_arrays(base.base_train)["x"][:3])}
        bundle = export(model, example, out=out_dir, optimizer=AdamW(lr=lr, weight_decay=0.0),
                        model_id="mlp-digits",
                        model_source="builtin:mlp pretrained on the digits base writers by edgepeft fleet")
    finally:
        torch.set_num_threads(threads)
    return Path(bundle.path)


def safetensors_data_bytes(path: PathLike) -> int:
    """Bytes of tensor data in a .safetensors file: its size minus the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return Path(path).stat().st_size - 8 - header


def _accuracy(trainer: Trainer, tensors: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> float:
    trainer.load_trainable(tensors, reset_optimizer=True)
    return float(trainer.evaluate(iterate_batches(data, 256))["accuracy"])


def train_local_only(trainer: Trainer, start: dict[str, np.ndarray], client: ClientData, steps: int,
                     fleet: FleetConfig) -> dict[str, np.ndarray]:
    """The baseline without federation: the client trains alone from `start`, the way it trains in a round."""
    trainer.load_trainable(start, reset_optimizer=True)
    personalize(trainer, client.train, local_loop_config(steps, fleet.batch_size, fleet.lr, fleet.seed * 100_003
                                                         + 50_000 + client.client_id))
    return trainer.trainable_state()


def _run_flower(bundle_dir: Path, data_dir: Path, fleet: DigitsFleet, config: SimulationConfig,
                strategy: AdapterStrategy, evaluator: Trainer) -> None:
    """The federated part, on Flower's simulation engine (Ray): one virtual SuperNode per client."""
    import ray.cloudpickle
    from flwr.simulation import run_simulation

    held_out = fleet.held_out_all()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord({"fleet-accuracy": _accuracy(evaluator, record_to_arrays(arrays), held_out)})

    server_app = make_server_app(config.fleet, bundle_dir, strategy=strategy, evaluate_fn=evaluate_fn)
    client_app = make_client_app(bundle_dir, data_dir, threads=config.threads)
    if not config.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    # Ship the client module to Ray's workers by value: importing it by name there would run edgepeft/__init__
    # (which imports torch), and a client must run on device_runtime alone.
    ray.cloudpickle.register_pickle_by_value(client_module)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(fleet.clients),
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": config.cpus, "log_to_driver": config.verbose}},
                       verbose_logging=config.verbose)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(client_module)


def _bytes_summary(strategy: AdapterStrategy, bundle_dir: Path) -> dict[str, Any]:
    """Per client and round, down and up, as Flower serialized them; next to the adapter file and the frozen base."""
    bundle = read_bundle(bundle_dir)
    rows = [c for r in strategy.history for c in r.clients]
    down = [c.downlink_bytes for c in rows]
    up = [c.uplink_bytes for c in rows if c.payload_bytes]
    last = strategy.history[-1]
    return {
        "adapter_safetensors": bundle.adapter_path.stat().st_size,
        "adapter_safetensors_tensor_data": safetensors_data_bytes(bundle.adapter_path),
        "tensor_bytes": max((c.payload_bytes for c in rows), default=0),
        "tensors": len(bundle.trainable),
        "downlink_per_client_round": {"min": min(down), "median": statistics.median(down), "max": max(down)},
        "uplink_per_client_round": {"min": min(up), "median": statistics.median(up), "max": max(up)},
        "downlink_breakdown_last_round": last.downlink_breakdown,
        "uplink_breakdown_last_round": last.uplink_breakdown,
        "frozen_base_bytes": (bundle.path / "weights.bin").stat().st_size,
    }


def simulate_fleet(bundle_dir: PathLike, config: SimulationConfig, work_dir: PathLike) -> SimulationReport:
    """Partition, federate on Flower's simulation engine, train the local-only baseline, and report."""
    bundle_dir, work_dir = Path(bundle_dir), Path(work_dir)
    fleet = partition_digits(config.partition)
    data_dir = fleet.write(work_dir / "clients")
    bundle = read_bundle(bundle_dir)
    try:  # fail here, not in twelve Ray workers, when the bundle does not take flattened 8x8 digits
        validate_batch(fleet.clients[0].train, bundle, with_labels=True)
    except BatchError as exc:
        raise BatchError(f"{bundle_dir} does not fit the digits fleet ({exc}); export one with "
                         "`edgepeft fleet digits-bundle -o BUNDLE`") from exc
    # Every round waits for all virtual nodes: Ray starts them a few at a time, and a round run on the first two
    # to connect would not be the fleet.
    fleet_config = replace(config.fleet, min_clients=len(fleet.clients))
    config = replace(config, fleet=fleet_config)
    strategy = AdapterStrategy(bundle.trainable, fleet_config)
    evaluator = Trainer.open(bundle_dir, threads=config.threads)
    initial = evaluator.trainable_state()

    started = time.perf_counter()
    _run_flower(bundle_dir, data_dir, fleet, config, strategy, evaluator)
    federated_seconds = time.perf_counter() - started
    if strategy.final is None:
        raise RuntimeError("the federated run ended without a global adapter; see the Flower log above")

    started = time.perf_counter()
    steps = config.local_only_steps or fleet_config.rounds * fleet_config.local_steps
    held_out = fleet.held_out_all()
    personal = {int(r["client-id"]): r for r in strategy.personalization}
    summaries = []
    for client in fleet.clients:
        local = train_local_only(evaluator, initial, client, steps, fleet_config)
        reported = personal.get(client.client_id, {})
        summaries.append(ClientSummary(
            client_id=client.client_id, style=client.style, train_examples=len(client.train["labels"]),
            test_examples=len(client.test["labels"]), class_counts=client.class_counts(),
            base_accuracy=_accuracy(evaluator, initial, client.test),
            local_accuracy=_accuracy(evaluator, local, client.test),
            global_accuracy=_accuracy(evaluator, strategy.final, client.test),
            personal_accuracy=reported.get("personal-accuracy"),
            local_accuracy_fleet=_accuracy(evaluator, local, held_out),
            downlink_bytes=[c.downlink_bytes for r in strategy.history for c in r.clients
                            if c.client_id == client.client_id],
            uplink_bytes=[c.uplink_bytes for r in strategy.history for c in r.clients
                          if c.client_id == client.client_id],
        ))
    local_seconds = time.perf_counter() - started

    local_fleet = [s.local_accuracy_fleet for s in summaries]
    personal_values = [s.personal_accuracy for s in summaries if s.personal_accuracy is not None]
    decisions = [c.action for r in strategy.history for c in r.clients]
    dp = None
    if fleet_config.dp is not None:
        dp = {"clip_norm": fleet_config.dp.clip_norm, "noise_multiplier": fleet_config.dp.noise_multiplier,
              "delta": fleet_config.dp.delta, "rounds": fleet_config.rounds,
              "epsilon": gaussian_epsilon(fleet_config.dp.noise_multiplier, fleet_config.rounds, fleet_config.dp.delta),
              "noise_std_per_round": [r.dp["noise_std"] for r in strategy.history if r.dp]}
    return SimulationReport(
        clients=summaries,
        rounds=[r.to_dict() for r in strategy.history],
        fleet_accuracy={"base": _accuracy(evaluator, initial, held_out),
                        "global": _accuracy(evaluator, strategy.final, held_out),
                        "local_mean": float(np.mean(local_fleet)), "local_min": float(np.min(local_fleet)),
                        "local_max": float(np.max(local_fleet))},
        own_accuracy={"base": float(np.mean([s.base_accuracy for s in summaries])),
                      "local": float(np.mean([s.local_accuracy for s in summaries])),
                      "global": float(np.mean([s.global_accuracy for s in summaries])),
                      "personal": float(np.mean(personal_values)) if personal_values else float("nan")},
        bytes=_bytes_summary(strategy, bundle_dir),
        screening={action: decisions.count(action) for action in ("accepted", "clipped", "rejected")},
        dp=dp,
        torch_loaded_on_clients=any(c.torch_loaded for r in strategy.history for c in r.clients)
        or any(r.get("torch-loaded") for r in strategy.personalization),
        seconds={"federated": federated_seconds, "local_only": local_seconds},
        versions={name: importlib.metadata.version(name) for name in ("flwr", "ray", "onnxruntime")},
        config=asdict(config),
    )
