"""Prefix tuning: learned key and value vectors prepended in every targeted attention layer (Li & Liang 2021).

Each query can then attend to `num_virtual_tokens` learned positions besides the real tokens; nothing else in the
model changes. The hook this needs is one call in the attention module: an attention module supports prefix
tuning by having a `kv_prefix` child slot (None until prefix tuning fills it) and calling
`k, v, score_bias = self.kv_prefix(k, v, score_bias)` after projecting keys and values ([batch, seq, dim]) and
before splitting heads (the built-in transformer's SelfAttention does). Prefix sizes come from the module's
`key` and `value` Linear layers. Trainable tensors per layer: `<attention>.kv_prefix.key` and `.value`.

Hugging Face attention modules have no such slot (PEFT feeds prefixes through past_key_values): use prompt tuning,
LoRA or IA3 on those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelError, check_positive_int, check_positive_number
from .base import config_to_dict, register_method
from .targets import find_targets, in_layers, normalize_layers, normalize_patterns

__all__ = ["PrefixTuningConfig", "KVPrefix"]

_SLOT = "kv_prefix"


@register_method
@dataclass(frozen=True)
class PrefixTuningConfig:
    """num_virtual_tokens: prefix length per layer. init_std: prefixes start as N(0, init_std^2) (small, so the
    model starts close to the base model). target_modules: attention modules by name pattern (None: every module
    with a kv_prefix slot). layers_to_transform: keep only those in these numbered blocks."""

    name: ClassVar[str] = "prefix_tuning"

    num_virtual_tokens: int = 8
    init_std: float = 0.02
    target_modules: Sequence[str] | str | None = None
    layers_to_transform: Sequence[int] | int | None = None

    def __post_init__(self) -> None:
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "8 to 20 prefix positions are typical")
        check_positive_number("init_std", self.init_std, "0.02 is the default")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", normalize_patterns(
                self.target_modules, field="target_modules", example="target_modules=['attn']"))
        object.__setattr__(self, "layers_to_transform", normalize_layers(self.layers_to_transform, field="layers_to_transform"))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def apply_to(self, model: nn.Module) -> dict[str, Any]:
        """Fill the kv_prefix slot of every targeted attention module."""
        slots = [(n, m) for n, m in model.named_modules() if hasattr(m, _SLOT)]
        if not slots:
            raise ModelError(
                f"prefix_tuning: {type(model).__name__} has no attention module with a kv_prefix slot (the built-in "
                "transformer has them); use prompt_tuning, lora or ia3 for this model"
            )
        if self.target_modules is not None:
            hits = find_targets(model, self.target_modules, method="prefix_tuning", layers=self.layers_to_transform)
            unsupported = [n for n, m in hits if not hasattr(m, _SLOT)]
            if unsupported:
                raise ConfigError(f"prefix_tuning: {unsupported} have no kv_prefix slot; attention modules that do: "
                                  f"{[n for n, _ in slots]}")
        else:
            hits = [(n, m) for n, m in slots if in_layers(n, self.layers_to_transform)]
            if not hits:
                raise ConfigError(f"prefix_tuning: no attention module inside layers {list(self.layers_to_transform or [])}; "
                                  f"attention modules: {[n for n, _ in slots]}")
        for name, module in hits:
            if getattr(module, _SLOT) is not None:
                raise ConfigError(f"prefix_tuning: {name!r} already has a prefix; apply prefix tuning once")
        for _, module in hits:
            setattr(module, _SLOT, KVPrefix(self.num_virtual_tokens, module.key, module.value, self.init_std))
        return dict(self.to_dict(), target_modules=[n for n, _ in hits])


class KVPrefix(nn.Module):
    """Learned `key` [n, key_dim] and `value` [n, value_dim], prepended along the sequence axis of every batch row."""

    def __init__(self, num_virtual_tokens: int, key_layer: nn.Linear, value_layer: nn.Linear, init_std: float):
        super().__init__()
        like = {"dtype": key_layer.weight.dtype, "device": key_layer.weight.device}
        self.key = nn.Parameter(init_std * torch.randn(num_virtual_tokens, key_layer.out_features, **like))
        self.value = nn.Parameter(init_std * torch.randn(num_virtual_tokens, value_layer.out_features, **like))

    def forward(self, k: torch.Tensor, v: torch.Tensor, score_bias: torch.Tensor):
        """k [B, T, Dk], v [B, T, Dv], score_bias [..., T] -> the same with n prefix positions in front (bias 0)."""
        batch = k.shape[0]
        k = torch.cat([self.key.unsqueeze(0).expand(batch, -1, -1), k], dim=1)
        v = torch.cat([self.value.unsqueeze(0).expand(batch, -1, -1), v], dim=1)
        # Every query may attend to every prefix position, padded row or not: the bias there is 0.
        return k, v, F.pad(score_bias, (self.key.shape[0], 0))
