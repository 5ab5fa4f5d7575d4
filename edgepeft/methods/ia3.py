"""IA3: learned per-channel scaling vectors on chosen Linear layers (Liu et al. 2022, "(IA)^3").

As in huggingface/peft, a targeted layer's *output* is scaled (`base(x) * l`, bias included) unless the layer is also
listed in `feedforward_modules`, where its *input* is scaled (`base(x * l)`) — the paper scales keys, values and
the inner feed-forward activation, which is the input of the second feed-forward layer. Every vector starts at ones,
so the wrapped model starts unchanged. Trainable tensors: `<layer>.ia3_l`, one vector per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .base import config_to_dict, register_method
from .targets import find_targets, normalize_layers, normalize_patterns, pattern_matches, replace_module, resolve_targets

__all__ = ["IA3Config", "IA3Linear"]

_EXAMPLE = "target_modules=['key', 'value', 'fc2'], feedforward_modules=['fc2']"


@register_method
@dataclass(frozen=True)
class IA3Config:
    """target_modules: Linear layers to scale (None: the model's `default_ia3_targets`).
    feedforward_modules: which of those get their input scaled instead of their output (None: the model's
    `default_ia3_feedforward_targets`, or none). layers_to_transform: keep only targets in these numbered blocks.
    """

    name: ClassVar[str] = "ia3"

    target_modules: Sequence[str] | str | None = None
    feedforward_modules: Sequence[str] | str | None = None
    layers_to_transform: Sequence[int] | int | None = None

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules",
                               normalize_patterns(self.target_modules, field="target_modules", example=_EXAMPLE))
        if self.feedforward_modules is not None:  # [] is allowed: no feed-forward layers among the targets
            ff = self.feedforward_modules
            ff = () if isinstance(ff, (list, tuple)) and not ff else normalize_patterns(
                ff, field="feedforward_modules", example=_EXAMPLE)
            object.__setattr__(self, "feedforward_modules", ff)
        object.__setattr__(self, "layers_to_transform", normalize_layers(self.layers_to_transform, field="layers_to_transform"))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def apply_to(self, model: nn.Module) -> dict[str, Any]:
        """Wrap every targeted Linear in an IA3Linear; return the config with the targets resolved."""
        targets = resolve_targets(model, self.target_modules, method="ia3", example=_EXAMPLE)
        feedforward = self.feedforward_modules
        if feedforward is None:
            feedforward = tuple(getattr(model, "default_ia3_feedforward_targets", ()) or ())
        hits = find_targets(model, targets, method="ia3", layers=self.layers_to_transform, supported=(nn.Linear,))
        is_ff = {name: any(pattern_matches(p, name) for p in feedforward) for name, _ in hits}
        for pattern in feedforward:
            if not any(pattern_matches(pattern, name) for name, _ in hits):
                raise ConfigError(
                    f"ia3: feedforward_modules pattern {pattern!r} matches none of the targets "
                    f"({', '.join(n for n, _ in hits)}); feedforward modules must also be target_modules"
                )
        for name, module in hits:
            replace_module(model, name, IA3Linear(module, feedforward=is_ff[name]))
        return dict(self.to_dict(), target_modules=list(targets), feedforward_modules=list(feedforward))


class IA3Linear(nn.Module):
    """base(x) * ia3_l ([out_features]), or base(x * ia3_l) ([in_features]) for a feed-forward layer."""

    def __init__(self, base_layer: nn.Linear, feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.merged = False
        size = base_layer.in_features if feedforward else base_layer.out_features
        weight = base_layer.weight
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=weight.dtype, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.feedforward:
            return self.base_layer(x * self.ia3_l)
        return self.base_layer(x) * self.ia3_l

    def merged_weight(self) -> torch.Tensor:
        """The weight of a plain layer computing the same (a detached copy); see `merge` for the bias."""
        with torch.no_grad():
            weight = self.base_layer.weight
            if self.merged:
                return weight.clone()
            return weight * (self.ia3_l[None, :] if self.feedforward else self.ia3_l[:, None])

    def merge(self) -> None:
        """Fold the scaling into the base weight (and, for output scaling, the bias); `unmerge` divides it out."""
        if self.merged:
            raise ModelError("this IA3 layer is already merged; call unmerge() before merging again")
        self._rescale(self.ia3_l)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise ModelError("this IA3 layer is not merged; there is nothing to unmerge")
        self._rescale(1.0 / self.ia3_l)
        self.merged = False

    def _rescale(self, factor: torch.Tensor) -> None:
        with torch.no_grad():
            base = self.base_layer
            if self.feedforward:
                base.weight.mul_(factor[None, :])
            else:
                base.weight.mul_(factor[:, None])
                if base.bias is not None:
                    base.bias.mul_(factor)

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, merged={self.merged}"
