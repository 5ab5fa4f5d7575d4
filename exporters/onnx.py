"""Export a PEFT-injected torch model to an ONNX bundle: train-step, eval and infer graphs plus frozen weights.

The trainable tensors are whatever has `requires_grad=True` on the model (what `edgepeft.apply` left trainable);
everything else — frozen parameters and buffers — is written once to `weights.bin` and shared by the three graphs.
The bundle runs on the stock `onnxruntime` package through `device_runtime.Trainer`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import torch
from safetensors.numpy import save_file

from device_runtime.bundle import TOKENIZER_FILE, Bundle, write_bundle
from device_runtime.optim_spec import AdamW, OptimizerSpec

from .errors import ExportError
from .losses import LossSpec, resolve_loss
from .onnx_graph import FROZEN_PREFIX, WeightsFile, bind_frozen_to_weights, tidy, trace_to_onnx, write_weights_file
from .recompute import recompute_segments
from .rematerialize import rematerialize_cheap
from .row_tables import find_row_tables
from .step_functions import GraphLayout, make_eval, make_infer, make_train_step, model_logits

__all__ = ["export", "plan_export", "ExportPlan", "GRAPH_FILES"]

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


def _output_axes(model: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor], dims: dict[str, dict[int, str]],
                 size_symbol: Mapping[int, str], logits: torch.Tensor) -> dict[int, str]:
    """Which output axes are which dynamic dim: an axis is `sym` when it has sym's example size and grows with it.

    Sizes alone are ambiguous whenever the output has a fixed axis of a dynamic dim's example size (3 classes next
    to an example batch of 3), so each dim is grown by one in the inputs (repeating its last slice) and the forward
    rerun; only the axes that follow it are named.
    """
    axes: dict[int, str] = {}
    for size, symbol in size_symbol.items():
        grown = {name: _grow(t, [a for a, s in dims.get(name, {}).items() if s == symbol])
                 for name, t in example_inputs.items()}
        with torch.no_grad():
            grown_shape = model_logits(model(**grown)).shape
        for i, (before, after) in enumerate(zip(logits.shape, grown_shape)):
            if int(before) == size and int(after) == size + 1:
                axes[i] = symbol
    return axes


def _grow(tensor: torch.Tensor, axes: list[int]) -> torch.Tensor:
    for axis in axes:
        tensor = torch.cat([tensor, tensor.narrow(axis, tensor.shape[axis] - 1, 1)], dim=axis)
    return tensor


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


@dataclass
class ExportPlan:
    """Everything needed to trace the three graphs and describe them in a manifest, decided once."""

    model: torch.nn.Module
    layout: GraphLayout
    loss: LossSpec
    optimizer: OptimizerSpec
    example_inputs: dict[str, torch.Tensor]
    input_dims: dict[str, dict[int, str]]
    labels: torch.Tensor
    label_axes: dict[int, str]
    logits: torch.Tensor
    output_axes: dict[int, str]
    trainable: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor]
    dim_bounds: dict[str, int]

    def graph_call(self, graph: str) -> tuple[Callable, list[torch.Tensor], list[str], list[str], list]:
        """(function, example args, input names, output names, dynamic dims per input) of one graph."""
        layout, inputs = self.layout, list(self.example_inputs.values())
        input_dims = [self.input_dims[n] for n in layout.inputs]
        trainable, frozen = list(self.trainable.values()), list(self.frozen.values())
        fixed = lambda n: [None] * n  # noqa: E731 - tensors whose shapes never change
        if graph == "train_step":
            state = [torch.zeros_like(self.trainable[p]) for _ in layout.state_kinds for p in layout.trainable]
            step_lr = [torch.tensor(1.0), torch.tensor(float(self.optimizer.lr))]
            return (make_train_step(self.model, layout, self.loss, self.optimizer),
                    [*inputs, self.labels, *trainable, *state, *step_lr, *frozen],
                    layout.train_step_input_names(), layout.train_step_output_names(),
                    [*input_dims, self.label_axes, *fixed(len(trainable) + len(state) + 2 + len(frozen))])
        if graph == "eval":
            return (make_eval(self.model, layout, self.loss), [*inputs, self.labels, *trainable, *frozen],
                    layout.eval_input_names(), ["loss", "logits", "count"],
                    [*input_dims, self.label_axes, *fixed(len(trainable) + len(frozen))])
        if graph == "infer":
            return (make_infer(self.model, layout), [*inputs, *trainable, *frozen], layout.infer_input_names(),
                    ["logits"], [*input_dims, *fixed(len(trainable) + len(frozen))])
        raise ExportError(f"unknown graph {graph!r}; graphs are {sorted(GRAPH_FILES)}")

    def weighing_dims(self) -> dict[str, int]:
        """Each symbolic dim's size for weighing tensors: its declared bound (the largest the bundle admits,
        where memory matters most) or else the example's size."""
        sizes = {symbol: size for size, symbol in _size_to_symbol(self.example_inputs, self.input_dims).items()}
        sizes.update({symbol: bound for symbol, bound in self.dim_bounds.items() if symbol in sizes})
        return sizes

    def trace(self, graph: str) -> onnx.ModelProto:
        """The graph as ONNX, frozen tensors still as `frozen::<name>` inputs."""
        fn, args, in_names, out_names, dyn = self.graph_call(graph)
        return trace_to_onnx(fn, args, in_names, out_names, dyn, self.dim_bounds, train_step=graph == "train_step")


