"""BitFit: train only the bias terms of an otherwise frozen model (Ben Zaken et al. 2021).

Biases are tiny (one vector per layer) yet shift every activation, which makes BitFit the cheapest method to train
on a device and a good companion to LoRA. Nothing is wrapped: the existing `bias` parameters just become trainable,
so their names stay the model's own (`fc1.bias`, or `fc1.base_layer.bias` under a LoRA wrapper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError, ModelError
from .base import config_to_dict, register_method
from .targets import find_targets, normalize_patterns

__all__ = ["BitFitConfig", "bias_parameters"]

_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@register_method
@dataclass(frozen=True)
class BitFitConfig:
    """Which biases to train.

    include_norm: also train the shift (bias) of LayerNorm / BatchNorm / GroupNorm layers; their scales stay frozen.
    target_modules: name patterns (see `methods.targets`) restricting the search to these modules and their
    children; None means the whole model.
    """

    name: ClassVar[str] = "bitfit"

    include_norm: bool = False
    target_modules: Sequence[str] | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.include_norm, bool):
            raise ConfigError(f"include_norm must be True or False, got {self.include_norm!r}")
        if self.target_modules is not None:
            targets = normalize_patterns(self.target_modules, field="target_modules", example="target_modules=['attn', 'head']")
            object.__setattr__(self, "target_modules", targets)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def apply_to(self, model: nn.Module) -> dict[str, Any]:
        """Set `requires_grad` on the selected biases; ModelError if there are none."""
        params = bias_parameters(model, include_norm=self.include_norm, target_modules=self.target_modules)
        if not params:
            kinds = "Linear/Conv" + ("/norm" if self.include_norm else "")
            where = f" under {list(self.target_modules)}" if self.target_modules else ""
            fix = "pass include_norm=True to train norm shifts, or use LoRAConfig" if not self.include_norm else "use LoRAConfig"
            raise ModelError(f"bitfit: {type(model).__name__} has no {kinds} biases{where} to train; {fix}")
        for p in params.values():
            p.requires_grad_(True)
        return self.to_dict()


def bias_parameters(
    model: nn.Module, *, include_norm: bool = False, target_modules: Sequence[str] | None = None
) -> dict[str, nn.Parameter]:
    """The biases BitFit would train, by qualified parameter name."""
    kinds = _LAYERS + _NORMS if include_norm else _LAYERS
    roots = find_targets(model, target_modules, method="bitfit") if target_modules else [("", model)]
    found: dict[str, nn.Parameter] = {}
    for root_name, root in roots:
        for name, module in root.named_modules(prefix=root_name):
            bias = getattr(module, "bias", None)
            if isinstance(module, kinds) and isinstance(bias, nn.Parameter):
                found.setdefault(f"{name}.bias" if name else "bias", bias)
    return found
