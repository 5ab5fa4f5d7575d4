"""Non-IID fleets from scikit-learn's digits: every client skewed by class (Dirichlet) and by handwriting style.

The digits are split once (`load_digits_splits`, undistorted): the base writers pretrain the shared model, the rest
is the fleet's pool. Per class, a Dirichlet(alpha) draw decides what share of that class each client gets, so with
alpha 0.5 most clients hold a few classes in bulk and others barely; clients then write in one of the `FLEET_STYLES`
(round-robin), each a `UserStyle` the base model reads badly. Each client keeps `test_fraction` of its examples
as held-out data. Everything is drawn from one seeded generator: the same config gives the same fleet anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from device_runtime.atomic_io import atomic_write_file

from ..data.digits import DigitsSplits, UserStyle, load_digits_splits
from ..errors import ConfigError, check_positive_int, check_positive_number
from .client_app import client_data_paths

__all__ = ["FLEET_STYLES", "ClientData", "DigitsFleet", "PartitionConfig", "concat_arrays", "partition_digits"]

UNDISTORTED = UserStyle(shift_right=0, shift_down=0, thicken=0.0, shear=0.0)

# Base-model accuracy on each style (mlp pretrained on the base writers): about 35%, 39%, 19% and 34%.
FLEET_STYLES: dict[str, UserStyle] = {
    "slant-bold": UserStyle(),  # the quickstart user: sheared right, thicker strokes
    "backslant": UserStyle(shift_right=1, shear=-0.3, thicken=0.0),
    "low-heavy": UserStyle(shift_down=1, thicken=0.8, shear=0.0),
    "right-bold": UserStyle(shift_right=1, thicken=0.6, shear=0.0),
}


@dataclass(frozen=True)
class PartitionConfig:
    """How to split the pool. Lower `class_alpha` means more class skew per client."""

    num_clients: int = 12
    class_alpha: float = 0.5
    styles: tuple[str, ...] = tuple(FLEET_STYLES)
    test_fraction: float = 0.4
    min_examples: int = 20
    pool_fraction: float = 0.5  # share of the digits kept from pretraining, for the fleet
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("num_clients", self.num_clients, "e.g. 12")
        check_positive_number("class_alpha", self.class_alpha, "0.5 gives a strong class skew, 100 nearly none")
        unknown = [s for s in self.styles if s not in FLEET_STYLES]
        if not self.styles or unknown:
            raise ConfigError(f"styles must name some of {list(FLEET_STYLES)}, got {list(self.styles)}")
        for name, value in (("test_fraction", self.test_fraction), ("pool_fraction", self.pool_fraction)):
            if isinstance(value, bool) or not isinstance(value, float) or not 0.0 < value < 1.0:
                raise ConfigError(f"{name} must be a float in (0, 1), got {value!r}")
        check_positive_int("min_examples", self.min_examples, "20 leaves a few examples to train and to hold out")
        if self.min_examples < 2:
            raise ConfigError("min_examples must be >= 2: one to train on and one to hold out")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class ClientData:
    """One client's examples, as the MLP bundle's named arrays (`x` [n, 64] float32, `labels` [n] int64)."""

    client_id: int
    style: str
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]

    def class_counts(self) -> list[int]:
        labels = np.concatenate([self.train["labels"], self.test["labels"]])
        return np.bincount(labels, minlength=10).tolist()


@dataclass(frozen=True)
class DigitsFleet:
    """The base writers (for pretraining) and the clients drawn from the rest."""

    base: DigitsSplits
    clients: tuple[ClientData, ...]
    config: PartitionConfig = field(default_factory=PartitionConfig)

    def held_out_all(self) -> dict[str, np.ndarray]:
        """Every client's held-out examples together: what "the whole fleet" means in the reports."""
        return concat_arrays([c.test for c in self.clients])

    def write(self, data_dir: Union[str, Path]) -> Path:
        """Write `client-<id>/{train,test}.npz` under `data_dir` (atomically each), where the ClientApp reads them."""
        root = Path(data_dir)
        for client in self.clients:
            for path, arrays in zip(client_data_paths(root, client.client_id), (client.train, client.test)):
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_file(path, lambda tmp, a=arrays: _savez(tmp, a))
        return root


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
        np.savez(f, **arrays)


def concat_arrays(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _as_arrays(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": images.reshape(len(images), -1).astype(np.float32), "labels": labels.astype(np.int64)}


def _dirichlet_split(labels: np.ndarray, config: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, Dirichlet shares of its examples to each client; redrawn until every client has enough."""
    for _ in range(200):
        owners: list[list[int]] = [[] for _ in range(config.num_clients)]
        for label in range(int(labels.max()) + 1):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet([config.class_alpha] * config.num_clients)
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                owners[client].extend(part.tolist())
        if min(len(o) for o in owners) >= config.min_examples:
            return [np.array(o, dtype=np.int64) for o in owners]
    raise ConfigError(f"could not give each of {config.num_clients} clients {config.min_examples} examples from "
                      f"{len(labels)} with class_alpha={config.class_alpha}; use fewer clients, a lower "
                      "min_examples or a larger class_alpha")


def partition_digits(config: PartitionConfig = PartitionConfig()) -> DigitsFleet:
    """Build the fleet: base writers for pretraining, and `num_clients` non-IID clients from the remaining digits."""
    base = load_digits_splits(user_style=UNDISTORTED, user_fraction=config.pool_fraction, seed=config.seed)
    images = np.concatenate([base.user_train[0], base.user_test[0]])
    labels = np.concatenate([base.user_train[1], base.user_test[1]])
    rng = np.random.default_rng([config.seed, 7])
    clients = []
    for client_id, owned in enumerate(_dirichlet_split(labels, config, rng)):
        owned = rng.permutation(owned)
        style = config.styles[client_id % len(config.styles)]
        styled = FLEET_STYLES[style].apply(images[owned])
        held = min(len(owned) - 1, max(1, int(math.floor(len(owned) * config.test_fraction))))
        train = _as_arrays(styled[held:], labels[owned][held:])
        test = _as_arrays(styled[:held], labels[owned][:held])
        clients.append(ClientData(client_id, style, train, test))
    return DigitsFleet(base, tuple(clients), config)
