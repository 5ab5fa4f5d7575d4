"""`edgepeft fleet` argument handling: registered on the main group, bad settings exit with a meaningful code."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepeft.cli import EXIT_CONFIG, EXIT_DATA, main

from ..device_runtime.handmade_bundle import build_bundle


def test_fleet_group_is_registered() -> None:
    result = CliRunner().invoke(main, ["fleet", "--help"])
    assert result.exit_code == 0
    assert "simulate" in result.output and "digits-bundle" in result.output


@pytest.mark.parametrize("args", [["--clients", "0"], ["--rounds", "0"], ["--class-alpha", "-1"],
                                  ["--dp-clip-norm", "-1"], ["--max-norm-ratio", "0.5"],
                                  ["--server-momentum", "1.5"]])
def test_bad_settings_exit_with_the_config_code(tmp_path: Path, args: list[str]) -> None:
    bundle = build_bundle(tmp_path / "bundle").bundle.path
    result = CliRunner().invoke(main, ["fleet", "simulate", str(bundle), *args, "-o", str(tmp_path / "work")])
    assert result.exit_code == EXIT_CONFIG, result.output


def test_a_bundle_that_does_not_take_digits_is_refused_before_any_round(tmp_path: Path) -> None:
    bundle = build_bundle(tmp_path / "bundle").bundle.path  # a handmade bundle whose input is not a flattened 8x8 digit
    result = CliRunner().invoke(main, ["fleet", "simulate", str(bundle), "-o", str(tmp_path / "work")])
    assert result.exit_code == EXIT_DATA, result.output
    assert "digits-bundle" in result.output
