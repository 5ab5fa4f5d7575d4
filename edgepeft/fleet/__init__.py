"""Fleet personalization on Flower: devices train one shared adapter together, then keep a personal one.

`client_app` is the Flower ClientApp (device_runtime only, no torch); `server_app` the ServerApp and its
`AdapterStrategy` (FedAvg over the trainable adapter tensors, FedProx / server momentum, robust screening, DP);
`robust` the screening and DP maths; `partition` non-IID digits fleets; `simulate` runs a fleet on Flower's
simulation engine and reports accuracy and bytes; `flower_app` writes the app directory `flwr run` deploys to a
real SuperLink and SuperNodes (docs/FLEET.md). Needs `pip install edgepeft[fleet]`.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401  (only to fail early with the install hint)
except ImportError as exc:  # pragma: no cover - depends on the installation
    from ..errors import ConfigError

    raise ConfigError("edgepeft.fleet needs Flower: pip install 'edgepeft[fleet]' (flwr[simulation])") from exc

from .flower_app import write_flower_app
from .partition import FLEET_STYLES, ClientData, DigitsFleet, PartitionConfig, partition_digits
from .robust import DPConfig, RobustConfig, gaussian_epsilon, screen_updates
from .server_app import AdapterStrategy, FleetConfig, RoundRecord, make_server_app, message_wire_bytes
from .simulate import SimulationConfig, SimulationReport, simulate_fleet

__all__ = [
    "FLEET_STYLES",
    "AdapterStrategy",
    "ClientData",
    "DPConfig",
    "DigitsFleet",
    "FleetConfig",
    "PartitionConfig",
    "RobustConfig",
    "RoundRecord",
    "SimulationConfig",
    "SimulationReport",
    "gaussian_epsilon",
    "make_server_app",
    "message_wire_bytes",
    "partition_digits",
    "screen_updates",
    "simulate_fleet",
    "write_flower_app",
]
