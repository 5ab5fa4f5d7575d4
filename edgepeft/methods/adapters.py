"""Bottleneck adapters: a small down-project / nonlinearity / up-project block beside or after a frozen layer.

serial (Houlsby et al. 2019): `h = base(x); h + s * up(act(down(h)))`, inserted after the attention output
projection and after the second feed-forward layer (the built-in transformer's `attn.out` and `ffn.fc2`, BERT's
`output.dense`), i.e. before each residual add and LayerNorm.
parallel (He et al. 2022): `base(x) + s * up(act(down(x)))`, the adapter reads the layer's input instead.

`up` starts at zero, so the wrapped model starts unchanged (as LoRA's B = 0). Trainable tensors per layer:
`<layer>.adapter_down.weight/.bias` and `<layer>.adapter_up.weight/.bias`. Only nn.Linear layers are wrapped: their
in/out sizes say how big the adapter is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, check_positive_int, check_positive_number
from .base import config_to_dict, register_method
from .targets import find_targets, normalize_layers, normalize_patterns, replace_module, resolve_targets

__all__ = ["AdapterConfig", "AdapterLayer"]

_EXAMPLE = "target_modules=['out', 'fc2'] (after attention and after the feed-forward block)"
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
_MODES = ("serial", "parallel")


@register_method
@dataclass(frozen=True)
class AdapterConfig:
    """bottleneck: hidden size of the adapter. mode: "serial" (Houlsby) or "parallel". activation: relu, gelu or
    tanh. scaling: factor on the adapter's output. target_modules: Linear layers to put adapters on (None: the
    model's `default_adapter_targets`). layers_to_transform: keep only targets in these numbered blocks.
    """

    name: ClassVar[str] = "adapter"

    bottleneck: int = 16
    mode: str = "serial"
    activation: str = "relu"
    scaling: float = 1.0
    target_modules: Sequence[str] | str | None = None
    layers_to_transform: Sequence[int] | int | None = None

    def __post_init__(self) -> None:
        check_positive_int("bottleneck", self.bottleneck, "16 is typical; a quarter of the hidden size at most")
        if self.mode not in _MODES:
            raise ConfigError(f"adapter mode must be one of {list(_MODES)}, got {self.mode!r}; 'serial' is Houlsby's")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"adapter activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        check_positive_number("scaling", self.scaling, "1.0 is Houlsby's; parallel adapters often use 4.0")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules",
                               normalize_patterns(self.target_modules, field="target_modules", example=_EXAMPLE))
        object.__setattr__(self, "layers_to_transform", normalize_layers(self.layers_to_transform, field="layers_to_transform"))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def apply_to(self, model: nn.Module) -> dict[str, Any]:
        """Wrap every targeted Linear in an AdapterLayer; return the config with the targets resolved."""
        targets = resolve_targets(model, self.target_modules, method="adapter", example=_EXAMPLE)
        hits = find_targets(model, targets, method="adapter", layers=self.layers_to_transform, supported=(nn.Linear,))
        for name, module in hits:
            replace_module(model, name, AdapterLayer(module, self.bottleneck, self.mode, self.activation, self.scaling))
        return dict(self.to_dict(), target_modules=list(targets))


class AdapterLayer(nn.Module):
    """A frozen Linear `base_layer` plus a bottleneck adapter, serial (reads the output) or parallel (the input)."""

    def __init__(self, base_layer: nn.Linear, bottleneck: int, mode: str, activation: str, scaling: float):
        super().__init__()
        self.base_layer = base_layer
        self.mode = mode
        self.scaling = scaling
        like = {"dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        reads = base_layer.out_features if mode == "serial" else base_layer.in_features
        self.adapter_down = nn.Linear(reads, bottleneck, **like)
        self.adapter_act = _ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(bottleneck, base_layer.out_features, **like)
        with torch.no_grad():  # down keeps nn.Linear's init; up (and its bias) start at 0: the adapter adds nothing
            self.adapter_up.weight.zero_()
            self.adapter_up.bias.zero_()
            self.adapter_down.bias.zero_()

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.adapter_act(self.adapter_down(h))) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out + self.adapter(out if self.mode == "serial" else x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, scaling={self.scaling:g}"
