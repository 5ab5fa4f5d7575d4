"""Train whole named modules, typically a classifier head (PEFT's `modules_to_save`).

A new task usually needs a new head: LoRA on the backbone cannot re-map classes if the last layer stays frozen.
Every parameter of the matched modules becomes trainable under its own name (`head.weight`, `head.bias`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import ModelError
from .base import config_to_dict, register_method
from .targets import find_targets, normalize_patterns

__all__ = ["TrainHeadConfig"]


@register_method
@dataclass(frozen=True)
class TrainHeadConfig:
    """target_modules: name patterns (see `methods.targets`) of the modules to train in full; built-in models
    call their classifier `head`."""

    name: ClassVar[str] = "train_head"

    target_modules: Sequence[str] | str = ("head",)

    def __post_init__(self) -> None:
        targets = normalize_patterns(self.target_modules, field="target_modules", example="target_modules=['head']")
        object.__setattr__(self, "target_modules", targets)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def apply_to(self, model: nn.Module) -> dict[str, Any]:
        """Make every parameter of the matched modules trainable."""
        for name, module in find_targets(model, self.target_modules, method="train_head"):
            params = list(module.parameters())
            if not params:
                raise ModelError(f"train_head: {name!r} ({type(module).__name__}) has no parameters to train; target a layer with weights")
            for p in params:
                p.requires_grad_(True)
        return self.to_dict()
