"""The Flower ServerApp of a fleet and its strategy: FedAvg over the trainable adapter tensors only.

The frozen base never travels: the server reads the bundle's initial adapter and every message carries exactly the
bundle's trainable tensors (checked by name, shape and dtype on the way back). `AdapterStrategy` is Flower's FedAvg
(sampling, messages, logging) with its own aggregation: replies are screened (`robust.screen_updates`), the kept
updates averaged weighted by `num-examples` (or clipped and noised with equal weights under DP), and applied with
an optional server momentum (FedAvgM). FedProx's `proximal-mu` goes to the clients in the round config. After the
last round the server sends one more evaluate message with `personalize-steps`: each client scores the global
adapter, fine-tunes a personal one on its own data and reports both. Each round's wire bytes (Flower's own
serialization of the messages) and each client's decision are kept in `AdapterStrategy.history`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from device_runtime.adapter import read_initial_adapter, write_adapter
from device_runtime.bundle import read_bundle
from device_runtime.tensor_spec import TensorSpec, check_named_tensors

from ..errors import ConfigError, check_positive_int, check_positive_number
from .client_app import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_record, record_to_arrays
from .robust import (
    DPConfig,
    RobustConfig,
    UpdateDecision,
    cap_weights,
    dp_mean,
    screen_updates,
    update_norm,
    weighted_mean,
)

__all__ = ["AdapterStrategy", "ClientRound", "FleetConfig", "RoundRecord", "app", "make_server_app",
           "message_wire_bytes", "wire_breakdown"]

log = logging.getLogger("edgepeft.fleet")


@dataclass(frozen=True)
class FleetConfig:
    """A federated run: rounds, the clients' local training, the server's optimizer, screening and privacy."""

    rounds: int = 10
    local_steps: int = 20
    batch_size: int = 16
    lr: float = 1e-2
    proximal_mu: float = 0.0  # FedProx; 0 is plain FedAvg
    server_momentum: float = 0.0  # FedAvgM; 0 is plain FedAvg
    server_lr: float = 1.0
    personalize_steps: int = 30  # local fine-tuning after the last round (0: skip the personalization round)
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0  # per-round federated evaluation (the final personalization round always runs)
    min_clients: int = 2
    seed: int = 0
    robust: Optional[RobustConfig] = field(default_factory=RobustConfig)  # None: no screening beyond shapes
    dp: Optional[DPConfig] = None
    timeout: float = 600.0

    def __post_init__(self) -> None:
        for name in ("rounds", "local_steps", "batch_size", "min_clients"):
            check_positive_int(name, getattr(self, name), "see `edgepeft fleet simulate --help`")
        check_positive_number("lr", self.lr, "e.g. 1e-2")
        check_positive_number("server_lr", self.server_lr, "1.0 applies the mean update as is")
        if not (isinstance(self.proximal_mu, (int, float)) and 0 <= self.proximal_mu < math.inf):
            raise ConfigError(f"proximal_mu must be a finite number >= 0, got {self.proximal_mu!r}; try 0.01")
        if not (isinstance(self.server_momentum, (int, float)) and 0 <= self.server_momentum < 1):
            raise ConfigError(f"server_momentum must be in [0, 1), got {self.server_momentum!r}; try 0.9")
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
        if self.fraction_train == 0:
            raise ConfigError("fraction_train must be > 0: a round needs clients to train")
        if isinstance(self.personalize_steps, bool) or not isinstance(self.personalize_steps, int) or \
                self.personalize_steps < 0:
            raise ConfigError(f"personalize_steps must be an int >= 0, got {self.personalize_steps!r}")

    def train_config(self) -> dict[str, Union[int, float]]:
        """What every train message tells the clients (Flower adds `server-round`)."""
        return {"local-steps": self.local_steps, "batch-size": self.batch_size, "lr": float(self.lr),
                "proximal-mu": float(self.proximal_mu)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], default: Optional["FleetConfig"] = None) -> "FleetConfig":
        """Overrides from a Flower run config (`[tool.flwr.app.config]` or `flwr run --run-config`), kebab-case keys.

        `num-server-rounds`, `local-steps`, `batch-size`, `lr`, `proximal-mu`, `server-momentum`, `server-lr`,
        `personalize-steps`, `fraction-train`, `fraction-evaluate`, `min-clients`, `seed`; `dp-clip-norm` with
        `dp-noise-multiplier` turn on DP; `max-norm-ratio` / `outlier-action` tune screening.
        """
        base = default or cls()
        names = {f.name for f in fields(cls)} - {"robust", "dp"}
        changes: dict[str, Any] = {}
        for key, value in run_config.items():
            name = "rounds" if key == "num-server-rounds" else key.replace("-", "_")
            if name in names:
                kind = type(getattr(base, name))
                changes[name] = kind(value)
        if "dp-clip-norm" in run_config:
            changes["dp"] = DPConfig(float(run_config["dp-clip-norm"]),
                                     float(run_config.get("dp-noise-multiplier", 1.0)))
        if "max-norm-ratio" in run_config or "outlier-action" in run_config:
            robust = base.robust or RobustConfig()
            changes["robust"] = replace(robust, max_norm_ratio=float(run_config.get("max-norm-ratio",
                                                                                   robust.max_norm_ratio)),
                                        outlier_action=str(run_config.get("outlier-action", robust.outlier_action)))
        return replace(base, **changes)


def wire_breakdown(message: Message) -> dict[str, int]:
    """Bytes Flower serializes for a message, by object type, as the SuperLink stores and forwards them.

    Flower moves a message as content-addressed objects: the Message, its RecordDict, each record, each Array
    (dtype/shape JSON) and its ArrayChunks (the `.npy` bytes: a 128-byte header plus the raw tensor). Identical
    objects travel once (two all-zero LoRA B matrices of one shape are one chunk). gRPC adds its own framing per
    pushed object on top of this.
    """
    sizes: dict[str, int] = {}
    for obj in get_all_nested_objects(message).values():
        kind = type(obj).__name__
        sizes[kind] = sizes.get(kind, 0) + len(obj.deflate())
    return sizes


def message_wire_bytes(message: Message) -> int:
    """Total serialized bytes of a message (see `wire_breakdown`)."""
    return sum(wire_breakdown(message).values())


@dataclass
class ClientRound:
    """One client's part in one round, as the server saw it."""

    client_id: int
    node_id: int
    num_examples: int
    train_loss: float
    downlink_bytes: int
    uplink_bytes: int
    payload_bytes: int  # raw bytes of the tensors in the reply (what the adapter itself weighs)
    update_norm: float
    action: str
    reason: str = ""
    torch_loaded: int = 0


