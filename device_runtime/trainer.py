"""The on-device Trainer: runs a bundle's train step, evaluates, predicts, checkpoints and exports the adapter.

The trainable tensors and optimizer state live as onnxruntime OrtValues between steps: each step binds them as
inputs and adopts the graph's freshly allocated outputs as the new state, so no tensor makes a numpy round trip
per step. A step whose loss or gradient norm is not finite is discarded whole, leaving the trainer exactly as
it was before the call. `snapshot()` / `restore()` copy that state out and back in memory, which is how the
personalization loop keeps the best or the previous adapter. A Trainer is not thread-safe; use one per thread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Optional, Union

import numpy as np
import onnxruntime as ort

from . import checkpoint as _checkpoint
from .adapter import read_initial_adapter, write_adapter
from .batch import validate_batch
from .bundle import Bundle, read_bundle
from .errors import BatchError, BundleError, CheckpointError, NonFiniteStepError, OptimizerSpecError, OutputPathError
from .graph_contract import COUNT, GRAD_NORM, LOGITS, LOSS, LR, NEW_STATE, NEW_TRAINABLE, STATE, STEP, TRAINABLE
from .frozen_weights import FrozenWeights
from .sessions import create_session, run_bound
from .tensor_spec import check_named_tensors

__all__ = ["Trainer", "TrainerSnapshot"]

PathLike = Union[str, Path]


def _to_ortvalue(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue that owns a private copy: a CPU OrtValue shares its numpy buffer, and callers keep theirs."""
    return ort.OrtValue.ortvalue_from_numpy(np.array(array, copy=True, order="C"))


def _scalar(value: ort.OrtValue, graph: str, name: str) -> float:
    """A one-element graph output as a float; anything larger means the graph breaks the contract."""
    array = value.numpy()
    if array.size != 1:
        raise BundleError(f"the {graph} graph's {name!r} output has shape {list(array.shape)}, the contract says a "
                          "scalar; re-export the bundle")
    return float(array.reshape(-1)[0])


class EvaluationTotals:
    """The running sums behind `evaluate`, shared by both backends' trainers.

    Loss is weighted by each piece's counted targets; `examples` sums axis 0 of the first model input; for
    cross-entropy, accuracy is the argmax of the logits' last axis against the labels, ignore_index skipped.
    """

    def __init__(self, bundle: Bundle) -> None:
        loss = bundle.loss
        self._ignore_index = loss["ignore_index"] if loss["name"] == "cross_entropy" else None
        self._first_input, self._labels = bundle.inputs[0].name, bundle.labels.name
        self.batches = 0  # counted by the caller: one batch may be evaluated in several pieces
        self._weighted_loss = self._targets = 0.0
        self._examples = self._correct = self._counted = 0

    def add(self, feeds: Mapping[str, np.ndarray], loss: float, count: float, logits: Any) -> None:
        """One evaluated piece; `logits` is anything with `.numpy()` (read only for cross-entropy)."""
        self._weighted_loss += loss * count
        self._targets += count
        first = feeds[self._first_input]
        self._examples += int(first.shape[0]) if first.ndim else 1
        if self._ignore_index is not None:
            labels = feeds[self._labels]
            mask = labels != self._ignore_index
            self._correct += int((logits.numpy().argmax(axis=-1) == labels)[mask].sum())
            self._counted += int(mask.sum())

    def metrics(self) -> dict[str, Union[float, int]]:
        if self.batches == 0:
            raise BatchError("evaluate got no batches; pass an iterable with at least one batch")
        if self._targets <= 0:
            raise BatchError("evaluate found no counted targets (every label is ignore_index); "
                             "evaluate on batches with at least one real label")
        metrics: dict[str, Union[float, int]] = {
            "loss": self._weighted_loss / self._targets, "examples": self._examples, "targets": self._targets,
        }
        if self._ignore_index is not None:
            metrics["accuracy"] = self._correct / self._counted
        return metrics


def starting_point(bundle: Bundle, checkpoint: Optional[PathLike]) -> tuple[int, dict[str, np.ndarray],
                                                                             dict[str, np.ndarray]]:
    """(step, trainable, optimizer state) to open with: the bundle's adapter at step 0 with zero optimizer state,
    or a verified checkpoint of this bundle. Both backends' trainers start here."""
    if checkpoint is None:
        state = {s.name: np.zeros(s.shape, dtype=s.numpy_dtype) for s in bundle.optimizer_state}
        return 0, read_initial_adapter(bundle), state
    return _checkpoint.load_checkpoint(checkpoint, bundle)


