"""Export a PEFT-injected torch model to an ONNX bundle: train-step, eval and infer graphs plus frozen weights.

The trainable tensors are whatever has `requires_grad=True` on the model (what `edgepeft.apply` left trainable);
everything else — frozen parameters and buffers — is written once to `weights.bin` and shared by the three graphs.
The bundle runs on the stock `onnxruntime` package through `device_runtime.Trainer`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import torch
from safetensors.numpy import save_file

from device_runtime.bundle import Bundle, write_bundle
from device_runtime.optim_spec import AdamW, OptimizerSpec

from .errors import ExportError
from .losses import LossSpec, resolve_loss
from .onnx_graph import bind_frozen_to_weights, trace_to_onnx, write_weights_file
from .step_functions import GraphLayout, make_eval, make_infer, make_train_step, model_logits

__all__ = ["export", "GRAPH_FILES"]

GRAPH_FILES = {"train_step": "train_step.onnx", "eval": "eval.onnx", "infer": "infer.onnx"}
_WEIGHTS_FILE = "weights.bin"
_ADAPTER_FILE = "adapter.safetensors"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32",
                torch.bool: "bool", torch.uint8: "uint8", torch.int8: "int8"}


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ExportError(f"tensors of dtype {dtype} are not supported in a bundle; use float32 or int64")
    return _DTYPE_NAMES[dtype]


def _split_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update({n: b.detach() for n, b in model.named_buffers()})
    if not trainable:
        raise ExportError(
            "the model has no trainable tensors; apply a PEFT method first, e.g. "
            "edgepeft.apply(model, edgepeft.LoRAConfig(target_modules=[...]))"
        )
    for name, t in trainable.items():
        if t.dtype != torch.float32:
            raise ExportError(f"trainable tensor {name!r} is {t.dtype}; trainable tensors must be float32")
    return trainable, frozen


def _symbolic_dims(model: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Which axes of each input are dynamic: from `model.input_specs` if the model declares them, else batch only."""
    declared = {spec["name"]: spec["shape"] for spec in getattr(model, "input_specs", [])}
    dims: dict[str, dict[int, str]] = {}
    for name, tensor in example_inputs.items():
        shape = declared.get(name)
        if shape is None:
            dims[name] = {0: "batch"} if tensor.dim() > 0 else {}
            continue
        if len(shape) != tensor.dim():
            raise ExportError(f"input {name!r}: the model declares {len(shape)} axes, the example has {tensor.dim()}")
        dims[name] = {axis: sym for axis, sym in enumerate(shape) if isinstance(sym, str)}
    return dims


def _size_to_symbol(example_inputs: Mapping[str, torch.Tensor], dims: dict[str, dict[int, str]]) -> dict[int, str]:
    """Map each dynamic example size back to its symbol; sizes must differ so outputs can be named unambiguously."""
    by_size: dict[int, str] = {}
    for name, axes in dims.items():
        for axis, sym in axes.items():
            size = int(example_inputs[name].shape[axis])
            if size < 2:
                raise ExportError(f"example input {name!r} axis {axis} ({sym}) has size {size}; use >= 2 so it stays dynamic")
            if by_size.setdefault(size, sym) != sym:
                raise ExportError(
                    f"dynamic dims {by_size[size]!r} and {sym!r} have the same example size {size}; "
                    "give each dynamic dim a distinct example size (e.g. batch 3, seq 7)"
                )
    return by_size


def _spec(name: str, tensor: torch.Tensor, axes: Mapping[int, str]) -> dict[str, Any]:
    shape = [axes.get(i, int(s)) for i, s in enumerate(tensor.shape)]
    return {"name": name, "dtype": _dtype_name(tensor.dtype), "shape": shape}


def _model_entry(model: torch.nn.Module, model_id: str | None, model_source: str | None) -> dict[str, Any]:
    """Where the model came from: explicit arguments win over what a built-in model says about itself."""
    entry = dict(getattr(model, "edgepeft_model", None) or {"id": type(model).__name__, "source": "module"})
    if model_id:
        entry["id"] = model_id
    if model_source:
        entry["source"] = model_source
    return entry


def _example_labels(loss: LossSpec, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if loss.name == "cross_entropy":
        return torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=generator, dtype=torch.int64)
    if loss.label_dtype.is_floating_point:
        return torch.randn(logits.shape, generator=generator).to(loss.label_dtype)
    return torch.zeros(logits.shape, dtype=loss.label_dtype)


