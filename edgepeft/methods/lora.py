"""LoRA: learn a low-rank update `scaling * B @ A` next to frozen Linear, Conv1d/Conv2d and Embedding weights.

The shape follows huggingface/peft's `tuners/lora`: a config, layer wrappers that keep the original module as
`base_layer` and implement forward / merge / unmerge, and an injector that swaps matched modules for wrappers.
Unlike PEFT there is one adapter per layer and `lora_A` / `lora_B` are plain parameters of the wrapper, so the
trainable tensors are named `<module>.lora_A` / `<module>.lora_B`: those names become the bundle's trainable names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelError, check_positive_int, check_positive_number
from .base import config_to_dict, register_method
from .targets import (
    find_targets,
    in_layers,
    normalize_layers,
    normalize_patterns,
    pattern_matches,
    replace_module,
    resolve_targets,
)

__all__ = ["LoRAConfig", "LoRALayer", "LoRALinear", "LoRAConv", "LoRAEmbedding", "lora_layers"]

_EXAMPLE_TARGETS = "target_modules=['query', 'value']"


@register_method
@dataclass(frozen=True)
class LoRAConfig:
    """Hyper-parameters of LoRA (Hu et al. 2021), named as in PEFT.

    r: rank of the update. alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora, which keeps
    the update's scale stable as r grows). dropout: only 0.0, because an exported train step must be deterministic.
    target_modules: name patterns (see `methods.targets`); None uses the built-in model's `default_lora_targets`.
    layers_to_transform: keep only targets inside these numbered blocks (names containing ".<idx>.").
    """

    name: ClassVar[str] = "lora"

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: Sequence[str] | str | None = None
    layers_to_transform: Sequence[int] | int | None = None
    use_rslora: bool = False

    def __post_init__(self) -> None:
        check_positive_int("rank", self.r, "pass --rank 8 for a typical LoRA")
        check_positive_number("alpha", self.alpha, "pass --alpha 16 (twice the rank is typical)")
        if self.dropout != 0.0:
            raise ConfigError(
                f"dropout must be 0.0, got {self.dropout!r}; dropout makes the exported train step random, "
                "so it is not supported yet: pass dropout=0.0 and regularise with weight_decay instead"
            )
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be True or False, got {self.use_rslora!r}")
        if self.target_modules is not None:
            targets = normalize_patterns(self.target_modules, field="target_modules", example=_EXAMPLE_TARGETS)
            object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "layers_to_transform", normalize_layers(self.layers_to_transform, field="layers_to_transform"))

    @property
    def scaling(self) -> float:
        """The factor in front of B @ A."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def apply_to(self, model: nn.Module) -> dict[str, Any]:
        """Wrap every targeted layer of `model` in place; return the config with the targets resolved."""
        targets, _ = self.inject(model)
        return dict(self.to_dict(), target_modules=list(targets))

    def inject(self, model: nn.Module) -> tuple[tuple[str, ...], list[tuple[str, "LoRALayer"]]]:
        """Swap every targeted layer for a wrapper; return (the resolved patterns, the (name, wrapper) pairs).

        Variants (DoRA, LoRA-FA) reuse this and change only `wrap` or what they do with the wrappers afterwards.
        """
        targets = resolve_targets(model, self.target_modules, method=self.name, example=_EXAMPLE_TARGETS,
                                  defaults="lora")
        _refuse_double_wrap(model, targets, self.layers_to_transform, self.name)
        hits = find_targets(model, targets, method=self.name, layers=self.layers_to_transform,
                            supported=self.supported_layers)
        wrappers = [(name, self.wrap(name, module)) for name, module in hits]
        for name, wrapper in wrappers:  # all wrappers built (and checked) before the model is touched
            replace_module(model, name, wrapper)
        return targets, wrappers

    @property
    def supported_layers(self) -> tuple[type[nn.Module], ...]:
        """Layer types this method can wrap."""
        return _SUPPORTED

    def wrap(self, name: str, module: nn.Module) -> "LoRALayer":
        """The wrapper that replaces `module` (called `name` in the model)."""
        return _wrap(name, module, self.r, self.scaling)


