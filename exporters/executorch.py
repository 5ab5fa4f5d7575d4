"""Export a PEFT-injected torch model to an ExecuTorch bundle: train.pte (training program) + infer.pte (merged).

The same `plan_export` as the ONNX exporter decides names, dynamic dims, loss and optimizer, and the manifest is the
ONNX one with `backend: "executorch"`, so both backends share one bundle format. What differs:

- train.pte is one ExecuTorch program with four methods (see `executorch_programs`): the joint forward-backward
  `train`, `evaluate`, `predict` and `optimizer_step`. Frozen tensors are constants inside it (stored once for all
  methods); the trainable tensors are its parameters, which the runtime updates in place.
- infer.pte is the forward with adapters merged into the weights, delegated to XNNPACK: the fast path for serving
  the adapter the bundle was exported with.
- ExecuTorch plans memory for the largest shape, so every dynamic dim needs an upper bound: `max_batch` for the
  batch, the model's `max_len` for `seq`, `dim_bounds` for anything else. They are written to the manifest and the
  runtime refuses bigger batches with a message instead of an ExecuTorch error code.

Needs `pip install executorch==1.5.1` (the `executorch` extra) next to torch 2.13.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from safetensors.numpy import save_file

from device_runtime.bundle import ADAPTER_FILE, Bundle, write_bundle
from device_runtime.executorch_backend import EVALUATE, GRAPH_FILES, METHODS, PREDICT, TRAIN
from device_runtime.optim_spec import OptimizerSpec

from .errors import ExportError
from .executorch_programs import DimBounds, merged_inference_program, training_programs
from .onnx import ExportPlan, add_tokenizer, plan_export
from .onnx import _manifest as onnx_manifest
from .onnx_graph import WeightsFile

__all__ = ["export", "lower_training", "lower_inference", "DEFAULT_MAX_BATCH"]

DEFAULT_MAX_BATCH = 32


def _executorch():
    """The ExecuTorch export toolchain, imported on first use so `import exporters` stays light."""
    torchao_log = logging.getLogger("torchao")  # it warns about CUDA-only kernels it cannot load on a CPU build
    level = torchao_log.level
    torchao_log.setLevel(logging.ERROR)
    try:
        from executorch import exir
    except ImportError as exc:
        raise ExportError(f"the ExecuTorch exporter needs the executorch package ({exc}); "
                          "pip install 'edgepeft[executorch]' (executorch==1.5.1)") from exc
    finally:
        torchao_log.setLevel(level)
    return exir


def lower_training(programs: Mapping[str, torch.export.ExportedProgram], delegate: bool = False,
                   dynamic_dims: int = 1) -> tuple[bytes, dict[str, int]]:
    """The methods of train.pte as one ExecuTorch program; returns its bytes and each method's planned memory.

    Planned memory (bytes) is what a method allocates at load for activations, gradients and parameters at the
    upper-bound shapes. Without `delegate` every op runs on ExecuTorch's CPU kernels (the pip runtime's optimized
    library, portable kernels where it has none); with it, train / evaluate / predict are partitioned for XNNPACK
    too, keeping the trainable parameters out of the delegates (see `_xnnpack_partitioner`). The IR validity check
    is off because the joint graph holds backward ops outside the edge dialect's core-ATen list (e.g.
    `convolution_backward`), which ExecuTorch's kernel library implements all the same.
    """
    exir = _executorch()
    config = exir.EdgeCompileConfig(_check_ir_validity=False)
    trainable = frozenset(programs[TRAIN].graph_signature.inputs_to_parameters.values())
    try:
        if delegate:
            partitioners = {name: [_xnnpack_partitioner(dynamic_dims, trainable)] for name in (TRAIN, EVALUATE, PREDICT)}
            edge = exir.to_edge_transform_and_lower(dict(programs), partitioner=partitioners, compile_config=config)
            kept = set(edge.exported_program(TRAIN).graph_signature.inputs_to_parameters.values())
            if kept != trainable:  # a delegate took a parameter in: it would not follow training
                raise ExportError(f"XNNPACK took trainable tensors {sorted(trainable - kept)} into a delegate")
        else:
            edge = exir.to_edge(dict(programs), compile_config=config)
        manager = edge.to_executorch()
    except Exception as exc:  # ExecuTorch lowering raises assorted types; all mean "this graph does not lower"
        fix = "; export with delegate_train=False" if delegate else ""
        raise ExportError(f"ExecuTorch could not lower the training program: {type(exc).__name__}: {exc}{fix}") from exc
    planned = {plan.name: int(sum(plan.non_const_buffer_sizes)) for plan in manager.executorch_program.execution_plan
               if plan.name in programs}
    return manager.buffer, planned


def _xnnpack_partitioner(dynamic_dims: int, live_parameters: frozenset[str] = frozenset()) -> Any:
    """XNNPACK's partitioner, with two adjustments for these programs.

    - With 2+ dynamic dims, no unsqueeze config: executorch 1.5.1's UnsqueezeCopyConfig accepts an unsqueeze whose
      output has two dynamic dims (batch, seq), then XNNPACK's reshape refuses it at preprocess ("XNNPACK reshape
      only supports 1 dynamic dimension") and the whole lowering fails; ViewCopyConfig checks this, the unsqueeze
      config does not. Unsqueezes are views on the CPU kernels anyway.
    - No partition may own one of `live_parameters` (the training method's trainable tensors): XNNPACK serializes
      a parameter its op needs as a static weight (conv weight / bias, linear weight) into its blob, so the
      delegate would keep computing with the initial value while training updates the program's copy. GEMMs that
      take a parameter as a plain runtime input (mm on a permuted LoRA matrix) read it live and stay delegated.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS, UnsqueezeCopyConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class LiveParameterPartitioner(XnnpackPartitioner):
        def get_matched_nodes_from_configs(self, program: torch.export.ExportedProgram) -> list:
            live = {name for name, fqn in program.graph_signature.inputs_to_parameters.items()
                    if fqn in live_parameters}

            # A group that would own a trainable parameter is left out whole (dropping single nodes from a
            # group breaks XNNPACK's linear matching and the partitions' convexity).
            groups = super().get_matched_nodes_from_configs(program)
            return [group for group in groups if not any(n.op == "placeholder" and n.name in live for n in group)]

    configs = ALL_PARTITIONER_CONFIGS if dynamic_dims < 2 else [c for c in ALL_PARTITIONER_CONFIGS
                                                                  if c is not UnsqueezeCopyConfig]
    return LiveParameterPartitioner(configs=list(configs))


def _op_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def lower_inference(program: torch.export.ExportedProgram, delegate: bool = True,
                    dynamic_dims: int = 1) -> tuple[bytes, dict[str, Any]]:
    """infer.pte: the merged forward, lowered to XNNPACK where it can be; returns (bytes, delegation summary)."""
    exir = _executorch()
    try:
        partitioners = [_xnnpack_partitioner(dynamic_dims)] if delegate else None
        edge = exir.to_edge_transform_and_lower(program, partitioner=partitioners)
        calls = [n for n in edge.exported_program().graph.nodes if n.op == "call_function"]
        delegated = sum(1 for n in calls if "call_delegate" in _op_name(n))
        outside = sorted({_op_name(n) for n in calls if "call_delegate" not in _op_name(n)
                          and _op_name(n) != "getitem"})
        buffer = edge.to_executorch().buffer
    except Exception as exc:  # see lower_training
        raise ExportError(f"ExecuTorch could not lower the inference program: {type(exc).__name__}: {exc}") from exc
    return buffer, {"delegate": "XnnpackBackend" if delegate else None, "delegated_subgraphs": delegated,
                    "ops_outside_delegate": outside}


def _bounds(plan: ExportPlan, max_batch: int) -> DimBounds:
    if not (isinstance(max_batch, int) and max_batch >= 1):
        raise ExportError(f"max_batch must be an int >= 1, got {max_batch!r}; 32 is the default")
    bounds = {"batch": max_batch, **plan.dim_bounds}
    for name, axes in plan.input_dims.items():
        for axis, symbol in axes.items():
            size = int(plan.example_inputs[name].shape[axis])
            if symbol in bounds and size > bounds[symbol]:
                raise ExportError(f"example input {name!r} axis {axis} ({symbol}) has size {size}, above its bound "
                                  f"{bounds[symbol]}; use a smaller example or raise the bound")
    return bounds


def export(
    model: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    out: str | Path,
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
    optimizer: OptimizerSpec | None = None,
    ignore_index: int = -100,
    max_batch: int = DEFAULT_MAX_BATCH,
    dim_bounds: Mapping[str, int] | None = None,
    delegate_infer: bool = True,
    delegate_train: bool | None = None,
    model_id: str | None = None,
    model_source: str | None = None,
    label_name: str = "labels",
    tokenizer: str | Path | None = None,
) -> Bundle:
    """Export `model` (PEFT already applied) to an ExecuTorch bundle at `out`, written atomically.

    Arguments as `exporters.onnx.export`, plus `max_batch` (the largest batch the programs accept),
    `delegate_infer` (lower infer.pte to XNNPACK; False keeps it on ExecuTorch's CPU kernels) and `delegate_train`
    (partition train.pte's train / evaluate / predict methods for XNNPACK too: ~2.5x faster steps on the built-in
    transformer, see `benchmarks/executorch_step.py`; None tries it and falls back to the CPU kernels when XNNPACK
    cannot lower the model, True requires it, False skips it). The manifest records what was done.
    """
    if (getattr(model, "edgepeft_quantization", None) or {}).get("scheme") == "int8-dynamic":
        raise ExportError("an int8-dynamic base computes with onnxruntime's DynamicQuantizeMatMul, which ExecuTorch "
                          "has no kernel for here; quantize with 'int8' for ExecuTorch, or export with backend onnx")
    with warnings.catch_warnings():
        # torch 2.13 warns on every deepcopy of an exported program (the lowering makes dozens) about a
        # pytree API it uses itself; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        plan = plan_export(model, example_inputs, loss=loss, optimizer=optimizer, ignore_index=ignore_index,
                           dim_bounds=dim_bounds, label_name=label_name)
        bounds = _bounds(plan, max_batch)
        n_dynamic = len({sym for axes in plan.input_dims.values() for sym in axes.values()})
        programs = training_programs(plan, bounds)
        train_pte, planned, train_delegate = _lower_training_as_asked(programs, delegate_train, n_dynamic)
        infer_pte, infer_summary = lower_inference(merged_inference_program(plan, bounds), delegate_infer, n_dynamic)
        with tempfile.TemporaryDirectory(prefix="edgepeft-export-") as staging_dir:
            adapter = Path(staging_dir) / ADAPTER_FILE
            save_file({n: np.ascontiguousarray(t.numpy()) for n, t in plan.trainable.items()}, str(adapter))
            files = {GRAPH_FILES["train"]: train_pte, GRAPH_FILES["infer"]: infer_pte, ADAPTER_FILE: adapter}
            manifest = _manifest(plan, bounds, planned, train_delegate, infer_summary, model_id, model_source)
            add_tokenizer(manifest, files, plan.model, tokenizer)
            return write_bundle(Path(out), manifest, files)


