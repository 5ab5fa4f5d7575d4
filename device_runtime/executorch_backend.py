"""The ExecuTorch backend: trains an executorch bundle's train.pte behind the same API as the onnxruntime `Trainer`.

**Limit: this module needs torch.** ExecuTorch's Python bindings (`executorch.extension.pybindings._C`, the
training bindings too) link libtorch / libtorch_python and take and return `torch.Tensor`s, so a Python process
that runs ExecuTorch has torch loaded (~170 MB more RSS than numpy + onnxruntime, measured in
`benchmarks/executorch_step.py`). Only a C++ app on the ExecuTorch runtime avoids it. Everything else in
`device_runtime` stays torch-free, and this module imports torch and executorch only when a trainer is opened.

What it still avoids: `executorch.extension.training` imports `executorch.exir`, the whole export toolchain (torch
inductor, torchao, networkx...), which costs another ~135 MB and ~10 s at import. `_TrainingProgram` drives the
program through the C++ bindings directly with the same contract (`__et_training_*` metadata methods), and the
SGD optimizer is loaded from the training extension without running the package's `__init__`.

Optimizers: SGD without momentum and without clipping runs on ExecuTorch's own SGD (stateless, so nothing is lost
in a checkpoint; ExecuTorch's momentum buffers are internal and could not be checkpointed). Everything else runs the
bundle's `optimizer_step` method, traced from the exporter's `optimizer_update` (the one copy of the maths); its
state lives here as numpy arrays between steps. The trainable tensors live inside the program: the runtime writes
them in place through numpy views of the program's parameter memory.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from .batch import validate_batch
from .bundle import Bundle, read_bundle
from .errors import BatchError, BundleError, CheckpointError, NonFiniteStepError
from .tensor_spec import check_named_tensors
from .trainer import EvaluationTotals, Trainer, TrainerSnapshot, starting_point

__all__ = ["ExecuTorchTrainer", "MergedInference", "GRAPH_FILES", "METHODS", "PARAMETER_PREFIX",
           "TRAIN", "EVALUATE", "PREDICT", "OPTIMIZER_STEP"]

PathLike = Union[str, Path]
# The contract between exporters/executorch*.py and this runtime.
GRAPH_FILES = {"train": "train.pte", "infer": "infer.pte"}
TRAIN, EVALUATE, PREDICT, OPTIMIZER_STEP = "train", "evaluate", "predict", "optimizer_step"
METHODS = (TRAIN, EVALUATE, PREDICT, OPTIMIZER_STEP)
PARAMETER_PREFIX = "model."  # the training program's parameters are "model.<trainable name>"


class _Runtime(NamedTuple):
    torch: Any
    bindings: Any  # executorch.extension.pybindings._C
    sgd: Any  # executorch's get_sgd_optimizer, or None


_RUNTIME: Optional[_Runtime] = None


def _load_training_lib() -> Any:
    """ExecuTorch's training bindings, loaded from their file: the package `__init__` would import exir."""
    spec = importlib.util.find_spec("executorch.extension.training")  # locates the package without running it
    for directory in (spec.submodule_search_locations or []) if spec else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = Path(directory) / "pybindings" / f"_training_lib{suffix}"
            if path.is_file():
                lib_spec = importlib.util.spec_from_file_location(
                    "executorch.extension.training.pybindings._training_lib", path)
                module = importlib.util.module_from_spec(lib_spec)
                lib_spec.loader.exec_module(module)
                return module
    return None


def load_runtime() -> _Runtime:
    """Import torch and the ExecuTorch bindings once (torch first: the bindings link libtorch)."""
    global _RUNTIME
    if _RUNTIME is None:
        try:
            import torch
            from executorch.extension.pybindings import _C
        except ImportError as exc:
            raise BundleError(f"this bundle's backend is executorch, which needs the executorch and torch packages "
                              f"({exc}); pip install 'edgepeft[executorch]', or re-export with --backend onnx") from exc
        lib = _load_training_lib()
        _RUNTIME = _Runtime(torch, _C, getattr(lib, "get_sgd_optimizer", None))
    return _RUNTIME