class LoRALayer(nn.Module):
    """What the three wrappers share: `base_layer`, `lora_A`, `lora_B`, `scaling`, merge / unmerge.

    Subclasses say how the update enters the output (`lora_forward`) and the weight (`delta_weight`).
    """

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, a_shape: tuple[int, ...], b_shape: tuple[int, ...]):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = scaling
        self.merged = False
        like = {"dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        self.lora_A = nn.Parameter(torch.empty(a_shape, **like))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **like))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)), as nn.Linear and PEFT do; B = 0 so the wrapped model starts unchanged."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """`scaling * B @ A` in the layout of `base_layer.weight`."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:  # the update already lives in base_layer.weight
            return out
        return out + self.lora_forward(x) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The weight of a plain layer that computes what this wrapper computes (a detached copy)."""
        with torch.no_grad():
            weight = self.base_layer.weight
            return weight.clone() if self.merged else weight + self.delta_weight()

    def merge(self) -> None:
        """Add the update into `base_layer.weight`, so inference costs nothing extra; `unmerge` undoes it."""
        if self.merged:
            raise ModelError("this LoRA layer is already merged; call unmerge() before merging again")
        with torch.no_grad():
            self.base_layer.weight.add_(self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the update from `base_layer.weight` again (exact up to float rounding)."""
        if not self.merged:
            raise ModelError("this LoRA layer is not merged; there is nothing to unmerge")
        with torch.no_grad():
            self.base_layer.weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """y = base(x) + scaling * x A^T B^T, with A: [r, in_features] and B: [out_features, r]."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float):
        super().__init__(base_layer, r, scaling, (r, base_layer.in_features), (base_layer.out_features, r))

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


class LoRAConv(LoRALayer):
    """A is a conv with the base kernel / stride / padding / dilation and r output channels, B a 1x1 conv to out.

    With B 1x1 the composition is itself one conv with weight B @ A (over the rank), which is what `merge` adds.
    A: [r, in, *kernel], B: [out, r, 1, ...].
    """

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d, r: int, scaling: float):
        kernel = tuple(base_layer.kernel_size)
        ones = (1,) * len(kernel)
        super().__init__(base_layer, r, scaling, (r, base_layer.in_channels, *kernel), (base_layer.out_channels, r, *ones))
        self._conv = F.conv1d if isinstance(base_layer, nn.Conv1d) else F.conv2d

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        h = self._conv(x, self.lora_A, None, base.stride, base.padding, base.dilation)
        return self._conv(h, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        delta = self.lora_B.flatten(1) @ self.lora_A.flatten(1)
        return delta.reshape(self.base_layer.weight.shape) * self.scaling


class LoRAEmbedding(LoRALayer):
    """y = base(ids) + scaling * A^T[ids] B^T, with A: [r, num_embeddings] and B: [embedding_dim, r] (as PEFT).

    Initialised as PEFT does for embeddings (A = 0, B ~ N(0, 1)) rather than like the other layers, so training
    starts from the same place as with PEFT; the update is zero at init either way.
    """

    def __init__(self, base_layer: nn.Embedding, r: int, scaling: float):
        super().__init__(base_layer, r, scaling, (r, base_layer.num_embeddings), (base_layer.embedding_dim, r))

    def reset_lora_parameters(self) -> None:
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        # padding_idx as in the base layer: the padding token's row gets no gradient there, so none here either.
        rows = F.embedding(x, self.lora_A.T, padding_idx=self.base_layer.padding_idx)
        return rows @ self.lora_B.T

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).T * self.scaling


_SUPPORTED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def _wrap(name: str, module: nn.Module, r: int, scaling: float) -> LoRALayer:
    if isinstance(module, nn.Linear):
        return LoRALinear(module, r, scaling)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ConfigError(
                f"lora: {name!r} is a conv with groups={module.groups}, padding_mode={module.padding_mode!r}; only "
                "groups=1 with zero padding is supported, so leave it out of target_modules"
            )
        return LoRAConv(module, r, scaling)
    if module.max_norm is not None or module.sparse:
        raise ConfigError(
            f"lora: embedding {name!r} uses max_norm or sparse gradients, which rewrite or bypass dense weights; "
            "leave it out of target_modules"
        )
    return LoRAEmbedding(module, r, scaling)


def _refuse_double_wrap(model: nn.Module, patterns: Sequence[str], layers: Sequence[int] | None, method: str) -> None:
    """A second LoRA on the same layer would nest wrappers; say so instead of building something odd."""
    for name, module in model.named_modules():
        if not isinstance(module, LoRALayer) or not in_layers(name, layers):
            continue
        for candidate in (name, f"{name}.base_layer"):
            if any(pattern_matches(p, candidate) for p in patterns):
                raise ConfigError(
                    f"{method}: {name!r} already has LoRA; apply one LoRA-family config per layer (change its r "
                    "instead of stacking a second one)"
                )


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """Every LoRA wrapper in `model`, with its qualified name (e.g. to merge them all before exporting)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]
