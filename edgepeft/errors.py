"""Exceptions raised by edgepeft on purpose; each message names the problem and the fix.

One base class lets a caller (the CLI, a notebook) catch everything we raise deliberately while real bugs still
surface as ordinary Python errors. `ConfigError` is also a `ValueError` so code that already guards against bad
values keeps working.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["EdgePeftError", "ConfigError", "ModelError", "check_positive_int", "check_positive_number"]


class EdgePeftError(Exception):
    """Base of every error edgepeft raises on purpose."""


class ConfigError(EdgePeftError, ValueError):
    """A config value is invalid, or does not fit the model it is applied to."""


class ModelError(EdgePeftError):
    """The model cannot be built, found, or used the way it was asked to be."""


def check_positive_int(field: str, value: Any, fix: str) -> None:
    """Raise ConfigError unless `value` is an int >= 1 (bools are rejected: `True` is not a size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field} must be an integer >= 1, got {value!r}; {fix}")


def check_positive_number(field: str, value: Any, fix: str) -> None:
    """Raise ConfigError unless `value` is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{field} must be a finite number > 0, got {value!r}; {fix}")