def export(
    model: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    out: str | Path,
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
    optimizer: OptimizerSpec | None = None,
    ignore_index: int = -100,
    dim_bounds: Mapping[str, int] | None = None,
    model_id: str | None = None,
    model_source: str | None = None,
    label_name: str = "labels",
) -> Bundle:
    """Export `model` (PEFT already applied) to an ONNX bundle directory at `out`, written atomically.

    `example_inputs` name the model's forward keyword arguments; dynamic axes come from `model.input_specs` when the
    model declares them (strings are symbolic dims), otherwise axis 0 of every input is the batch.
    """
    optimizer = optimizer or AdamW()
    loss_spec = resolve_loss(loss, ignore_index=ignore_index)
    model = model.eval()  # BatchNorm uses running stats and dropout is off: the exported step is deterministic
    trainable, frozen = _split_tensors(model)
    example_inputs = {k: v.detach() for k, v in example_inputs.items()}
    dims = _symbolic_dims(model, example_inputs)
    size_symbol = _size_to_symbol(example_inputs, dims)
    bounds = {"seq": int(model.max_len)} if isinstance(getattr(model, "max_len", None), int) else {}
    bounds.update(dim_bounds or {})

    with torch.no_grad():
        logits = model_logits(model(**example_inputs))
    output_axes = {i: size_symbol[int(s)] for i, s in enumerate(logits.shape) if int(s) in size_symbol}
    generator = torch.Generator().manual_seed(0)
    labels = _example_labels(loss_spec, logits, generator)
    label_axes = output_axes if loss_spec.labels_like_output else {i: s for i, s in output_axes.items() if i < labels.dim()}

    layout = GraphLayout(
        inputs=tuple(example_inputs),
        label=label_name,
        trainable=tuple(trainable),
        frozen=tuple(frozen),
        state_kinds=optimizer.state_kinds,
    )
    input_dims = [dims[n] for n in layout.inputs]
    frozen_args = list(frozen.values())
    state_args = [torch.zeros_like(trainable[p]) for _ in layout.state_kinds for p in layout.trainable]
    step_lr = [torch.tensor(1.0), torch.tensor(float(optimizer.lr))]
    no_dims = lambda n: [None] * n  # noqa: E731

    graphs = {
        "train_step": (
            make_train_step(model, layout, loss_spec, optimizer),
            [*example_inputs.values(), labels, *trainable.values(), *state_args, *step_lr, *frozen_args],
            layout.train_step_input_names(),
            layout.train_step_output_names(),
            [*input_dims, label_axes, *no_dims(len(trainable) + len(state_args) + 2 + len(frozen))],
        ),
        "eval": (
            make_eval(model, layout, loss_spec),
            [*example_inputs.values(), labels, *trainable.values(), *frozen_args],
            layout.eval_input_names(),
            ["loss", "logits", "count"],
            [*input_dims, label_axes, *no_dims(len(trainable) + len(frozen))],
        ),
        "infer": (
            make_infer(model, layout),
            [*example_inputs.values(), *trainable.values(), *frozen_args],
            layout.infer_input_names(),
            ["logits"],
            [*input_dims, *no_dims(len(trainable) + len(frozen))],
        ),
    }

    with tempfile.TemporaryDirectory(prefix="edgepeft-export-") as staging_dir:
        staging = Path(staging_dir)
        weights = write_weights_file({n: t.numpy() for n, t in frozen.items()}, staging / _WEIGHTS_FILE)
        files: dict[str, Path] = {_WEIGHTS_FILE: staging / _WEIGHTS_FILE}
        for graph_name, (fn, args, in_names, out_names, dyn) in graphs.items():
            proto = trace_to_onnx(fn, args, in_names, out_names, dyn, bounds)
            bind_frozen_to_weights(proto, weights)
            path = staging / GRAPH_FILES[graph_name]
            onnx.save_model(proto, str(path))
            files[GRAPH_FILES[graph_name]] = path
        save_file({n: np.ascontiguousarray(t.numpy()) for n, t in trainable.items()}, str(staging / _ADAPTER_FILE))
        files[_ADAPTER_FILE] = staging / _ADAPTER_FILE

        manifest = {
            "format": "edgepeft-bundle",
            "format_version": 1,
            "created_by": "edgepeft 0.1.0",
            "model": _model_entry(model, model_id, model_source),
            "methods": list(getattr(model, "edgepeft_methods", [])),
            "quantization": None,
            "backend": "onnx",
            "target": None,
            "inputs": [_spec(n, t, dims[n]) for n, t in example_inputs.items()],
            "labels": _spec(label_name, labels, label_axes),
            "loss": loss_spec.manifest_entry(int(logits.shape[-1]) if loss_spec.name == "cross_entropy" else None),
            "output": _spec("logits", logits, output_axes),
            "trainable": [_spec(n, t, {}) for n, t in trainable.items()],
            "optimizer": {
                **optimizer.to_manifest(),
                "state": [_spec(s, trainable[s.split("/", 1)[1]], {}) for s in layout.state_names()],
            },
            "graphs": dict(GRAPH_FILES),
        }
        return write_bundle(Path(out), manifest, files)