@dataclass
class RoundRecord:
    """What a round did: who trained, what was kept, how far the global adapter moved, what the server scored."""

    round: int
    clients: list[ClientRound] = field(default_factory=list)
    failures: int = 0
    accepted: int = 0
    global_update_norm: float = 0.0
    dp: Optional[dict] = None
    downlink_breakdown: dict[str, int] = field(default_factory=dict)  # one train message, by Flower object type
    uplink_breakdown: dict[str, int] = field(default_factory=dict)  # the first parsed reply, by object type
    evaluation: list[dict] = field(default_factory=list)  # per-client federated evaluation replies
    server_metrics: Optional[dict] = None  # the ServerApp-side evaluate_fn result after this round

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Rejected(Exception):
    """A reply that cannot be aggregated; the message says why."""


class AdapterStrategy(FedAvg):
    """FedAvg on the bundle's trainable tensors, with robust screening, optional DP and server momentum."""

    def __init__(self, trainable: Sequence[TensorSpec], config: FleetConfig = FleetConfig()) -> None:
        super().__init__(fraction_train=config.fraction_train, fraction_evaluate=config.fraction_evaluate,
                         min_train_nodes=config.min_clients, min_evaluate_nodes=config.min_clients,
                         min_available_nodes=config.min_clients)
        self.trainable = list(trainable)
        self.config = config
        self.history: list[RoundRecord] = []
        self.personalization: list[dict] = []
        self.final: Optional[dict[str, np.ndarray]] = None
        self.initial_server_metrics: Optional[dict] = None  # evaluate_fn on the starting adapter (round 0)
        self._global: Optional[dict[str, np.ndarray]] = None
        self._downlink = 0
        self._velocity: Optional[dict[str, np.ndarray]] = None
        self._rng = np.random.default_rng([config.seed, 11])

    def summary(self) -> None:
        super().summary()
        c = self.config
        log.info("adapter strategy: %d trainable tensors; proximal-mu %g, server momentum %g, robust %s, dp %s",
                 len(self.trainable), c.proximal_mu, c.server_momentum, c.robust, c.dp)

    # -- train ---------------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = self._checked(record_to_arrays(arrays), "the global adapter")
        for key, value in self.config.train_config().items():
            config[key] = value
        config["seed"] = self.config.seed * 1_000 + server_round
        messages = list(super().configure_train(server_round, arrays, config, grid))
        record = RoundRecord(server_round)
        if messages:  # the same content goes to every client
            record.downlink_breakdown = wire_breakdown(messages[0])
        self._downlink = sum(record.downlink_breakdown.values())
        self.history.append(record)
        return messages

    def _checked(self, tensors: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        check_named_tensors(tensors, self.trainable, where=where, error=_Rejected, require_finite=False,
                            fix="only the bundle's trainable tensors may travel")
        return dict(tensors)

    def _parse(self, message: Message) -> tuple[int, int, dict[str, np.ndarray], MetricRecord]:
        content = message.content
        if ARRAYS_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
            raise _Rejected(f"reply lacks {ARRAYS_KEY!r} arrays or {METRICS_KEY!r} metrics")
        metrics = content[METRICS_KEY]
        count = metrics.get("num-examples")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise _Rejected(f"num-examples must be a positive int, got {count!r}")
        try:
            tensors = record_to_arrays(content[ARRAYS_KEY])
        except (TypeError, ValueError) as exc:
            raise _Rejected(f"arrays are not readable numpy arrays ({exc})") from exc
        return int(metrics.get("client-id", -1)), count, self._checked(tensors, "reply"), metrics

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        valid, failed = self._check_and_log_replies(replies, is_train=True, validate=False)
        if self._global is None:
            raise RuntimeError("aggregate_train before configure_train: the strategy does not know the global adapter")
        if not self.history or self.history[-1].round != server_round:
            self.history.append(RoundRecord(server_round))
        record = self.history[-1]
        record.failures = len(failed)
        candidates = self._collect(valid, record)
        accepted = self._screen(candidates)
        record.accepted = len(accepted)
        rejected = len(record.clients) - len(accepted) + len(failed)
        if not accepted:
            log.warning("round %d: no update was accepted; the global adapter stays as it was", server_round)
            return None, MetricRecord({"accepted": 0, "rejected": rejected})
        if self.config.dp is not None:
            mean, report = dp_mean([u for _, u in accepted], self.config.dp, self._rng)
            record.dp = report.to_dict()
        else:
            weights = [row.num_examples for row, _ in accepted]
            if self.config.robust is not None:  # a client claiming a huge sample count must not outweigh the rest
                weights = cap_weights(weights, [row.client_id for row, _ in accepted], self.config.robust)
            mean = weighted_mean([u for _, u in accepted], weights)
        step = self._server_step(mean)
        record.global_update_norm = update_norm(step)
        new = {s.name: (self._global[s.name].astype(np.float64) + step[s.name]).astype(s.numpy_dtype)
               for s in self.trainable}
        total = sum(row.num_examples for row, _ in accepted)
        loss = sum(row.train_loss * row.num_examples for row, _ in accepted) / total
        self.final = new
        return arrays_to_record(new), MetricRecord({"train-loss": float(loss), "accepted": len(accepted),
                                                    "rejected": rejected})

    def _collect(self, replies: list[Message], record: RoundRecord) -> list[tuple[ClientRound, dict]]:
        """Parse every reply into a row of the round record; well-formed ones also give their update (float64)."""
        assert self._global is not None
        parsed: list[tuple[ClientRound, Optional[dict]]] = []
        for message in replies:
            sizes = wire_breakdown(message)
            if not record.uplink_breakdown:
                record.uplink_breakdown = sizes
            row = ClientRound(-1, message.metadata.src_node_id, 0, math.nan, self._downlink, sum(sizes.values()), 0,
                              math.nan, "rejected")
            try:
                row.client_id, row.num_examples, tensors, metrics = self._parse(message)
            except _Rejected as exc:
                row.reason = f"malformed reply: {exc}"
                log.warning("node %s: update rejected (%s)", row.node_id, row.reason)
                parsed.append((row, None))
                continue
            row.payload_bytes = int(sum(t.nbytes for t in tensors.values()))
            row.train_loss = float(metrics.get("train-loss", math.nan))
            row.torch_loaded = int(metrics.get("torch-loaded", 0))
            parsed.append((row, {n: t.astype(np.float64) - self._global[n].astype(np.float64)
                                 for n, t in tensors.items()}))
        parsed.sort(key=lambda item: (item[0].client_id, item[0].node_id))  # replies arrive in any order
        record.clients = [row for row, _ in parsed]
        return [(row, update) for row, update in parsed if update is not None]

    def _screen(self, candidates: list[tuple[ClientRound, dict]]) -> list[tuple[ClientRound, dict]]:
        """Robust screening (the median rule is off under DP: clipping bounds every client there)."""
        updates = [update for _, update in candidates]
        if self.config.robust is None:
            kept = list(updates)
            decisions = [UpdateDecision(row.client_id, update_norm(u), "accepted", "") for row, u in candidates]
        else:
            kept, decisions = screen_updates(updates, [row.client_id for row, _ in candidates], self.config.robust,
                                             median_rule=self.config.dp is None)
        for (row, _), decision in zip(candidates, decisions):
            row.update_norm, row.action, row.reason = decision.norm, decision.action, decision.reason
        return [(row, update) for (row, _), update in zip(candidates, kept) if update is not None]

    def _server_step(self, mean: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """FedAvgM: v = beta * v + mean update; the global moves by server_lr * v (plain FedAvg at beta 0, lr 1)."""
        beta = self.config.server_momentum
        if beta > 0:
            self._velocity = mean if self._velocity is None else {
                n: beta * self._velocity[n] + mean[n] for n in mean}
            mean = self._velocity
        return {n: self.config.server_lr * v for n, v in mean.items()}

    # -- evaluate ------------------------------------------------------------------------------------------------
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        valid, _ = self._check_and_log_replies(replies, is_train=False, validate=False)
        rows = _metric_rows(valid)
        if self.history and self.history[-1].round == server_round:
            self.history[-1].evaluation = rows
        return _weighted_metrics(rows)

    def personalize_round(self, grid: Grid, arrays: ArrayRecord, steps: int) -> list[dict]:
        """The last message of a run: every client scores the global adapter, then fine-tunes and scores its own."""
        config = ConfigRecord({**self.config.train_config(), "personalize-steps": int(steps),
                               "seed": self.config.seed * 1_000 + 999})
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, len(list(grid.get_node_ids())))
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in node_ids]
        replies = grid.send_and_receive(messages=messages, timeout=self.config.timeout)
        valid, _ = self._check_and_log_replies(replies, is_train=False, validate=False)
        self.personalization = _metric_rows(valid)
        return self.personalization