class _TrainingProgram:
    """forward_backward / named parameters / named gradients of train.pte's `train` method.

    The same contract as `executorch.extension.training.TrainingModule`: the method returns [user outputs,
    gradients, parameters], and the metadata methods `__et_training_{gradients,parameters}_index_<m>` /
    `__et_training_fqn_<m>` say where each part starts and which parameter each tensor is. The parameter outputs
    are the program's own parameter memory (uncloned), valid from load on: writing them updates the program.
    """

    def __init__(self, runtime: _Runtime, path: Path) -> None:
        self.program = runtime.bindings._load_program(str(path))
        self._methods: dict[str, Any] = {}
        grad_start = self._meta("__et_training_gradients_index_")[0]
        param_start = self._meta("__et_training_parameters_index_")[0]
        self.names = list(self._meta("__et_training_fqn_"))
        self._grads = slice(grad_start, param_start)
        self.parameters = dict(zip(self.names, self.method(TRAIN).get_outputs(clone_outputs=False)[param_start:]))
        self.gradients: dict[str, Any] = {}

    def _meta(self, prefix: str) -> list:
        return self.program.load_method(prefix + TRAIN).call([])

    def method(self, name: str) -> Any:
        """A loaded method (memory for it is planned at load, so load each once, on first use)."""
        if name not in self._methods:
            self._methods[name] = self.program.load_method(name)
        return self._methods[name]

    def forward_backward(self, inputs: list) -> Any:
        """Run the joint method; return the loss. `gradients` then alias its memory until the next call."""
        outputs = self.method(TRAIN).call(inputs, clone_outputs=False)
        self.gradients = dict(zip(self.names, outputs[self._grads]))
        return float(outputs[0])


def _dim_bounds(bundle: Bundle) -> dict[str, int]:
    """The manifest's `executorch.dim_bounds`: the largest size of each symbolic dim the programs were planned for."""
    entry = bundle.manifest.get("executorch")
    bounds = entry.get("dim_bounds") if isinstance(entry, dict) else None
    if not isinstance(bounds, dict) or not all(isinstance(k, str) and type(v) is int and v >= 1
                                               for k, v in bounds.items()):
        raise BundleError(f"{bundle.path}: manifest executorch.dim_bounds must map each symbolic dim to an int >= 1, "
                          f"got {bounds!r}; re-export the bundle")
    return bounds


def _bounds_check(feeds: Mapping[str, np.ndarray], bundle: Bundle, bounds: Mapping[str, int]) -> None:
    for spec in (*bundle.inputs, bundle.labels):
        for axis, dim in enumerate(spec.shape):
            if spec.name in feeds and isinstance(dim, str) and dim in bounds and feeds[spec.name].shape[axis] > bounds[dim]:
                raise BatchError(f"input {spec.name!r} has {dim} {feeds[spec.name].shape[axis]} on axis {axis}; this "
                                 f"executorch bundle was exported for {dim} <= {bounds[dim]} (memory is planned for "
                                 "it): split the batch, or re-export with a larger bound (max_batch / dim_bounds)")