def plan_export(
    model: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
    optimizer: OptimizerSpec | None = None,
    ignore_index: int = -100,
    dim_bounds: Mapping[str, int] | None = None,
    label_name: str = "labels",
) -> ExportPlan:
    """Check the model and examples and decide names, dynamic dims and label spec (see `export`)."""
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
    output_axes = _output_axes(model, example_inputs, dims, size_symbol, logits)
    labels = _example_labels(loss_spec, logits, torch.Generator().manual_seed(0))
    label_axes = output_axes if loss_spec.labels_like_output else {i: s for i, s in output_axes.items() if i < labels.dim()}
    layout = GraphLayout(inputs=tuple(example_inputs), label=label_name, trainable=tuple(trainable),
                         frozen=tuple(frozen), state_kinds=optimizer.state_kinds)
    return ExportPlan(model, layout, loss_spec, optimizer, example_inputs, dims, labels, label_axes, logits,
                      output_axes, trainable, frozen, bounds)


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
    tokenizer: str | Path | None = None,
    recompute: bool = False,
    recompute_keep_last: int = 2,
    rematerialize: bool = True,
    rematerialize_matmuls: bool = False,
) -> Bundle:
    """Export `model` (PEFT already applied) to an ONNX bundle directory at `out`, written atomically.

    `example_inputs` name the model's forward keyword arguments; dynamic axes come from `model.input_specs` when the
    model declares them (strings are symbolic dims), otherwise axis 0 of every input is the batch. Give each dynamic
    dim a distinct example size >= 2 (e.g. batch 3, seq 7): sizes are how output and label axes get their names.
    `tokenizer`: a Hugging Face tokenizer.json to ship in the bundle (default: `model.edgepeft_tokenizer`, which
    `load_hf_model` sets when the model directory has one).
    `recompute`: rewrite the train step to recompute the forward between LayerNorm checkpoints during the backward
    (`exporters.recompute`): far fewer activations alive at the peak for about one extra forward per step.
    `recompute_keep_last`: how many of the last segments (the forward between two LayerNorms; a transformer layer
    has two) keep their activations instead. The default 2 gives the lowest peak measured on MiniLM; larger values
    trade memory for time (benchmarks/minilm_step.py, int8-dynamic, lean: 8 kept peaked at 138 MB in
    310-330 ms, 2 kept at 136 MB in 371-398 ms).
    `rematerialize`: rebuild in the backward the saved activations that cheap ops recompute from tensors the
    backward keeps anyway (attention probabilities from Q and K, LayerNorm outputs from their inputs;
    `exporters.rematerialize`). Values are bit-identical; on by default, False to compare.
    `rematerialize_matmuls`: also re-run, in the backward, the weight matmuls that expand their input (a
    transformer's FFN up-projection), instead of keeping their outputs, the largest tensor a layer saves. A
    partial recompute: one matmul per layer for 4x the hidden size per token released (MiniLM int8-dynamic, batch
    8 x 64, lean: peak 150-152 -> 134-135 MB, step time +7-9%, 1.13-1.15x PyTorch + PEFT's speed in three of
    four benchmark runs). Off by default; needs `rematerialize`.
    """
    if isinstance(recompute_keep_last, bool) or not isinstance(recompute_keep_last, int) or recompute_keep_last < 0:
        raise ExportError(f"recompute_keep_last must be an int >= 0, got {recompute_keep_last!r}; 2 is the default")
    if recompute_keep_last != 2 and not recompute:
        raise ExportError("recompute_keep_last only applies with recompute=True; pass recompute=True or drop it")
    if rematerialize_matmuls and not rematerialize:
        raise ExportError("rematerialize_matmuls extends rematerialize; pass rematerialize=True or drop it")
    plan = plan_export(model, example_inputs, loss=loss, optimizer=optimizer, ignore_index=ignore_index,
                       dim_bounds=dim_bounds, label_name=label_name)
    with tempfile.TemporaryDirectory(prefix="edgepeft-export-") as staging_dir:
        staging = Path(staging_dir)
        weights = write_weights_file({n: t.numpy() for n, t in plan.frozen.items()}, staging / _WEIGHTS_FILE)
        files: dict[str, Path] = {_WEIGHTS_FILE: staging / _WEIGHTS_FILE}
        recomputed = rematerialized = None
        protos: dict[str, onnx.ModelProto] = {}
        for graph_name, file_name in GRAPH_FILES.items():
            proto = plan.trace(graph_name)
            if recompute and graph_name == "train_step":
                recomputed = recompute_segments(proto, keep_last=recompute_keep_last)
                if recomputed.segments == 0:
                    raise ExportError(f"recompute_keep_last={recompute_keep_last} leaves no segment to recompute "
                                      f"(the train step has {recomputed.checkpoints} LayerNorm checkpoints); pass "
                                      "a smaller value, or export without recompute")
            if rematerialize and graph_name == "train_step":
                rematerialized = rematerialize_cheap(proto, plan.weighing_dims(),
                                                     expanding_matmuls=rematerialize_matmuls)
            proto = tidy(proto)
            bind_frozen_to_weights(proto, weights)
            protos[graph_name] = proto
        for graph_name, file_name in GRAPH_FILES.items():
            onnx.save_model(protos[graph_name], str(staging / file_name))
            files[file_name] = staging / file_name
        save_file({n: np.ascontiguousarray(t.numpy()) for n, t in plan.trainable.items()}, str(staging / _ADAPTER_FILE))
        files[_ADAPTER_FILE] = staging / _ADAPTER_FILE
        manifest = _manifest(plan, weights, model_id, model_source)
        integer_inputs = {n for n, t in plan.example_inputs.items() if t.dtype in (torch.int64, torch.int32)}
        row_tables = find_row_tables(protos, {n: e.length for n, e in weights.entries.items()}, FROZEN_PREFIX,
                                     integer_inputs)
        if row_tables:
            manifest["weights"]["row_tables"] = row_tables
        if recomputed is not None:
            manifest["recompute"] = recomputed.manifest_entry()
        if rematerialized is not None:
            manifest["rematerialize"] = rematerialized.manifest_entry()
        add_tokenizer(manifest, files, plan.model, tokenizer)
        return write_bundle(Path(out), manifest, files)


