"""The naming contract between exported graphs and the runtime: which inputs and outputs each graph has.

Exporters name graph inputs and outputs by these rules and the runtime feeds them by the same rules, so they
are written down once, here, as functions of the bundle's manifest. Both sides import this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bundle import Bundle
from .errors import RuntimeOptionError
from .tensor_spec import TensorSpec

__all__ = [
    "COUNT",
    "GRAD_NORM",
    "LOGITS",
    "LOSS",
    "LR",
    "NEW_STATE",
    "NEW_TRAINABLE",
    "STATE",
    "STEP",
    "TRAINABLE",
    "GraphInterface",
    "graph_interface",
]

TRAINABLE = "trainable::"
STATE = "state::"
NEW_TRAINABLE = "new_trainable::"
NEW_STATE = "new_state::"
STEP = "step"
LR = "lr"
LOSS = "loss"
GRAD_NORM = "grad_norm"
LOGITS = "logits"
COUNT = "count"

# Dtypes as onnxruntime reports them in NodeArg.type.
_ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "bool": "tensor(bool)",
    "uint8": "tensor(uint8)",
    "int8": "tensor(int8)",
}
_SCALAR = "tensor(float)"


@dataclass(frozen=True)
class GraphInterface:
    """Expected input and output names of one graph, in feed order, each with its onnxruntime type string."""

    inputs: dict[str, str]
    outputs: dict[str, str]


def _typed(prefix: str, specs: tuple[TensorSpec, ...]) -> dict[str, str]:
    return {prefix + s.name: _ORT_TYPES[s.dtype] for s in specs}


def graph_interface(bundle: Bundle, graph: str) -> GraphInterface:
    """What `graph` (`train_step`, `eval` or `infer`) must take and return for this bundle.

    The logits output is always named `logits`; the manifest's `output` entry gives its dtype and shape.
    """
    model_inputs = _typed("", bundle.inputs)
    labels = _typed("", (bundle.labels,))
    trainable = _typed(TRAINABLE, bundle.trainable)
    logits = {LOGITS: _ORT_TYPES[bundle.output.dtype]}
    if graph == "train_step":
        return GraphInterface(
            inputs={**model_inputs, **labels, **trainable, **_typed(STATE, bundle.optimizer_state),
                    STEP: _SCALAR, LR: _SCALAR},
            outputs={LOSS: _SCALAR, GRAD_NORM: _SCALAR, **_typed(NEW_TRAINABLE, bundle.trainable),
                     **_typed(NEW_STATE, bundle.optimizer_state)},
        )
    if graph == "eval":
        return GraphInterface(inputs={**model_inputs, **labels, **trainable},
                              outputs={LOSS: _SCALAR, **logits, COUNT: _SCALAR})
    if graph == "infer":
        return GraphInterface(inputs={**model_inputs, **trainable}, outputs=logits)
    raise RuntimeOptionError(f"unknown graph role {graph!r}; the contract defines train_step, eval and infer")
