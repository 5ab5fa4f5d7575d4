"""The torch programs behind an ExecuTorch bundle, captured with torch.export (no lowering here; see `executorch.py`).

train.pte holds four methods over one set of frozen constants (ExecuTorch stores identical constants once):

- `train`: the joint forward + backward from `torch.export.experimental._export_forward_backward`. Its only
  user output is the loss; the trainable tensors are the program's own parameters (`model.<name>`) and are the
  only ones that get gradients, because every frozen tensor has `requires_grad=False` when the forward is
  captured (autograd then never builds a backward towards it). `check_gradient_outputs` proves it on the program.
- `evaluate` / `predict`: the same forward with the trainable tensors as inputs, as the ONNX eval / infer graphs
  (`step_functions.make_eval` / `make_infer`), so the runtime evaluates whatever the adapter is now.
- `optimizer_step`: `optimizer_update.optimizer_step` (global norm, clipping, SGD / AdamW) over flat tensors: the
  same function the ONNX train step traces, so the optimizer maths still exists once.

infer.pte is the forward of a copy of the model whose LoRA-style layers were merged (`merge()`), lowered to XNNPACK.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch.export import Dim, ExportedProgram
from torch.export.experimental import _export_forward_backward

from device_runtime.executorch_backend import EVALUATE, OPTIMIZER_STEP, PARAMETER_PREFIX, PREDICT, TRAIN

from .errors import ExportError
from .onnx import ExportPlan
from .optimizer_update import optimizer_step
from .quantized_ops import dequantize_nbits
from .step_functions import GraphLayout, make_eval, make_infer, model_logits

__all__ = ["DimBounds", "training_programs", "check_gradient_outputs", "merged_inference_program", "merge_adapters"]

DimBounds = dict[str, int]


class _Program(torch.nn.Module):
    """Holds the model (so its tensors are the program's parameters / constants) and runs `fn` on flat inputs."""

    def __init__(self, model: torch.nn.Module, fn: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        super().__init__()
        self.model = model  # the attribute name is PARAMETER_PREFIX: gradients come back as "model.<name>"
        self.fn = fn

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.fn(*flat)


def _dims(plan: ExportPlan, bounds: DimBounds) -> tuple[list[dict[int, Dim]], dict[int, Dim]]:
    """torch.export dims for each model input and for the labels; one Dim object per symbol, 1..bound."""
    by_symbol: dict[str, Dim] = {}

    def dim(symbol: str) -> Dim:
        if symbol not in bounds:
            raise ExportError(f"dynamic dim {symbol!r} has no upper bound; ExecuTorch plans memory for the largest "
                              f"size, so pass dim_bounds={{{symbol!r}: N}}")
        if symbol not in by_symbol:
            by_symbol[symbol] = Dim(f"d_{symbol}", min=1, max=int(bounds[symbol]))
        return by_symbol[symbol]

    inputs = [{axis: dim(sym) for axis, sym in plan.input_dims[name].items()} for name in plan.example_inputs]
    return inputs, {axis: dim(sym) for axis, sym in plan.label_axes.items()}


def _matmul_nbits_in_aten(x, qweight, scales, bits, block_size, in_features, out_features):
    return x @ dequantize_nbits(qweight, scales, bits, in_features).T


def _addmm_as_mm_add(bias, mat1, mat2, beta=1, alpha=1):
    out = torch.mm(mat1, mat2)
    if alpha != 1:
        out = out * alpha
    return out + (bias if beta == 1 else bias * beta)


# Rewrites on top of the core-ATen decompositions, for ops the pip runtime has no (fast) kernel for:
# - aten.addmm (every Linear with a bias) becomes mm + add: the runtime has an optimized mm kernel but only the
#   portable, naive-loop addmm, which was half of the transformer's step time (benchmarks/executorch_step.py).
# - edgepeft::matmul_nbits (the quantized frozen Linear of `edgepeft.quantize_frozen`) has no ExecuTorch kernel: it
#   becomes dequantize + matmul. In the training method this happens after the joint capture, so the op's own
#   backward (which re-dequantizes from the int codes) is kept and no fp32 weight is saved for the backward.
# `torch.export.default_decompositions()` also turns scaled_dot_product_attention (Hugging Face models) into
# matmul + softmax; `_export_forward_backward`'s own table keeps it, and its backward has no ExecuTorch kernel.
_KERNEL_REWRITES = {torch.ops.aten.addmm.default: _addmm_as_mm_add}
_CUSTOM_OP_REWRITES = {torch.ops.edgepeft.matmul_nbits.default: _matmul_nbits_in_aten}


def _for_executorch_kernels(program: ExportedProgram, custom_ops: bool = True) -> ExportedProgram:
    table = torch.export.default_decompositions()
    table.update(_KERNEL_REWRITES)
    if custom_ops:
        table.update(_CUSTOM_OP_REWRITES)
    return program.run_decompositions(table)


def _export(module: torch.nn.Module, args: list[torch.Tensor], dynamic: list) -> ExportedProgram:
    try:
        return torch.export.export(module, tuple(args), dynamic_shapes={"flat": tuple(dynamic)}, strict=False)
    except Exception as exc:  # torch.export raises many unrelated types; all mean "this model does not capture"
        raise ExportError(f"torch.export could not capture the model for ExecuTorch: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from exc


def _train_forward(plan: ExportPlan) -> Callable[..., tuple[torch.Tensor]]:
    names, loss, model = list(plan.example_inputs), plan.loss, plan.model

    def train(*flat: torch.Tensor) -> tuple[torch.Tensor]:
        logits = model_logits(model(**dict(zip(names, flat[:-1]))))
        value, _ = loss.fn(logits, flat[-1])
        return (value,)  # the loss must be output 0: _export_forward_backward differentiates that one

    return train


def check_gradient_outputs(program: ExportedProgram, trainable: list[str]) -> None:
    """The joint program returns exactly one gradient per trainable tensor, and none for a frozen one."""
    targets = [spec.target for spec in program.graph_signature.output_specs
               if spec.kind == torch.export.graph_signature.OutputKind.GRADIENT_TO_PARAMETER]
    expected = [PARAMETER_PREFIX + name for name in trainable]
    frozen = sorted(set(targets) - set(expected))
    missing = sorted(set(expected) - set(targets))
    if frozen:
        raise ExportError(f"the training program computes gradients for frozen tensors {frozen}; mark them "
                          "requires_grad=False before exporting")
    if missing:
        raise ExportError(f"trainable tensors {missing} get no gradient (they do not influence the loss); freeze "
                          "them or target modules on the path from the inputs to the output")


def _refuse_gradient_free_trainables(plan: ExportPlan) -> None:
    """Name trainable tensors the loss does not reach (aot_autograd would only assert "a parameter did not
    receive a gradient"), from one eager backward on the example batch."""
    params = dict(plan.model.named_parameters())
    leaves = [params[name] for name in plan.trainable]
    with torch.enable_grad():
        (value,) = _train_forward(plan)(*plan.example_inputs.values(), plan.labels)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    missing = [name for name, g in zip(plan.trainable, grads) if g is None]
    if missing:
        raise ExportError(f"trainable tensors {missing} do not influence the loss; freeze them or target modules on "
                          "the path from the inputs to the output")


def training_programs(plan: ExportPlan, bounds: DimBounds) -> dict[str, ExportedProgram]:
    """The four methods of train.pte, keyed by method name (see the module docstring)."""
    model, trainable = plan.model, list(plan.trainable)
    inputs, labels = list(plan.example_inputs.values()), plan.labels
    input_dims, label_dims = _dims(plan, bounds)
    params = [plan.trainable[n] for n in trainable]
    fixed = [None] * len(params)
    # The forward-only methods take the trainable tensors as inputs and read every other tensor off the model.
    layout = GraphLayout(inputs=tuple(plan.example_inputs), label=plan.layout.label, trainable=tuple(trainable),
                         frozen=(), state_kinds=plan.layout.state_kinds)
    with torch.no_grad():
        evaluate = _export(_Program(model, make_eval(model, layout, plan.loss)), [*inputs, labels, *params],
                           [*input_dims, label_dims, *fixed])
        predict = _export(_Program(model, make_infer(model, layout)), [*inputs, *params], [*input_dims, *fixed])
    _refuse_gradient_free_trainables(plan)
    forward = _export(_Program(model, _train_forward(plan)), [*inputs, labels], [*input_dims, label_dims])
    joint = _export_forward_backward(_for_executorch_kernels(forward, custom_ops=False))
    check_gradient_outputs(joint, trainable)
    return {TRAIN: _for_executorch_kernels(joint), EVALUATE: _for_executorch_kernels(evaluate),
            PREDICT: _for_executorch_kernels(predict), OPTIMIZER_STEP: _optimizer_program(plan)}


def _optimizer_program(plan: ExportPlan) -> ExportedProgram:
    """(params, grads, state, step, lr) -> (grad_norm, new params, new state), state in the bundle's order."""
    spec, n = plan.optimizer, len(plan.trainable)
    n_state = len(spec.state_kinds) * n

    def update(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params, grads, state = flat[:n], flat[n : 2 * n], flat[2 * n : 2 * n + n_state]
        step, lr = flat[-2], flat[-1]
        norm, new_params, new_state = optimizer_step(spec, list(params), list(grads), list(state), step, lr)
        return (norm, *new_params, *new_state)

    params = [plan.trainable[name].clone() for name in plan.trainable]
    state = [torch.zeros_like(p) for _ in spec.state_kinds for p in params]
    args = [*params, *[torch.ones_like(p) for p in params], *state, torch.tensor(1.0), torch.tensor(float(spec.lr))]
    with torch.no_grad():
        return _export(_Program(torch.nn.Module(), update), args, [None] * len(args))


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose mergeable adapter layers (LoRA, DoRA, IA3: they have `merge()`) are merged.

    A layer over a quantized base (no float `weight` to add into) stays unmerged: it is still exact, only slower.
    """
    merged = copy.deepcopy(model).eval()
    for module in merged.modules():
        base = getattr(module, "base_layer", None)
        weight = getattr(base, "weight", None)
        if (callable(getattr(module, "merge", None)) and not getattr(module, "merged", True)
                and isinstance(weight, torch.Tensor) and weight.is_floating_point()):
            module.merge()
    return merged


def merged_inference_program(plan: ExportPlan, bounds: DimBounds) -> ExportedProgram:
    """forward(model inputs) -> logits of the merged model, every tensor a constant (for XNNPACK)."""
    merged, names = merge_adapters(plan.model), list(plan.example_inputs)
    for p in merged.parameters():
        p.requires_grad_(False)

    def infer(*flat: torch.Tensor) -> tuple[torch.Tensor]:
        return (model_logits(merged(**dict(zip(names, flat)))),)

    input_dims, _ = _dims(plan, bounds)
    with torch.no_grad():
        program = _export(_Program(merged, infer), list(plan.example_inputs.values()), input_dims)
    # XNNPACK takes linear / addmm whole, so only the custom op is rewritten here.
    used = {n.target for n in program.graph.nodes if n.op == "call_function"}
    nbits = torch.ops.edgepeft.matmul_nbits.default
    return program.run_decompositions(_CUSTOM_OP_REWRITES) if nbits in used else program