class ExecuTorchTrainer:
    """Training, evaluation and inference over an executorch bundle; construct it with `ExecuTorchTrainer.open`."""

    def __init__(self, bundle: Bundle, trainable: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray],
                 step_count: int = 0, threads: Optional[int] = None, native_sgd: bool = True) -> None:
        """Wrap already-validated tensors (see `open`) and load the training program."""
        if bundle.manifest["backend"] != "executorch":
            raise BundleError(f"{bundle.path}: backend is {bundle.manifest['backend']!r}; ExecuTorchTrainer runs "
                              "executorch bundles (device_runtime.open_trainer picks the right trainer)")
        self.bundle = bundle
        self._rt = load_runtime()
        if threads is not None:
            self._rt.bindings._unsafe_reset_threadpool(int(threads))  # process-wide, as onnxruntime's per session
        self._program = _TrainingProgram(self._rt, bundle.graph_path("train"))
        expected = sorted(PARAMETER_PREFIX + n for n in bundle.trainable_names)
        if sorted(self._program.names) != expected:
            raise BundleError(f"{bundle.graph_path('train')}: its parameters {sorted(self._program.names)} are not "
                              f"the manifest's trainable tensors {expected}; re-export the bundle")
        self._params = {n: self._program.parameters[PARAMETER_PREFIX + n] for n in bundle.trainable_names}
        self._views = {n: t.numpy() for n, t in self._params.items()}  # the program's memory, seen from numpy
        self._state: dict[str, np.ndarray] = {}
        self._set_tensors(trainable, state)
        self._step_count = int(step_count)
        self.last_grad_norm: Optional[float] = None
        self._bounds = _dim_bounds(bundle)
        spec = bundle.optimizer
        self.uses_native_sgd = bool(native_sgd and self._rt.sgd is not None and spec.name == "sgd"
                                    and spec.momentum == 0 and spec.max_grad_norm is None)
        self._sgd: Optional[tuple[float, Any]] = None

    @classmethod
    def open(cls, bundle_dir: PathLike, checkpoint: Optional[PathLike] = None, threads: Optional[int] = None,
             verify: bool = True, native_sgd: bool = True) -> "ExecuTorchTrainer":
        """Open a bundle: verify it, then start from its adapter (step 0, zero optimizer state) or a checkpoint."""
        bundle = read_bundle(bundle_dir, verify=verify)
        step, trainable, state = starting_point(bundle, checkpoint)
        return cls(bundle, trainable, state, step, threads, native_sgd)

    # Pure functions of the bundle, the step count and the public state accessors: shared with the ONNX Trainer.
    _resolve_lr = Trainer._resolve_lr
    _refuse_bundle_path = Trainer._refuse_bundle_path
    save_checkpoint = Trainer.save_checkpoint
    export_adapter = Trainer.export_adapter
    step_count = Trainer.step_count

    def _set_tensors(self, trainable: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> None:
        for name, view in self._views.items():
            np.copyto(view, trainable[name])
        self._state = {s.name: np.array(state[s.name], dtype=s.numpy_dtype, copy=True)
                       for s in self.bundle.optimizer_state}

    def _to_torch(self, feeds: Mapping[str, np.ndarray], with_labels: bool) -> list:
        """Validated arrays as the method's leading inputs (torch tensors sharing the numpy memory)."""
        _bounds_check(feeds, self.bundle, self._bounds)
        names = [s.name for s in self.bundle.inputs] + ([self.bundle.labels.name] if with_labels else [])
        return [self._rt.torch.from_numpy(feeds[n]) for n in names]

    def _chunks(self, batch: Mapping[str, Any], with_labels: bool) -> Iterable[tuple[dict[str, np.ndarray], list]]:
        """The batch in pieces within the batch bound, for evaluate / predict (exact: both are per example).

        Only when every input (and the labels) has the same symbolic dim on axis 0; training steps are never
        split, a step is defined on its whole batch.
        """
        feeds = validate_batch(batch, self.bundle, with_labels=with_labels)
        specs = [*self.bundle.inputs, *([self.bundle.labels] if with_labels else [])]
        axis0 = {s.shape[0] if s.shape else None for s in specs}
        symbol = axis0.pop() if len(axis0) == 1 else None
        size = int(feeds[specs[0].name].shape[0]) if specs[0].shape else 1
        limit = self._bounds.get(symbol, size) if isinstance(symbol, str) else size
        if size <= limit:
            yield feeds, self._to_torch(feeds, with_labels)
            return
        for start in range(0, size, limit):
            piece = {n: v[start : start + limit] for n, v in feeds.items()}
            yield piece, self._to_torch(piece, with_labels)

    def _native_sgd(self, lr: float) -> Any:
        if self._sgd is None or self._sgd[0] != lr:  # stateless, so a new lr is just a new optimizer
            spec = self.bundle.optimizer
            named = {PARAMETER_PREFIX + n: t for n, t in self._params.items()}
            self._sgd = (lr, self._rt.sgd(named, lr, 0.0, 0.0, spec.weight_decay, False))
        return self._sgd[1]

    def step(self, batch: Mapping[str, Any], lr: Optional[float] = None) -> float:
        """Apply one optimizer step on `batch` (model inputs and labels) and return its loss (as `Trainer.step`)."""
        inputs = self._to_torch(validate_batch(batch, self.bundle, with_labels=True), with_labels=True)
        lr_value, next_step = self._resolve_lr(lr), self._step_count + 1
        loss = self._program.forward_backward(inputs)
        grads = [self._program.gradients[PARAMETER_PREFIX + n] for n in self._params]
        if self.uses_native_sgd:
            grad_norm = math.sqrt(sum(float(np.vdot(g.numpy(), g.numpy())) for g in grads))  # reported only
            self._check_finite(loss, grad_norm, next_step)
            before = self.trainable_state()
            self._native_sgd(lr_value).step({PARAMETER_PREFIX + n: g for n, g in zip(self._params, grads)})
            new_params, new_state = self._views, {}  # updated in place; `before` undoes a refused update
        else:
            torch = self._rt.torch
            state = [torch.from_numpy(self._state[s.name]) for s in self.bundle.optimizer_state]
            scalars = [torch.tensor(float(next_step)), torch.tensor(lr_value)]
            outputs = self._program.method(OPTIMIZER_STEP).call([*self._params.values(), *grads, *state, *scalars])
            grad_norm = float(outputs[0])
            self._check_finite(loss, grad_norm, next_step)
            n = len(self._params)
            new_params = {name: o.numpy() for name, o in zip(self._params, outputs[1 : 1 + n])}
            new_state = {s.name: o.numpy() for s, o in zip(self.bundle.optimizer_state, outputs[1 + n :])}
        bad = [n for n, v in [*new_params.items(), *new_state.items()] if not np.isfinite(v).all()]
        if bad:
            if self.uses_native_sgd:
                self._set_tensors(before, self._state)
            raise NonFiniteStepError(f"step {next_step} produced non-finite values in {bad} from a finite loss "
                                     f"({loss}) and gradient norm ({grad_norm}); the update was discarded and the "
                                     f"trainer is still at step {self._step_count}. Lower the learning rate")
        self._set_tensors(new_params, {**self._state, **new_state})
        self._step_count, self.last_grad_norm = next_step, grad_norm
        return loss

    def _check_finite(self, loss: float, grad_norm: float, next_step: int) -> None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteStepError(
                f"step {next_step} gave loss {loss} and grad_norm {grad_norm}; the update was discarded and the "
                f"trainer is still at step {self._step_count}. Lower the learning rate, export with max_grad_norm "
                "clipping, or check this batch for extreme values")

    def evaluate(self, batches: Iterable[Mapping[str, Any]]) -> dict[str, Union[float, int]]:
        """Loss weighted by counted targets, examples, targets and (cross-entropy) accuracy, as `Trainer.evaluate`."""
        totals = EvaluationTotals(self.bundle)
        for batch in batches:
            for feeds, inputs in self._chunks(batch, with_labels=True):
                loss, logits, count = self._program.method(EVALUATE).call([*inputs, *self._params.values()])
                totals.add(feeds, float(loss), float(count), logits)
            totals.batches += 1
        return totals.metrics()

    def predict(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Logits for a batch of model inputs, with the current trainable tensors (train.pte's `predict`)."""
        pieces = [self._program.method(PREDICT).call([*tensors, *self._params.values()])[0].numpy()
                  for _, tensors in self._chunks(inputs, with_labels=False)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)

    def trainable_state(self) -> dict[str, np.ndarray]:
        """Copies of the current trainable tensors (the views alias the program's live memory)."""
        return {name: view.copy() for name, view in self._views.items()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Copies of the optimizer state tensors, keyed by state name (e.g. `exp_avg/<param>`)."""
        return {name: value.copy() for name, value in self._state.items()}

    def snapshot(self) -> TrainerSnapshot:
        """Copy the trainable tensors, optimizer state and step count, to `restore` later."""
        def frozen(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            for array in arrays.values():
                array.setflags(write=False)
            return arrays

        return TrainerSnapshot(self.bundle.bundle_id, self._step_count, self.last_grad_norm,
                               frozen(self.trainable_state()), frozen(self.optimizer_state()))

    def restore(self, snapshot: TrainerSnapshot) -> None:
        """Put the trainer back to `snapshot` (tensors, optimizer state, step count); the snapshot stays usable."""
        if not isinstance(snapshot, TrainerSnapshot):
            raise CheckpointError(f"restore needs a TrainerSnapshot from snapshot(), got {type(snapshot).__name__}")
        if snapshot.bundle_id != self.bundle.bundle_id:
            raise CheckpointError(f"the snapshot was taken from the bundle with id {snapshot.bundle_id}, not from "
                                  f"{self.bundle.path}; restore it into a trainer of that bundle")
        fix = "take the snapshot with snapshot() and do not edit it"
        check_named_tensors(snapshot.trainable, self.bundle.trainable, where="snapshot (trainable)",
                            error=CheckpointError, fix=fix)
        check_named_tensors(snapshot.state, self.bundle.optimizer_state, where="snapshot (optimizer state)",
                            error=CheckpointError, fix=fix)
        self._set_tensors(snapshot.trainable, snapshot.state)
        self._step_count, self.last_grad_norm = int(snapshot.step_count), snapshot.last_grad_norm

    def load_trainable(self, tensors: Mapping[str, np.ndarray], *, reset_optimizer: bool) -> None:
        """Replace the trainable tensors (e.g. a federated aggregate), as `Trainer.load_trainable`."""
        if not isinstance(reset_optimizer, bool):
            raise CheckpointError(f"reset_optimizer must be True or False, got {reset_optimizer!r}")
        check_named_tensors(tensors, self.bundle.trainable, where="load_trainable (tensors)", error=CheckpointError,
                            fix="pass one float array per trainable tensor of this bundle (see trainable_state())")
        state = ({s.name: np.zeros(s.shape, dtype=s.numpy_dtype) for s in self.bundle.optimizer_state}
                 if reset_optimizer else self._state)
        self._set_tensors(tensors, state)
        if reset_optimizer:
            self._step_count, self.last_grad_norm = 0, None

    def __repr__(self) -> str:
        return f"ExecuTorchTrainer(bundle={str(self.bundle.path)!r}, step_count={self._step_count})"


class MergedInference:
    """infer.pte: the forward with the exported adapter merged into the weights (XNNPACK), for serving it."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle, self._rt = bundle, load_runtime()
        self._program = self._rt.bindings._load_program(str(bundle.graph_path("infer")))  # outlives its method
        self._method = self._program.load_method("forward")
        self._bounds = _dim_bounds(bundle)

    @classmethod
    def open(cls, bundle_dir: PathLike, verify: bool = True) -> "MergedInference":
        return cls(read_bundle(bundle_dir, verify=verify))

    def predict(self, inputs: Mapping[str, Any]) -> np.ndarray:
        feeds = validate_batch(inputs, self.bundle, with_labels=False)
        _bounds_check(feeds, self.bundle, self._bounds)
        (logits,) = self._method.call([self._rt.torch.from_numpy(feeds[s.name]) for s in self.bundle.inputs])
        return logits.numpy()
