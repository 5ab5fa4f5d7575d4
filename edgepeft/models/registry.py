"""The built-in model registry: `load_model("mlp")` builds a small, deterministic (given torch.manual_seed) model.

Each built-in is a module class plus a frozen config dataclass; keyword arguments of `load_model` become config
fields, so `load_model("transformer", d_model=256, n_layers=6, n_heads=8, d_ff=1024)` builds a larger variant.
Every built-in carries what an exporter needs to describe and feed it without knowing its class:
`input_specs` (name, dtype, shape with "batch" / "seq" as symbolic dims), `num_classes`, `default_lora_targets`,
and `edgepeft_model` (id, source, config) for the bundle manifest.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

from torch import nn

from ..errors import ConfigError, ModelError

__all__ = ["register_model", "model_names", "load_model", "MODEL_ATTR"]

# The attribute a built-in model carries to say where it came from; the exporter copies it into the manifest.
MODEL_ATTR = "edgepeft_model"

_REGISTRY: dict[str, tuple[type[nn.Module], type]] = {}
_M = TypeVar("_M", bound=type)


def register_model(name: str, config_cls: type) -> Callable[[_M], _M]:
    """Class decorator: register a model class built as `cls(config_cls(**kwargs))` under `name`."""

    def decorate(cls: _M) -> _M:
        if name in _REGISTRY:
            raise TypeError(f"model name {name!r} is already registered to {_REGISTRY[name][0].__name__}")
        _REGISTRY[name] = (cls, config_cls)
        return cls

    return decorate


def model_names() -> list[str]:
    """Names of the built-in models, sorted."""
    return sorted(_REGISTRY)


def load_model(name_or_module: str | nn.Module, **kwargs: Any) -> nn.Module:
    """A built-in model by name, in eval mode; a module passed in is returned as is.

    Built-ins come back in eval mode: they have no dropout, and BatchNorm statistics are part of the frozen base
    model, so fine-tuning must not update them.
    """
    if isinstance(name_or_module, nn.Module):
        if kwargs:
            raise ConfigError(f"keyword arguments {sorted(kwargs)} only configure built-in models; drop them or pass a name")
        return name_or_module
    if not isinstance(name_or_module, str) or name_or_module not in _REGISTRY:
        raise ModelError(
            f"unknown model {name_or_module!r}; built-in models: {', '.join(model_names())} "
            "(or pass your own torch.nn.Module)"
        )
    cls, config_cls = _REGISTRY[name_or_module]
    fields = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ConfigError(f"model {name_or_module!r} has no option(s) {unknown}; its options are {fields}")
    config = config_cls(**kwargs)
    model = cls(config).eval()
    setattr(model, MODEL_ATTR, {"id": name_or_module, "source": "builtin", "config": dataclasses.asdict(config)})
    return model
