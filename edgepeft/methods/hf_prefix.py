"""Prefix tuning on Hugging Face attention modules, through transformers' attention-function registry.

transformers 5 attention modules project q/k/v, split heads, then call the function registered under the model's
`config._attn_implementation` with `(module, query, key, value, attention_mask, ...)`. We register one more,
`edgepeft_prefix`: it prepends the module's learned prefix (`module.kv_prefix`, if any) to key and value and a
zero ("attend") block to the additive mask, then runs the modeling file's own `eager_attention_forward`. Its masks
come from transformers' eager mask builder (a float 4D mask, causal where the model is), so a causal model's queries
see every prefix position and the causal past, as in PEFT's past-key-value prefixes. No model code is patched: the
modules that call the registry are found by their source, the implementation name is switched on the model config.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelError

__all__ = ["ATTENTION_NAME", "hf_attention_modules", "use_prefix_attention"]

ATTENTION_NAME = "edgepeft_prefix"


@functools.cache
def _calls_attention_registry(cls: type) -> bool:
    forward = cls.__dict__.get("forward")
    if forward is None or not cls.__module__.startswith("transformers."):
        return False
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


def hf_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every transformers attention module that dispatches through the registry; [] otherwise."""
    if not hasattr(getattr(model, "config", None), "_attn_implementation"):
        return []
    return [(n, m) for n, m in model.named_modules() if _calls_attention_registry(type(m))]


def _eager_attention(module: nn.Module) -> Callable[..., Any]:
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ModelError(f"prefix_tuning: {type(module).__name__}'s modeling file has no eager_attention_forward to "
                         "run prefixed attention with; use prompt_tuning, lora or ia3 for this model")
    return eager


def _prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any):
    prefix = getattr(module, "kv_prefix", None)
    if prefix is not None:
        key, value, attention_mask = prefix.extend_heads(key, value, attention_mask)
    return _eager_attention(module)(module, query, key, value, attention_mask, **kwargs)


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, _prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def use_prefix_attention(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> None:
    """Route `model`'s attention through `_prefix_attention` (modules without a prefix run plain eager attention)."""
    for _, module in modules:
        _eager_attention(module)  # refuse before changing anything
    _register()
    model.config._attn_implementation = ATTENTION_NAME
