"""Write a Flower App directory (what `flwr run` packs into a FAB) for a real SuperLink and real SuperNodes.

The directory holds the same two apps the simulation runs:
- `fleet_client.py`: a verbatim copy of `edgepeft/fleet/client_app.py`. It imports only numpy, flwr and
  device_runtime, so a device needs no torch and no host package; its node config names the bundle and data.
- `fleet_server.py`: one line importing `edgepeft.fleet.server_app.app` (the server is a host with edgepeft).
- `pyproject.toml`: the FAB's metadata, components and run config (bundle path on the server, rounds, steps, ...).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Union

from device_runtime.atomic_io import staged_dir

from .server_app import FleetConfig

__all__ = ["write_flower_app"]

_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgepeft-fleet"
version = "0.1.0"
description = "Federated LoRA/BitFit adapters on edgepeft bundles: device_runtime clients, robust FedAvg server"
license = "Apache-2.0"
dependencies = ["flwr=={flwr}"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgepeft"

[tool.flwr.app.components]
serverapp = "fleet_server:app"
clientapp = "fleet_client:app"

[tool.flwr.app.config]
{config}
"""


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_flower_app(out_dir: Union[str, Path], server_bundle_dir: Union[str, Path],
                     config: FleetConfig = FleetConfig(), adapter_out: Union[str, Path, None] = None) -> Path:
    """Write the app directory atomically; `server_bundle_dir` is the bundle's path on the SuperLink's host."""
    import importlib.metadata

    run_config = {"bundle-dir": str(Path(server_bundle_dir).resolve()), "num-server-rounds": config.rounds,
                  "local-steps": config.local_steps, "batch-size": config.batch_size, "lr": float(config.lr),
                  "proximal-mu": float(config.proximal_mu), "server-momentum": float(config.server_momentum),
                  "server-lr": float(config.server_lr), "personalize-steps": config.personalize_steps,
                  "fraction-train": float(config.fraction_train), "fraction-evaluate": float(config.fraction_evaluate),
                  "min-clients": config.min_clients, "seed": config.seed}
    # Flower lets `flwr run --run-config` override only the keys the app declares, so every option is written out.
    if config.robust is not None:
        run_config.update({"max-norm-ratio": float(config.robust.max_norm_ratio),
                           "outlier-action": config.robust.outlier_action})
    if config.dp is not None:
        run_config.update({"dp-clip-norm": float(config.dp.clip_norm),
                           "dp-noise-multiplier": float(config.dp.noise_multiplier)})
    if adapter_out is not None:
        run_config["adapter-out"] = str(Path(adapter_out).resolve())
    text = _PYPROJECT.format(flwr=importlib.metadata.version("flwr"),
                             config="\n".join(f"{k} = {_toml_value(v)}" for k, v in run_config.items()))
    out = Path(out_dir)
    with staged_dir(out, marker="pyproject.toml") as staged:
        (staged / "pyproject.toml").write_text(text, encoding="utf-8")
        shutil.copyfile(Path(__file__).with_name("client_app.py"), staged / "fleet_client.py")
        (staged / "fleet_server.py").write_text(
            '"""The fleet\'s ServerApp (runs on the host, where edgepeft is installed)."""\n\n'
            "from edgepeft.fleet import server_app\n\n"
            "app = server_app.app  # an assignment: flwr finds apps by reading the source\n", encoding="utf-8")
    return out
