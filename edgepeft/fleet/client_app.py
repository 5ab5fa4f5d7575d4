"""The Flower ClientApp of a fleet: local rounds are `device_runtime` Trainer steps on a bundle, never torch.

One app serves the simulation and real devices. On a device the SuperNode's node config names the bundle and the
user's data (`bundle-dir`, `data-path`, optionally `eval-data-path`, `personal-adapter-dir`, `threads`); in the
simulation `make_client_app(bundle_dir, data_dir)` supplies them and each virtual node reads
`<data_dir>/client-<partition-id>/{train,test}.npz`.

Messages (keys shared with `server_app`):
- train: `arrays` holds the global trainable tensors, `config` the round's `local-steps`, `batch-size`, `lr`,
  `proximal-mu` and `seed`. The client loads the tensors with a fresh optimizer, runs the steps and replies with its
  trainable tensors (`arrays`, nothing else of the model) and `metrics` (`num-examples` weights FedAvg).
- evaluate: scores the global tensors on the client's held-out data; with `personalize-steps` > 0 it then fine-tunes
  a personal adapter from them on its own data, scores that too and keeps it on the device (Context state, and
  `personal-adapter-dir` if configured). The personal adapter is never sent.

This module imports only the standard library, numpy, flwr and device_runtime, so it runs where torch and the host
packages are not installed; a test loads it by file path with those imports blocked.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from device_runtime import LoopConfig, StepEvent, Trainer, personalize
from device_runtime.errors import BatchError, BundleError
from device_runtime.minibatches import iterate_batches
from device_runtime.npz_io import NPZ_READ_ERRORS, read_npz

__all__ = ["ARRAYS_KEY", "CONFIG_KEY", "METRICS_KEY", "PERSONAL_STATE_KEY", "ClientSettings", "app",
           "arrays_to_record", "client_data_paths", "local_loop_config", "make_client_app", "record_to_arrays"]

ARRAYS_KEY, CONFIG_KEY, METRICS_KEY = "arrays", "config", "metrics"  # Flower's FedAvg uses the first two
PERSONAL_STATE_KEY = "personal-adapter"  # where a node keeps its personal adapter between messages
PathLike = Union[str, Path]


def client_data_paths(data_dir: PathLike, client_id: int) -> tuple[Path, Path]:
    """Where a simulated client's train and held-out `.npz` files live (the one naming rule for both sides)."""
    folder = Path(data_dir) / f"client-{int(client_id):03d}"
    return folder / "train.npz", folder / "test.npz"