@dataclass(frozen=True)
class TrainerSnapshot:
    """A trainer's state at one moment, as read-only numpy copies: restore it with `Trainer.restore`.

    Costs one copy of the trainable tensors and optimizer state (adapter-sized, not model-sized).
    """

    bundle_id: str
    step_count: int
    last_grad_norm: Optional[float]
    trainable: Mapping[str, np.ndarray]
    state: Mapping[str, np.ndarray]


def _frozen_copies(values: Mapping[str, ort.OrtValue]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in values.items():
        array = value.numpy().copy()
        array.setflags(write=False)  # a snapshot must not change after it was taken
        out[name] = array
    return out


class Trainer:
    """Training, evaluation and inference over one bundle; construct it with `Trainer.open`."""

    def __init__(
        self,
        bundle: Bundle,
        trainable: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        step_count: int = 0,
        threads: Optional[int] = None,
        share_weights: bool = True,
        prepack: bool = True,
        arena: bool = True,
    ) -> None:
        """Wrap already-validated tensors (see `Trainer.open`, which validates them) and open the train step."""
        if bundle.manifest["backend"] != "onnx":
            raise BundleError(f"{bundle.path}: backend is {bundle.manifest['backend']!r}; this Trainer runs onnx "
                              "bundles, re-export with --backend onnx")
        self.bundle = bundle
        self.threads = threads
        self.last_grad_norm: Optional[float] = None
        self._step_count = int(step_count)
        self._trainable = {t.name: _to_ortvalue(trainable[t.name]) for t in bundle.trainable}
        self._state = {s.name: _to_ortvalue(state[s.name]) for s in bundle.optimizer_state}
        # The train step is opened eagerly so a broken bundle fails at open, not at the first step;
        # eval and infer are opened on first use because many devices only ever train or only predict.
        self._frozen = FrozenWeights.map(bundle) if share_weights else None
        self._prepack, self._arena = prepack, arena
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._session("train_step")

    @classmethod
    def open(
        cls,
        bundle_dir: PathLike,
        checkpoint: Optional[PathLike] = None,
        threads: Optional[int] = None,
        verify: bool = True,
        share_weights: bool = True,
        prepack: bool = True,
        arena: bool = True,
    ) -> "Trainer":
        """Open a bundle: verify it, then start from its adapter (step 0, zero optimizer state) or a checkpoint.

        share_weights: map weights.bin once and share it between the graphs (one copy of the frozen base in memory
        instead of one per session). prepack: let onnxruntime keep pre-packed private copies of fp32 matmul weights
        (faster steps, more memory); False gives the smallest footprint. arena: recycle freed activations in
        onnxruntime's arena (the default, and the lower peak with glibc; see `sessions.create_session`).
        """
        bundle = read_bundle(bundle_dir, verify=verify)
        step, trainable, state = starting_point(bundle, checkpoint)
        return cls(bundle, trainable, state, step, threads, share_weights=share_weights, prepack=prepack,
                   arena=arena)

    @property
    def step_count(self) -> int:
        """Number of optimizer steps applied so far (restored from a checkpoint when resuming)."""
        return self._step_count

    def _session(self, graph: str) -> ort.InferenceSession:
        if graph not in self._sessions:
            self._sessions[graph] = create_session(self.bundle, graph, self.threads, self._frozen, self._prepack,
                                                  self._arena)
        return self._sessions[graph]

    def _staged(self, feeds: Mapping[str, np.ndarray]) -> ContextManager[None]:
        """The batch's rows of the bundle's row tables, resident for one run (see `device_runtime.row_tables`)."""
        return self._frozen.staged(feeds) if self._frozen is not None else nullcontext()

    def _trainable_values(self) -> dict[str, ort.OrtValue]:
        return {TRAINABLE + name: value for name, value in self._trainable.items()}

    def _resolve_lr(self, lr: Optional[float]) -> float:
        value = self.bundle.optimizer.lr if lr is None else lr
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise OptimizerSpecError(f"lr must be a number, got {type(value).__name__}; pass e.g. lr=1e-3")
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise OptimizerSpecError(f"lr must be finite and >= 0, got {value}; pass e.g. lr=1e-3 or None for the "
                                     f"bundle's lr ({self.bundle.optimizer.lr})")
        return value

    def step(self, batch: Mapping[str, Any], lr: Optional[float] = None) -> float:
        """Apply one optimizer step on `batch` (model inputs and labels) and return its loss.

        `lr` overrides the bundle's learning rate for this step (for schedules). The graph receives the 1-based
        step number, which drives AdamW's bias correction, so resuming from a checkpoint continues exactly.
        """
        feeds = validate_batch(batch, self.bundle, with_labels=True)
        next_step = self._step_count + 1
        arrays = {**feeds, STEP: np.array(next_step, dtype=np.float32),
                  LR: np.array(self._resolve_lr(lr), dtype=np.float32)}
        values = {**self._trainable_values(), **{STATE + n: v for n, v in self._state.items()}}
        outputs = [LOSS, GRAD_NORM] + [NEW_TRAINABLE + n for n in self._trainable]
        outputs += [NEW_STATE + n for n in self._state]
        with self._staged(feeds):
            results = run_bound(self._session("train_step"), "train_step", arrays, values, outputs)
        loss = _scalar(results[0], "train_step", LOSS)
        grad_norm = _scalar(results[1], "train_step", GRAD_NORM)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteStepError(
                f"step {next_step} gave loss {loss} and grad_norm {grad_norm}; the update was discarded and the "
                f"trainer is still at step {self._step_count}. Lower the learning rate, export with max_grad_norm "
                "clipping, or check this batch for extreme values"
            )
        n_trainable = len(self._trainable)
        # A finite loss and gradient can still give a non-finite update (a broken optimizer graph did exactly that
        # once), and a non-finite moment would poison every later step; adapters and their optimizer state are
        # small, so reading them back is cheap insurance that bad state is never kept.
        names = [*self._trainable, *(STATE + n for n in self._state)]
        bad = [n for n, v in zip(names, results[2:]) if not np.isfinite(v.numpy()).all()]
        if bad:
            raise NonFiniteStepError(
                f"step {next_step} produced non-finite values in {bad} from a finite loss ({loss}) and gradient norm "
                f"({grad_norm}); the update was discarded and the trainer is still at step {self._step_count}. "
                "Lower the learning rate; if that does not help, the bundle's optimizer graph is suspect: re-export "
                "it and report this"
            )
        self._trainable = dict(zip(self._trainable, results[2 : 2 + n_trainable]))
        self._state = dict(zip(self._state, results[2 + n_trainable :]))
        self._step_count = next_step
        self.last_grad_norm = grad_norm
        return loss

    def evaluate(self, batches: Iterable[Mapping[str, Any]]) -> dict[str, Union[float, int]]:
        """Loss over all batches, weighted by each batch's counted targets, plus accuracy for cross-entropy.

        Returns `loss`, `examples` (sum of axis 0 of the first model input), `targets` (counted targets) and,
        for cross-entropy, `accuracy` (argmax of the logits' last axis vs labels, ignore_index skipped).
        """
        session = self._session("eval")
        totals = EvaluationTotals(self.bundle)
        for batch in batches:
            feeds = validate_batch(batch, self.bundle, with_labels=True)
            with self._staged(feeds):
                loss_v, logits_v, count_v = run_bound(session, "eval", feeds, self._trainable_values(),
                                                      [LOSS, LOGITS, COUNT])
            totals.add(feeds, _scalar(loss_v, "eval", LOSS), _scalar(count_v, "eval", COUNT), logits_v)
            totals.batches += 1
        return totals.metrics()

    def predict(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Logits for a batch of model inputs (no labels), from the infer graph with the current trainable tensors."""
        feeds = validate_batch(inputs, self.bundle, with_labels=False)
        with self._staged(feeds):
            (logits,) = run_bound(self._session("infer"), "infer", feeds, self._trainable_values(), [LOGITS])
        return logits.numpy()

    def trainable_state(self) -> dict[str, np.ndarray]:
        """Copies of the current trainable tensors (a CPU OrtValue's numpy view would alias the live state)."""
        return {name: value.numpy().copy() for name, value in self._trainable.items()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Copies of the current optimizer state tensors, keyed by state name (e.g. `exp_avg/<param>`)."""
        return {name: value.numpy().copy() for name, value in self._state.items()}

    def snapshot(self) -> TrainerSnapshot:
        """Copy the trainable tensors, optimizer state and step count, to `restore` later (e.g. a rollback)."""
        return TrainerSnapshot(self.bundle.bundle_id, self._step_count, self.last_grad_norm,
                               _frozen_copies(self._trainable), _frozen_copies(self._state))

    def restore(self, snapshot: TrainerSnapshot) -> None:
        """Put the trainer back to `snapshot` (tensors, optimizer state, step count); the snapshot stays usable."""
        if not isinstance(snapshot, TrainerSnapshot):
            raise CheckpointError(f"restore needs a TrainerSnapshot from Trainer.snapshot(), got "
                                  f"{type(snapshot).__name__}")
        if snapshot.bundle_id != self.bundle.bundle_id:
            raise CheckpointError(f"the snapshot was taken from the bundle with id {snapshot.bundle_id}, not from "
                                  f"{self.bundle.path} (id {self.bundle.bundle_id}); restore it into a trainer of "
                                  "that bundle")
        fix = "take the snapshot with Trainer.snapshot() and do not edit it"
        check_named_tensors(snapshot.trainable, self.bundle.trainable, where="snapshot (trainable)",
                            error=CheckpointError, fix=fix)
        check_named_tensors(snapshot.state, self.bundle.optimizer_state, where="snapshot (optimizer state)",
                            error=CheckpointError, fix=fix)
        # Fresh OrtValues (private copies), so stepping from the restored state can never write into the snapshot.
        self._trainable = {t.name: _to_ortvalue(snapshot.trainable[t.name]) for t in self.bundle.trainable}
        self._state = {s.name: _to_ortvalue(snapshot.state[s.name]) for s in self.bundle.optimizer_state}
        self._step_count = int(snapshot.step_count)
        self.last_grad_norm = snapshot.last_grad_norm

    def _refuse_bundle_path(self, path: PathLike, what: str) -> Path:
        """Never write into the bundle: its files are hashed, and a write there would break its verification."""
        target = Path(path).resolve()
        root = self.bundle.path.resolve()
        if target == root or root in target.parents:
            raise OutputPathError(f"{path}: is inside the bundle {self.bundle.path}; write the {what} to a "
                                  "directory outside the bundle")
        return Path(path)

    def save_checkpoint(self, path: PathLike) -> Path:
        """Write the trainable tensors, optimizer state and step to `<path>/checkpoint.safetensors` atomically."""
        directory = self._refuse_bundle_path(path, "checkpoint")
        return _checkpoint.save_checkpoint(directory, self.bundle.bundle_id, self._step_count,
                                           self.trainable_state(), self.optimizer_state())

    def export_adapter(self, path: PathLike) -> Path:
        """Write `<path>/adapter.safetensors` + `adapter_config.json` (bundle id, methods, step) atomically."""
        directory = self._refuse_bundle_path(path, "adapter")
        return write_adapter(directory, self.bundle, self._step_count, self.trainable_state())

    # --- Trainable tensors set from outside (a federated server's aggregate) -------------------------------------
    def load_trainable(self, tensors: Mapping[str, np.ndarray], *, reset_optimizer: bool) -> None:
        """Replace the trainable tensors, e.g. with the global adapter a federated server sent; nothing else moves.

        The tensors are checked like a checkpoint's (exact names, shapes, dtypes, finite values) and copied, so the
        caller's arrays never alias the live state. `reset_optimizer` must be chosen: True zeroes the optimizer
        state and the step count, as a fresh optimizer would (AdamW's bias correction restarts with its moments);
        False keeps both, for a small correction between steps of one run (e.g. a FedProx pull).
        """
        if not isinstance(reset_optimizer, bool):
            raise CheckpointError(f"reset_optimizer must be True or False, got {reset_optimizer!r}; pass True when "
                                  "starting a new round from new tensors")
        check_named_tensors(tensors, self.bundle.trainable, where="load_trainable (tensors)", error=CheckpointError,
                            fix="pass one float array per trainable tensor of this bundle (see trainable_state())")
        self._trainable = {t.name: _to_ortvalue(tensors[t.name]) for t in self.bundle.trainable}
        if reset_optimizer:
            self._state = {s.name: _to_ortvalue(np.zeros(s.shape, dtype=s.numpy_dtype))
                           for s in self.bundle.optimizer_state}
            self._step_count = 0
            self.last_grad_norm = None

    def __repr__(self) -> str:
        return f"Trainer(bundle={str(self.bundle.path)!r}, step_count={self._step_count})"
