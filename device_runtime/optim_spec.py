"""Optimizer specs: the hyper-parameters and state layout that a bundle's train step was built with.

They live in the device runtime because they are part of the bundle format: the exporter writes them into the
manifest and bakes the update into the graph, the runtime reads them back to know which state tensors to feed.
The update maths itself lives in one place only, the exporter that traces it into the train-step graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Union

from .errors import OptimizerSpecError

__all__ = ["SGD", "AdamW", "OptimizerSpec", "optimizer_from_manifest"]


def _check_clip(max_grad_norm: float | None) -> None:
    if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise OptimizerSpecError(
            f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}; "
            "pass 1.0 for typical global-norm clipping or None to disable it"
        )


def _check_lr(lr: float) -> None:
    if not (lr > 0 and math.isfinite(lr)):
        raise OptimizerSpecError(f"lr must be a positive finite number, got {lr!r}; try 1e-3 for AdamW, 1e-2 for SGD")


@dataclass(frozen=True)
class SGD:
    """Matches torch.optim.SGD (first-step momentum buffer = gradient, decoupled from dampening)."""

    lr: float = 1e-2
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    max_grad_norm: float | None = None
    name: str = field(default="sgd", init=False)

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_clip(self.max_grad_norm)
        if not 0.0 <= self.momentum < 1.0:
            raise OptimizerSpecError(f"momentum must be in [0, 1), got {self.momentum}; 0.9 is typical")
        if not 0.0 <= self.dampening <= 1.0:
            raise OptimizerSpecError(f"dampening must be in [0, 1], got {self.dampening}")
        if self.weight_decay < 0:
            raise OptimizerSpecError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise OptimizerSpecError("nesterov needs momentum > 0 and dampening == 0, as in torch.optim.SGD")

    @property
    def state_kinds(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum > 0 else ()

    def state_names(self, param_names: list[str]) -> list[str]:
        """State tensor names in the order the train-step graph takes them (kind-major, then parameter)."""
        return [f"{kind}/{p}" for kind in self.state_kinds for p in param_names]

    def to_manifest(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AdamW:
    """Matches torch.optim.AdamW (decoupled weight decay, bias-corrected moments, eps outside the sqrt)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = None
    name: str = field(default="adamw", init=False)

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_clip(self.max_grad_norm)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise OptimizerSpecError(f"betas must be two numbers in [0, 1), got {self.betas}; (0.9, 0.999) is typical")
        if not self.eps > 0:
            raise OptimizerSpecError(f"eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise OptimizerSpecError(f"weight_decay must be >= 0, got {self.weight_decay}")

    @property
    def state_kinds(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def state_names(self, param_names: list[str]) -> list[str]:
        """State tensor names in the order the train-step graph takes them (kind-major, then parameter)."""
        return [f"{kind}/{p}" for kind in self.state_kinds for p in param_names]

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


OptimizerSpec = Union[SGD, AdamW]
_BY_NAME = {"sgd": SGD, "adamw": AdamW}


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def _check_field_types(name: str, fields: dict[str, Any]) -> None:
    """JSON can hold any type anywhere: name the wrong field before the dataclass trips over it."""
    for key, value in fields.items():
        if key == "nesterov":
            ok, want = isinstance(value, bool), "true or false"
        elif key == "betas":
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_finite_number(b) for b in value)
            want = "a pair of finite numbers"
        elif key == "max_grad_norm":
            ok, want = value is None or _is_finite_number(value), "a finite number or null"
        else:
            ok, want = _is_finite_number(value), "a finite number"
        if not ok:
            raise OptimizerSpecError(f"{name} field {key!r} is {value!r}, not {want}")


def optimizer_from_manifest(entry: dict[str, Any]) -> OptimizerSpec:
    """Rebuild the spec from a manifest's `optimizer` entry (extra keys such as `state` are ignored)."""
    name = entry.get("name")
    if not isinstance(name, str) or name not in _BY_NAME:
        raise OptimizerSpecError(f"unknown optimizer {name!r}; this runtime knows {sorted(_BY_NAME)}")
    cls = _BY_NAME[name]
    fields = {k: v for k, v in entry.items() if k in cls.__dataclass_fields__ and k != "name"}
    _check_field_types(name, fields)
    if "betas" in fields:
        fields["betas"] = tuple(fields["betas"])
    return cls(**fields)
