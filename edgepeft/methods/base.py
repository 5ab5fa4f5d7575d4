"""The method protocol, the name -> config registry, and `apply`, the one verb that puts methods on a model.

A method is a frozen config dataclass with a `name` and an `apply_to(model)` that edits the model in place (wraps
layers, flips `requires_grad`). `apply` freezes the model first so that each method only has to say what becomes
trainable; that is what lets methods compose (`apply(model, LoRAConfig(...), BitFitConfig())`). What was applied is
recorded on the model as `model.edgepeft_methods`, which is how the exporter learns it without importing edgepeft.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from torch import nn

from ..errors import ConfigError

__all__ = [
    "MethodConfig",
    "register_method",
    "method_names",
    "method_config_class",
    "config_to_dict",
    "config_from_record",
    "apply",
    "METHODS_ATTR",
]

# The attribute `apply` records on the model; the exporter copies it into the bundle manifest.
METHODS_ATTR = "edgepeft_methods"


@runtime_checkable
class MethodConfig(Protocol):
    """What every method config provides."""

    name: ClassVar[str]

    def apply_to(self, model: nn.Module) -> dict[str, Any]:
        """Edit `model` in place; return the JSON-able config as applied (defaults resolved against the model)."""
        ...


_REGISTRY: dict[str, type] = {}
_C = TypeVar("_C", bound=type)


def register_method(cls: _C) -> _C:
    """Class decorator: make a config class reachable by its `name` (the CLI's `--method lora`)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name` to be registered")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"method name {name!r} is already taken by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def method_names() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def method_config_class(name: str) -> type:
    """The config class registered under `name`; ConfigError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(method_names())}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config's fields as plain JSON types (tuples become lists)."""
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def config_from_record(record: dict[str, Any]) -> Any:
    """Rebuild a config from a `{"name": ..., "config": {...}}` record, e.g. one read back from a manifest."""
    cls = method_config_class(record.get("name", ""))
    fields = record.get("config", {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(known)}")
    return cls(**fields)


def apply(model: nn.Module, *configs: MethodConfig) -> nn.Module:
    """Apply method configs to `model` in order, in place, and return it.

    The first call on a model freezes every parameter, then each config makes its own parameters trainable. Later
    calls do not re-freeze: that would silently undo the earlier methods, and composing across calls should mean
    the same as composing within one. If a config raises, the methods before it stay applied: rebuild the model.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"apply() takes a torch.nn.Module first, got {type(model).__name__}")
    if not configs:
        raise ConfigError("apply() needs at least one method config; e.g. apply(model, LoRAConfig(target_modules=['fc1']))")
    for config in configs:
        if type(config) not in _REGISTRY.values():
            raise ConfigError(
                f"apply() takes method configs, got {type(config).__name__}; "
                f"use one of the configs for: {', '.join(method_names())}"
            )
    records: list[dict[str, Any]] | None = getattr(model, METHODS_ATTR, None)
    if records is None:
        for p in model.parameters():
            p.requires_grad_(False)
        records = []
        setattr(model, METHODS_ATTR, records)
    for config in configs:
        applied = config.apply_to(model)
        records.append({"name": config.name, "config": applied})
    return model