def _lower_training_as_asked(programs: Mapping[str, torch.export.ExportedProgram], delegate_train: bool | None,
                             dynamic_dims: int) -> tuple[bytes, dict[str, int], dict[str, Any]]:
    """`lower_training` with XNNPACK when asked (True) or possible (None), plus the manifest's record of it."""
    if delegate_train is not False:
        try:
            return (*lower_training(programs, True, dynamic_dims), {"delegate": "XnnpackBackend"})
        except ExportError as exc:
            if delegate_train:
                raise
            return (*lower_training(programs, False, dynamic_dims), {"delegate": None, "xnnpack_failed": str(exc)})
    return (*lower_training(programs, False, dynamic_dims), {"delegate": None})


def _manifest(plan: ExportPlan, bounds: DimBounds, planned: dict[str, int], train_delegate: dict[str, Any],
              infer_summary: dict[str, Any], model_id: str | None, model_source: str | None) -> dict[str, Any]:
    """The ONNX exporter's manifest (one definition of the format) with the ExecuTorch parts swapped in."""
    manifest = onnx_manifest(plan, WeightsFile(location="", entries={}), model_id, model_source)
    del manifest["weights"]  # frozen tensors are constants inside the .pte programs, not a shared weights file
    used = {sym for axes in plan.input_dims.values() for sym in axes.values()}
    manifest.update(
        backend="executorch",
        graphs=dict(GRAPH_FILES),
        executorch={
            "version": metadata.version("executorch"),
            "methods": list(METHODS),
            "dim_bounds": {sym: int(b) for sym, b in bounds.items() if sym in used},
            # Bytes each method allocates at load for its memory plan (sized for the dim bounds).
            "planned_memory_bytes": planned,
            "train": train_delegate,
            # infer.pte carries the adapter as exported, merged into the weights: it does not follow training.
            "infer": {"adapters": "merged at export", **infer_summary},
        },
    )
    return manifest
