"""The three functions a bundle's graphs compute — train step, eval, infer — over flat tensor arguments.

Every tensor the graph needs arrives as an argument (model inputs, labels, trainable tensors, optimizer state, step,
lr, frozen tensors), so tracing sees no hidden constants: the frozen tensors are turned into shared initializers
after export (see `onnx_graph.py`), and the backward is exactly `torch.autograd.grad` of the loss with respect to the
trainable tensors only. Autograd then computes no gradient for a frozen weight and stops below the lowest trainable
tensor: that is the pruning, done by the same engine that defines the reference numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from device_runtime.optim_spec import OptimizerSpec

from .errors import ExportError
from .losses import LossSpec
from .optimizer_update import optimizer_step

__all__ = ["GraphLayout", "model_logits", "make_train_step", "make_eval", "make_infer"]


@dataclass(frozen=True)
class GraphLayout:
    """Names of every flat argument, in order, shared by the three graph builders."""

    inputs: tuple[str, ...]
    label: str
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    state_kinds: tuple[str, ...]

    def state_names(self) -> list[str]:
        return [f"{kind}/{p}" for kind in self.state_kinds for p in self.trainable]

    def train_step_input_names(self) -> list[str]:
        return [
            *self.inputs,
            self.label,
            *(f"trainable::{n}" for n in self.trainable),
            *(f"state::{n}" for n in self.state_names()),
            "step",
            "lr",
            *(f"frozen::{n}" for n in self.frozen),
        ]

    def train_step_output_names(self) -> list[str]:
        return [
            "loss",
            "grad_norm",
            *(f"new_trainable::{n}" for n in self.trainable),
            *(f"new_state::{n}" for n in self.state_names()),
        ]

    def eval_input_names(self) -> list[str]:
        return [*self.inputs, self.label, *(f"trainable::{n}" for n in self.trainable), *(f"frozen::{n}" for n in self.frozen)]

    def infer_input_names(self) -> list[str]:
        return [*self.inputs, *(f"trainable::{n}" for n in self.trainable), *(f"frozen::{n}" for n in self.frozen)]


def model_logits(output: Any) -> torch.Tensor:
    """The prediction tensor of a model output: a tensor, a `.logits` attribute (HF), or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ExportError(
        f"the model returned {type(output).__name__}; return a tensor, a tuple whose first item is the logits, "
        "or an object with a .logits tensor"
    )


def _forward(model: torch.nn.Module, layout: GraphLayout, inputs, trainable, frozen) -> torch.Tensor:
    tensors = {**dict(zip(layout.frozen, frozen)), **dict(zip(layout.trainable, trainable))}
    kwargs = dict(zip(layout.inputs, inputs))
    return model_logits(torch.func.functional_call(model, tensors, args=(), kwargs=kwargs, tie_weights=True, strict=False))


def _split(flat: tuple, sizes: list[int]) -> list[tuple]:
    parts, at = [], 0
    for size in sizes:
        parts.append(tuple(flat[at : at + size]))
        at += size
    return parts


def make_train_step(
    model: torch.nn.Module, layout: GraphLayout, loss: LossSpec, optimizer: OptimizerSpec
) -> Callable[..., tuple[torch.Tensor, ...]]:
    n_state = len(layout.state_kinds) * len(layout.trainable)
    sizes = [len(layout.inputs), 1, len(layout.trainable), n_state, 1, 1, len(layout.frozen)]

    def train_step(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, (labels,), trainable, state, (step,), (lr,), frozen = _split(flat, sizes)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in trainable]
            logits = _forward(model, layout, inputs, leaves, frozen)
            value, _ = loss.fn(logits, labels)
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        missing = [n for n, g in zip(layout.trainable, grads) if g is None]
        if missing:
            raise ExportError(
                f"trainable tensors {missing} do not influence the loss; freeze them or target modules on the "
                "path from the inputs to the output"
            )
        norm, new_params, flat_state = optimizer_step(optimizer, list(trainable), list(grads), list(state), step, lr)
        return (value.detach(), norm.detach(), *[p.detach() for p in new_params], *[s.detach() for s in flat_state])

    return train_step


def make_eval(model: torch.nn.Module, layout: GraphLayout, loss: LossSpec) -> Callable[..., tuple[torch.Tensor, ...]]:
    sizes = [len(layout.inputs), 1, len(layout.trainable), len(layout.frozen)]

    def evaluate(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, (labels,), trainable, frozen = _split(flat, sizes)
        logits = _forward(model, layout, inputs, trainable, frozen)
        value, count = loss.fn(logits, labels)
        return value, logits, count

    return evaluate


def make_infer(model: torch.nn.Module, layout: GraphLayout) -> Callable[..., tuple[torch.Tensor, ...]]:
    sizes = [len(layout.inputs), len(layout.trainable), len(layout.frozen)]

    def infer(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, trainable, frozen = _split(flat, sizes)
        return (_forward(model, layout, inputs, trainable, frozen),)

    return infer
