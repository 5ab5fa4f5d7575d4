"""Device profiles: every shipped profile loads, every number has a source, and the arithmetic in them holds."""

from __future__ import annotations

import pytest

from edgepeft.errors import ConfigError
from edgepeft.profiles import load_profile, profile_names, unsourced_numbers

ISSUE_TARGETS = {"rpi4", "rpi5", "rpi-zero2w", "linux-aarch64", "android-qnn", "android-nnapi", "ios-coreml",
                 "android-xnnpack"}


def test_every_target_of_the_issue_has_a_profile() -> None:
    assert ISSUE_TARGETS <= set(profile_names())


@pytest.mark.parametrize("name", profile_names())
def test_profile_loads_with_a_source_for_every_number(name: str) -> None:
    profile = load_profile(name)
    assert unsourced_numbers(profile) == []
    for field, sources in profile["sources"].items():
        assert sources and all(isinstance(s, str) and len(s) > 10 for s in sources), field
    assert profile["cpu"]["cores"] >= 1 and profile["ram_bytes"] >= 256 * 2**20
    assert profile["memory_bandwidth_gbs"] <= profile["memory_bandwidth_theoretical_gbs"]


@pytest.mark.parametrize("name", ["rpi4", "rpi5", "rpi-zero2w", "linux-aarch64"])
def test_cpu_peaks_follow_their_stated_derivation(name: str) -> None:
    """Linux boards: peak = cores x clock x FLOP/cycle, the per-cycle figure written in the estimate."""
    profile = load_profile(name)
    per_cycle = profile["peak_fp32_gflops"] / (profile["cpu"]["cores"] * profile["cpu"]["clock_ghz"])
    assert f"{per_cycle:g} FLOP/cycle" in profile["sources"]["peak_fp32_gflops"][0]


def test_a_number_without_a_source_is_found() -> None:
    profile = {"cpu": {"cores": 4}, "peak_fp32_gflops": 1.0, "sources": {"cpu.cores": ["datasheet x"]}}
    assert unsourced_numbers(profile) == ["peak_fp32_gflops"]


def test_unknown_target_is_refused_with_the_list() -> None:
    with pytest.raises(ConfigError, match="known targets: .*rpi4"):
        load_profile("rpi9")
