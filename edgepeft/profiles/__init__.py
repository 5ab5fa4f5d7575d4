"""Device profiles as data: one JSON file per target (cores, clock, peak throughput, bandwidth, RAM, OS/ABI, wheels).

Every number in a profile has an entry in its `sources` map (keyed by the field's dotted path) naming where it
comes from: a vendor document, a published measurement, or "estimate: <how it was derived>". `load_profile`
refuses a profile whose numbers lack a source, so a new target cannot slip in an unexplained figure.
`ep_ops/` holds the op-support tables for execution providers onnxruntime's mobile checker does not ship.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["PROFILE_DIR", "NUMERIC_FIELDS", "profile_names", "load_profile", "unsourced_numbers"]

PROFILE_DIR = Path(__file__).resolve().parent
# Fields every profile must carry as numbers, each with a source.
NUMERIC_FIELDS = ("cpu.cores", "cpu.clock_ghz", "peak_fp32_gflops", "peak_int8_gops", "memory_bandwidth_gbs",
                  "memory_bandwidth_theoretical_gbs", "ram_bytes")
_REQUIRED = ("id", "name", "kind", "cpu", "os_abi", "runtime", "npu_paths", "sources", *NUMERIC_FIELDS)


def profile_names() -> list[str]:
    """Ids of the shipped device profiles, sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def _get(profile: dict[str, Any], dotted: str) -> Any:
    value: Any = profile
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _numbers(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every numeric leaf (lists of numbers count as one field) outside `sources`."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [prefix]
    if isinstance(value, list):
        return [prefix] if value and all(isinstance(v, (int, float)) for v in value) else []
    if isinstance(value, dict):
        return [p for k, v in value.items() if k != "sources"
                for p in _numbers(v, f"{prefix}.{k}" if prefix else k)]
    return []


def unsourced_numbers(profile: dict[str, Any]) -> list[str]:
    """Numeric fields without a non-empty source list (`ram_variants_gb` shares the source of `ram_bytes`)."""
    sources = profile.get("sources", {})
    aliases = {"ram_variants_gb": "ram_bytes"}
    return [f for f in _numbers(profile)
            if not (sources.get(f) or sources.get(aliases.get(f, "")))]


@lru_cache(maxsize=None)
def _read(name: str) -> str:
    return (PROFILE_DIR / f"{name}.json").read_text(encoding="utf-8")


def load_profile(name: str) -> dict[str, Any]:
    """The profile `name` (e.g. "rpi4") as a dict, validated: required fields present and every number sourced."""
    if name not in profile_names():
        raise ConfigError(f"unknown target {name!r}; known targets: {', '.join(profile_names())}")
    profile = json.loads(_read(name))
    missing = [f for f in _REQUIRED if _get(profile, f) is None]
    if missing:
        raise ConfigError(f"{PROFILE_DIR / name}.json lacks {missing}; every profile needs {list(_REQUIRED)}")
    unsourced = unsourced_numbers(profile)
    if unsourced:
        raise ConfigError(f"{PROFILE_DIR / name}.json has numbers without a source: {unsourced}; add a "
                          "'sources' entry for each (a document, a measurement, or 'estimate: how derived')")
    if profile["id"] != name:
        raise ConfigError(f"{PROFILE_DIR / name}.json says id {profile['id']!r}; the id must match the file name")
    return profile
