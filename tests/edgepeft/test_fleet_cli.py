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


def test_fleet_app_writes_a_flower_app_that_flower_accepts(tmp_path: Path) -> None:
    import tomli
    from flwr.common.config import validate_config

    bundle = build_bundle(tmp_path / "bundle").bundle.path
    out = tmp_path / "app"
    result = CliRunner().invoke(main, ["fleet", "app", str(bundle), "-o", str(out), "--rounds", "7",
                                       "--min-clients", "3", "--adapter-out", str(tmp_path / "global"),
                                       "--dp-clip-norm", "2.5", "--dp-noise-multiplier", "0.7"])
    assert result.exit_code == 0, result.output
    config = tomli.loads((out / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(config, check_module=True, project_dir=out)  # flwr run's own check
    assert valid, errors
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert run_config["bundle-dir"] == str(bundle.resolve()) and run_config["num-server-rounds"] == 7
    assert run_config["min-clients"] == 3 and run_config["adapter-out"] == str((tmp_path / "global").resolve())
    # The device side is the very ClientApp the simulation runs, copied byte for byte (no torch, no edgepeft).
    client = (Path(__file__).resolve().parents[2] / "edgepeft" / "fleet" / "client_app.py").read_bytes()
    assert (out / "fleet_client.py").read_bytes() == client
    from edgepeft.fleet.server_app import FleetConfig

    fleet = FleetConfig.from_run_config(run_config)  # what the ServerApp will read back from the run config
    assert (fleet.rounds, fleet.min_clients, fleet.dp.clip_norm, fleet.dp.noise_multiplier) == (7, 3, 2.5, 0.7)
    assert fleet.robust.max_norm_ratio == 5.0