def _metric_rows(messages: Iterable[Message]) -> list[dict]:
    rows = []
    for message in messages:
        record = message.content.metric_records.get(METRICS_KEY)
        if record is not None:
            rows.append({"node_id": message.metadata.src_node_id, **dict(record)})
    return sorted(rows, key=lambda r: r.get("client-id", -1))


def _weighted_metrics(rows: list[dict]) -> Optional[MetricRecord]:
    total = sum(r.get("num-examples", 0) for r in rows)
    if not rows or total <= 0:
        return None
    keys = [k for k in ("accuracy", "loss", "personal-accuracy", "personal-loss") if all(k in r for r in rows)]
    return MetricRecord({k: float(sum(r[k] * r["num-examples"] for r in rows) / total) for k in keys})


EvaluateFn = Callable[[int, ArrayRecord], Optional[MetricRecord]]


def make_server_app(config: Optional[FleetConfig] = None, bundle_dir: Optional[Union[str, Path]] = None, *,
                    strategy: Optional[AdapterStrategy] = None, evaluate_fn: Optional[EvaluateFn] = None,
                    adapter_out: Optional[Union[str, Path]] = None) -> ServerApp:
    """A ServerApp for one bundle. Run config keys (`bundle-dir`, `adapter-out`, see `FleetConfig.from_run_config`)
    override the arguments, which is how `flwr run` configures the module-level `app`."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        fleet = FleetConfig.from_run_config(run_config, config)
        directory = run_config.get("bundle-dir", bundle_dir)
        if directory is None:
            raise ConfigError("no bundle: set bundle-dir in [tool.flwr.app.config] or pass bundle_dir")
        bundle = read_bundle(directory)
        chosen = strategy if strategy is not None else AdapterStrategy(bundle.trainable, fleet)
        initial = read_initial_adapter(bundle)
        result = chosen.start(grid=grid, initial_arrays=arrays_to_record(initial), num_rounds=fleet.rounds,
                              timeout=fleet.timeout, evaluate_fn=_recording(chosen, evaluate_fn))
        final = result.arrays if len(result.arrays) else arrays_to_record(initial)
        chosen.final = record_to_arrays(final)
        if fleet.personalize_steps > 0:
            chosen.personalize_round(grid, final, fleet.personalize_steps)
        out = run_config.get("adapter-out", adapter_out)
        if out:
            write_adapter(Path(str(out)), bundle, fleet.rounds, chosen.final)

    return server


def _recording(strategy: AdapterStrategy, evaluate_fn: Optional[EvaluateFn]) -> Optional[EvaluateFn]:
    """Wrap the centralized evaluation so its result lands in the round record too."""
    if evaluate_fn is None:
        return None

    def evaluate(server_round: int, arrays: ArrayRecord) -> Optional[MetricRecord]:
        metrics = evaluate_fn(server_round, arrays)
        if metrics is not None and server_round == 0:
            strategy.initial_server_metrics = dict(metrics)
        elif metrics is not None and strategy.history and strategy.history[-1].round == server_round:
            strategy.history[-1].server_metrics = dict(metrics)
        return metrics

    return evaluate


app = make_server_app()  # what `flwr run` loads: the bundle and settings come from the run config
