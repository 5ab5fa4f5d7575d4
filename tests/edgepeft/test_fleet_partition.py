"""The digits fleet: non-IID by class and by handwriting, disjoint, reproducible, written where clients read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_runtime.npz_io import read_npz
from edgepeft.errors import ConfigError
from edgepeft.fleet.client_app import client_data_paths
from edgepeft.fleet.partition import FLEET_STYLES, UNDISTORTED, PartitionConfig, partition_digits


@pytest.fixture(scope="module")
def fleet():  # noqa: ANN201
    return partition_digits(PartitionConfig(num_clients=12, seed=0))


def test_clients_split_the_pool_without_overlap(fleet) -> None:  # noqa: ANN001
    base = fleet.base
    pool_labels = np.concatenate([base.user_train[1], base.user_test[1]])
    client_counts = np.sum([c.class_counts() for c in fleet.clients], axis=0)
    np.testing.assert_array_equal(client_counts, np.bincount(pool_labels, minlength=10))  # every example once
    assert len(fleet.clients) == 12
    for c in fleet.clients:
        assert c.train["x"].shape[1:] == (64,) and c.train["x"].dtype == np.float32
        assert c.train["labels"].dtype == np.int64
        n = len(c.train["labels"]) + len(c.test["labels"])
        assert n >= 20 and len(c.test["labels"]) == int(n * 0.4)


def test_clients_are_skewed_by_class(fleet) -> None:  # noqa: ANN001
    pool = np.sum([c.class_counts() for c in fleet.clients], axis=0) / sum(sum(c.class_counts()) for c in fleet.clients)
    distances = []
    for c in fleet.clients:
        own = np.array(c.class_counts()) / sum(c.class_counts())
        distances.append(0.5 * np.abs(own - pool).sum())  # total variation from the pool's class mix
    assert np.mean(distances) > 0.35  # IID shards of ~75 examples would sit near 0.15
    iid = partition_digits(PartitionConfig(num_clients=12, class_alpha=1000.0, seed=0))
    iid_distances = [0.5 * np.abs(np.array(c.class_counts()) / sum(c.class_counts()) - pool).sum()
                     for c in iid.clients]
    assert np.mean(iid_distances) < 0.5 * np.mean(distances)


def test_clients_write_in_round_robin_styles(fleet) -> None:  # noqa: ANN001
    names = list(FLEET_STYLES)
    assert [c.style for c in fleet.clients] == [names[i % 4] for i in range(12)]
    # the styles really change the images: thickened strokes carry more ink than the base writers' digits
    base_ink = np.mean(fleet.base.base_train[0])
    heavy = [c for c in fleet.clients if c.style == "low-heavy"]
    assert np.mean([c.train["x"].mean() for c in heavy]) > 1.3 * base_ink
    assert UNDISTORTED.apply(fleet.base.base_train[0][:5]).tolist() == fleet.base.base_train[0][:5].tolist()


def test_same_seed_same_fleet_other_seed_other_fleet(fleet) -> None:  # noqa: ANN001
    again = partition_digits(PartitionConfig(num_clients=12, seed=0))
    for a, b in zip(fleet.clients, again.clients):
        np.testing.assert_array_equal(a.train["x"], b.train["x"])
        np.testing.assert_array_equal(a.test["labels"], b.test["labels"])
    other = partition_digits(PartitionConfig(num_clients=12, seed=1))
    assert [c.class_counts() for c in other.clients] != [c.class_counts() for c in fleet.clients]


def test_written_where_the_client_app_reads(fleet, tmp_path: Path) -> None:  # noqa: ANN001
    fleet.write(tmp_path)
    for c in fleet.clients:
        train_path, test_path = client_data_paths(tmp_path, c.client_id)
        train, test = read_npz(train_path), read_npz(test_path)
        np.testing.assert_array_equal(train["x"], c.train["x"])
        np.testing.assert_array_equal(test["labels"], c.test["labels"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"client-{i:03d}" for i in range(12)]
    np.testing.assert_array_equal(fleet.held_out_all()["labels"],
                                  np.concatenate([c.test["labels"] for c in fleet.clients]))


@pytest.mark.parametrize("kwargs", [{"num_clients": 0}, {"class_alpha": 0.0}, {"styles": ("cursive",)},
                                    {"test_fraction": 1.0}, {"min_examples": 1}])
def test_partition_config_refuses_nonsense(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        PartitionConfig(**kwargs)


def test_too_many_clients_for_the_pool_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="fewer clients"):
        partition_digits(PartitionConfig(num_clients=60, min_examples=20))
