"""Find the modules a method targets, by PEFT-style name patterns.

A pattern matches a module whose qualified name equals it or ends with "." + it ("query" matches
"layers.0.attn.query" but not "layers.0.attn.my_query"); a pattern starting with "re:" is a regular expression that
must match the whole name. Every method uses this one matcher, so `--target-modules` means the same thing everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError

__all__ = [
    "REGEX_PREFIX",
    "normalize_patterns",
    "normalize_layers",
    "pattern_matches",
    "in_layers",
    "find_targets",
    "resolve_targets",
    "replace_module",
]

REGEX_PREFIX = "re:"
_MAX_NAMES_IN_MESSAGE = 12


def normalize_patterns(value: str | Sequence[str], *, field: str, example: str) -> tuple[str, ...]:
    """Validate patterns for a config's `__post_init__`: a string or a non-empty list of non-empty strings."""
    if value is None:
        patterns: tuple = ()
    elif isinstance(value, str):
        patterns = (value,)
    elif isinstance(value, (list, tuple)):
        patterns = tuple(value)
    else:
        raise ConfigError(f"{field} must be a list of name patterns, got {type(value).__name__}; e.g. {example}")
    if not patterns:
        raise ConfigError(f"{field} is empty; pass at least one module name pattern, e.g. {example}")
    for p in patterns:
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"{field} entries must be non-empty strings, got {p!r}; e.g. {example}")
        if p.startswith(REGEX_PREFIX):
            try:
                re.compile(p[len(REGEX_PREFIX):])
            except re.error as e:
                raise ConfigError(f"{field} regex {p!r} does not compile ({e}); e.g. 're:.*attn\\.(query|value)'") from None
    return patterns


def normalize_layers(value: Sequence[int] | int | None, *, field: str) -> tuple[int, ...] | None:
    """Validate layer indices for a config's `__post_init__`: None, an int, or a non-empty list of ints >= 0."""
    if value is None:
        return None
    layers = (value,) if isinstance(value, int) else tuple(value)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
        raise ConfigError(f"{field} must be None or a non-empty list of ints >= 0, got {value!r}; e.g. [0, 1]")
    return layers


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether `pattern` selects the module called `name` (see the module docstring for the rules)."""
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX):], name) is not None
    return name == pattern or name.endswith("." + pattern)


def in_layers(name: str, layers: Sequence[int] | None) -> bool:
    """Whether `name` lies under one of the numbered blocks `layers` (its name contains ".<idx>.")."""
    if layers is None:
        return True
    dotted = f".{name}."
    return any(f".{i}." in dotted for i in layers)


def _some_names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_IN_MESSAGE])
    more = len(names) - _MAX_NAMES_IN_MESSAGE
    return shown + (f", ... ({more} more)" if more > 0 else "") if names else "(none)"


def find_targets(
    model: nn.Module,
    patterns: Sequence[str],
    *,
    method: str,
    layers: Sequence[int] | None = None,
    supported: tuple[type[nn.Module], ...] | None = None,
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs matched by any pattern, in model order, each once.

    Raises ConfigError when a pattern matches nothing (listing names it could have matched) or, if `supported` is
    given, when it matches a module of another type (a container such as "attn" instead of "attn.query").
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    candidates = [n for n, m in named if supported is None or isinstance(m, supported)]
    found: dict[str, nn.Module] = {}
    for pattern in patterns:
        by_name = [(n, m) for n, m in named if pattern_matches(pattern, n)]
        hits = [(n, m) for n, m in by_name if in_layers(n, layers)]
        if not hits:
            where = f" inside layers {list(layers)}" if by_name else ""
            raise ConfigError(
                f"{method}: target_modules pattern {pattern!r} matches no module{where}; "
                f"modules it could target: {_some_names(candidates)}"
            )
        for n, m in hits:
            if supported is not None and not isinstance(m, supported):
                kinds = ", ".join(t.__name__ for t in supported)
                children = [c for c in candidates if c.startswith(n + ".")]
                hint = f"target its layers instead, e.g. {_some_names(children)}" if children else "pick another pattern"
                raise ConfigError(
                    f"{method}: pattern {pattern!r} matched {n!r}, a {type(m).__name__}, which {method} cannot wrap "
                    f"(supported: {kinds}); {hint}"
                )
            found.setdefault(n, m)
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(found.items(), key=lambda item: order[item[0]])


def resolve_targets(
    model: nn.Module, configured: Sequence[str] | None, *, method: str, example: str, defaults: str | None = None
) -> tuple[str, ...]:
    """The patterns a method targets: `configured`, else the model's own `default_<defaults>_targets` attribute.

    Built-in and Hugging Face models carry defaults per method family (`default_lora_targets`,
    `default_ia3_targets`, ...), so `--method ia3` works without naming layers; other models must name them.
    """
    attribute = f"default_{defaults or method}_targets"
    targets = configured or getattr(model, attribute, None)
    if not targets:
        raise ConfigError(
            f"{method}: target_modules is required for {type(model).__name__} (it has no {attribute}); "
            f"pass e.g. {example}"
        )
    return normalize_patterns(targets, field="target_modules", example=example)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is (how wrappers are injected)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