def add_tokenizer(manifest: dict[str, Any], files: dict[str, Any], model: torch.nn.Module,
                  tokenizer: str | Path | None) -> None:
    """Ship the text tokenizer in the bundle (manifest `tokenizer` entry + tokenizer.json), if there is one."""
    source = tokenizer if tokenizer is not None else getattr(model, "edgepeft_tokenizer", None)
    if source is None:
        return
    path = Path(source)
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"tokenizer {path} is not a readable tokenizer.json ({exc}); pass the Hugging Face "
                          "tokenizer.json of this model, or tokenizer=None") from exc
    max_len = getattr(model, "max_len", None)
    manifest["tokenizer"] = {"file": TOKENIZER_FILE, **({"max_len": max_len} if isinstance(max_len, int) else {})}
    files[TOKENIZER_FILE] = path


def _manifest(plan: ExportPlan, weights: WeightsFile, model_id: str | None, model_source: str | None) -> dict[str, Any]:
    loss = plan.loss
    return {
        "format": "edgepeft-bundle",
        "format_version": 1,
        "created_by": "edgepeft 0.1.0",
        "model": _model_entry(plan.model, model_id, model_source),
        "methods": list(getattr(plan.model, "edgepeft_methods", [])),
        "quantization": getattr(plan.model, "edgepeft_quantization", None),
        "backend": "onnx",
        "target": None,
        "inputs": [_spec(n, t, plan.input_dims[n]) for n, t in plan.example_inputs.items()],
        "labels": _spec(plan.layout.label, plan.labels, plan.label_axes),
        "loss": loss.manifest_entry(int(plan.logits.shape[-1]) if loss.name == "cross_entropy" else None),
        "output": _spec("logits", plan.logits, plan.output_axes),
        "trainable": [_spec(n, t, {}) for n, t in plan.trainable.items()],
        "optimizer": {
            **plan.optimizer.to_manifest(),
            "state": [_spec(s, plan.trainable[s.split("/", 1)[1]], {}) for s in plan.layout.state_names()],
        },
        "graphs": dict(GRAPH_FILES),
        # Where each frozen tensor sits in weights.bin, so a runtime can map the file once and share it.
        "weights": {
            "file": weights.location,
            "tensors": {name: {"dtype": _dtype_name(plan.frozen[name].dtype), "shape": list(plan.frozen[name].shape),
                               "offset": e.offset, "length": e.length} for name, e in weights.entries.items()},
        },
    }