def arrays_to_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy tensors as a Flower ArrayRecord (names kept, so the server can check them against the bundle)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in tensors.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord back as named numpy tensors."""
    return {name: array.numpy() for name, array in record.items()}


@dataclass(frozen=True)
class ClientSettings:
    """What one node needs: its bundle, its data and its thread count (node config wins over app defaults)."""

    client_id: int
    bundle_dir: Path
    train_path: Path
    eval_path: Optional[Path]
    personal_adapter_dir: Optional[Path]
    threads: Optional[int]

    @classmethod
    def resolve(cls, context: Context, bundle_dir: Optional[PathLike], data_dir: Optional[PathLike],
                threads: Optional[int]) -> "ClientSettings":
        node = context.node_config  # device-local paths: the run config is the server's, not this device's
        client_id = int(node.get("client-id", node.get("partition-id", -1)))
        bundle = node.get("bundle-dir", bundle_dir)
        if bundle is None:
            raise BundleError("no bundle for this node: start the SuperNode with --node-config \"bundle-dir='...'\" "
                              "(or pass bundle_dir to make_client_app)")
        if "data-path" in node:
            train, held_out = Path(str(node["data-path"])), node.get("eval-data-path")
            held_out = Path(str(held_out)) if held_out else None
        elif data_dir is not None and client_id >= 0:
            train, held_out = client_data_paths(data_dir, client_id)
        else:
            raise BatchError("no data for this node: start the SuperNode with --node-config \"data-path='user.npz'\" "
                             "(or pass data_dir to make_client_app for a simulation)")
        adapter_dir = node.get("personal-adapter-dir")
        node_threads = node.get("threads", threads)
        return cls(client_id, Path(str(bundle)), train, held_out, Path(str(adapter_dir)) if adapter_dir else None,
                   int(node_threads) if node_threads is not None else None)


def _read_data(path: Path, what: str) -> dict[str, np.ndarray]:
    try:
        return read_npz(path)
    except NPZ_READ_ERRORS as exc:
        raise BatchError(f"{path}: cannot read the {what} ({exc}); write it with numpy.savez (one array per bundle "
                         "input plus the labels)") from exc


def _config_value(config: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    if key not in config:
        if default is None:
            raise BatchError(f"the server's message has no {key!r} in its config; update the ServerApp")
        return default
    return kind(config[key])


def local_loop_config(steps: int, batch_size: int, lr: float, seed: int) -> LoopConfig:
    """How a client trains in a round: constant lr, no held-out judging (the server judges rounds, not the client)."""
    return LoopConfig(steps=steps, batch_size=batch_size, lr=lr, schedule="constant", quality_guard=False,
                      restore_best=False, seed=seed)


def _loop_config(config: Mapping[str, Any], steps: int, seed: int) -> LoopConfig:
    return local_loop_config(steps, _config_value(config, "batch-size", int), _config_value(config, "lr", float),
                             seed)


def _seed(config: Mapping[str, Any], client_id: int) -> int:
    """Distinct, reproducible batch order per round and client (whatever order the engine runs them in)."""
    return int(_config_value(config, "seed", int, 0)) * 100_003 + max(client_id, 0)


def _proximal_pull(trainer: Trainer, anchor: Mapping[str, np.ndarray], mu: float):
    """FedProx's proximal term as a decoupled step after each optimizer step: w -= lr * mu * (w - w_global).

    The train-step graph's loss is fixed at export, so the gradient of mu/2 * ||w - w_global||^2, which is
    mu * (w - w_global), is applied the way AdamW applies weight decay: outside the adaptive update.
    """

    def pull(event: StepEvent) -> None:
        current = trainer.trainable_state()
        shrink = event.lr * mu
        pulled = {n: (w - shrink * (w - anchor[n])).astype(w.dtype) for n, w in current.items()}
        trainer.load_trainable(pulled, reset_optimizer=False)

    return pull


def _train(settings: ClientSettings, message: Message) -> Message:
    config = message.content[CONFIG_KEY]
    global_tensors = record_to_arrays(message.content[ARRAYS_KEY])
    data = _read_data(settings.train_path, "training data")
    trainer = Trainer.open(settings.bundle_dir, threads=settings.threads)
    trainer.load_trainable(global_tensors, reset_optimizer=True)  # every round starts a fresh local optimizer
    mu = float(_config_value(config, "proximal-mu", float, 0.0))
    on_step = _proximal_pull(trainer, global_tensors, mu) if mu > 0 else None
    report = personalize(trainer, data, _loop_config(config, _config_value(config, "local-steps", int),
                                                     _seed(config, settings.client_id)), on_step=on_step)
    labels = data[trainer.bundle.labels.name]
    metrics = MetricRecord({
        "num-examples": int(len(labels)),
        "train-loss": float(np.mean(report.losses)) if report.losses else float("nan"),
        "steps": int(report.steps_run),
        "skipped-steps": int(report.skipped_steps),
        "client-id": settings.client_id,
        "torch-loaded": int("torch" in sys.modules),  # the claim "no torch on the client", checked where it runs
    })
    content = RecordDict({ARRAYS_KEY: arrays_to_record(trainer.trainable_state()), METRICS_KEY: metrics})
    return Message(content, reply_to=message)


def _score(trainer: Trainer, data: Mapping[str, np.ndarray]) -> dict[str, float]:
    metrics = trainer.evaluate(iterate_batches(data, 256))
    return {"loss": float(metrics["loss"]), "accuracy": float(metrics.get("accuracy", float("nan")))}


def _evaluate(settings: ClientSettings, message: Message, context: Context) -> Message:
    config = message.content[CONFIG_KEY]
    if settings.eval_path is None:
        raise BatchError("this node has no held-out data to evaluate on: set eval-data-path in its node config")
    held_out = _read_data(settings.eval_path, "held-out data")
    trainer = Trainer.open(settings.bundle_dir, threads=settings.threads)
    trainer.load_trainable(record_to_arrays(message.content[ARRAYS_KEY]), reset_optimizer=True)
    scores = _score(trainer, held_out)
    metrics: dict[str, Union[int, float]] = {
        "num-examples": int(len(held_out[trainer.bundle.labels.name])), "client-id": settings.client_id,
        "accuracy": scores["accuracy"], "loss": scores["loss"], "torch-loaded": int("torch" in sys.modules),
    }
    steps = int(_config_value(config, "personalize-steps", int, 0))
    if steps > 0:
        # Personal on top of shared: fine-tune from the global adapter on this device's own data and keep it here.
        train = _read_data(settings.train_path, "training data")
        personalize(trainer, train, _loop_config(config, steps, _seed(config, settings.client_id) + 1))
        personal = _score(trainer, held_out)
        metrics.update({"personal-accuracy": personal["accuracy"], "personal-loss": personal["loss"],
                        "personal-steps": steps})
        context.state[PERSONAL_STATE_KEY] = arrays_to_record(trainer.trainable_state())
        if settings.personal_adapter_dir is not None:
            trainer.export_adapter(settings.personal_adapter_dir)
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=message)


def make_client_app(bundle_dir: Optional[PathLike] = None, data_dir: Optional[PathLike] = None,
                    threads: Optional[int] = 1) -> ClientApp:
    """A ClientApp whose defaults (bundle, simulated data folder, threads) apply where the node config is silent."""
    client = ClientApp()

    @client.train()
    def train(message: Message, context: Context) -> Message:
        return _train(ClientSettings.resolve(context, bundle_dir, data_dir, threads), message)

    @client.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return _evaluate(ClientSettings.resolve(context, bundle_dir, data_dir, threads), message, context)

    return client


app = make_client_app()  # what a SuperNode loads: everything comes from its node config
