"""Prefix tuning: learned key and value vectors prepended in every targeted attention layer (Li & Liang 2021).

Each query can then attend to `num_virtual_tokens` learned positions besides the real tokens; nothing else in the
model changes. The hook this needs is one call in the attention module: an attention module supports prefix
tuning by having a `kv_prefix` child slot (None until prefix tuning fills it) and calling
`k, v, score_bias = self.kv_prefix(k, v, score_bias)` after projecting keys and values ([batch, seq, dim]) and
before splitting heads (the built-in transformer's SelfAttention does). Prefix sizes come from the module's
`key` and `value` Linear layers. Trainable tensors per layer: `<attention>.kv_prefix.key` and `.value`.

Hugging Face attention modules (transformers 5: BERT, DistilBERT, GPT-2, ViT, ...) get the slot when prefix tuning
is applied and their prefixes are prepended after the head split, through transformers' attention-function registry
(`hf_prefix.py`); prefix widths come from the config's hidden size there.
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
from .hf_prefix import hf_attention_modules, use_prefix_attention
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
        hf_modules = [] if slots else hf_attention_modules(model)
        for _, module in hf_modules:
            setattr(module, _SLOT, None)
        slots = slots or hf_modules
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
        if hf_modules:
            use_prefix_attention(model, hf_modules)
            width = int(model.config.hidden_size)
        like = next(iter(model.parameters()))
        for _, module in hits:
            key_dim, value_dim = (width, width) if hf_modules else (module.key.out_features, module.value.out_features)
            setattr(module, _SLOT, KVPrefix(self.num_virtual_tokens, key_dim, value_dim, self.init_std, like))
        return dict(self.to_dict(), target_modules=[n for n, _ in hits])


class KVPrefix(nn.Module):
    """Learned `key` [n, key_dim] and `value` [n, value_dim], prepended along the sequence axis of every batch row."""

    def __init__(self, num_virtual_tokens: int, key_dim: int, value_dim: int, init_std: float, like: torch.Tensor):
        super().__init__()
        kind = {"dtype": like.dtype, "device": like.device}
        self.key = nn.Parameter(init_std * torch.randn(num_virtual_tokens, key_dim, **kind))
        self.value = nn.Parameter(init_std * torch.randn(num_virtual_tokens, value_dim, **kind))

    def extend_heads(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """Hugging Face layout: k, v [B, heads, T, head_dim], mask [B, 1, Tq, T] additive (or None: all visible)
        -> the same with the n prefix positions in front, visible to every query."""
        batch, heads, _, head_dim = k.shape
        n = self.key.shape[0]
        if heads * head_dim != self.key.shape[1] or v.shape[1] * v.shape[3] != self.value.shape[1]:
            raise ModelError(f"prefix_tuning: the attention has {heads} heads x {head_dim} but the prefix is "
                             f"{self.key.shape[1]} wide (models with fewer key/value heads are not supported)")

        def heads_first(p: torch.Tensor, width: int) -> torch.Tensor:
            return p.view(n, -1, width).transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)

        k = torch.cat([heads_first(self.key, head_dim), k], dim=2)
        v = torch.cat([heads_first(self.value, v.shape[3]), v], dim=2)
        if mask is not None:
            visible = torch.zeros((*mask.shape[:-1], n), dtype=mask.dtype, device=mask.device)
            mask = torch.cat([visible.logical_not() if mask.dtype == torch.bool else visible, mask], dim=-1)
        return k, v, mask

    def forward(self, k: torch.Tensor, v: torch.Tensor, score_bias: torch.Tensor):
        """k [B, T, Dk], v [B, T, Dv], score_bias [..., T] -> the same with n prefix positions in front (bias 0)."""
        batch = k.shape[0]
        k = torch.cat([self.key.unsqueeze(0).expand(batch, -1, -1), k], dim=1)
        v = torch.cat([self.value.unsqueeze(0).expand(batch, -1, -1), v], dim=1)
        # Every query may attend to every prefix position, padded row or not: the bias there is 0.
        return k, v, F.pad(score_bias, (self.key.shape[0], 0))
