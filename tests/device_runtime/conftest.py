"""Shared fixtures for the device-runtime tests: handmade bundles written once per session (read-only use)."""

from __future__ import annotations

import pytest
from .handmade_bundle import Handmade, build_bundle

from device_runtime import AdamW


@pytest.fixture(scope="session")
def sgd_bundle(tmp_path_factory: pytest.TempPathFactory) -> Handmade:
    """Plain SGD (lr 0.1, no momentum, no state). Tests must not modify its files; build a fresh one for that."""
    return build_bundle(tmp_path_factory.mktemp("sgd") / "bundle")


@pytest.fixture(scope="session")
def adamw_bundle(tmp_path_factory: pytest.TempPathFactory) -> Handmade:
    """AdamW (lr 0.05, weight decay 0.1) so optimizer state has to survive between steps."""
    return build_bundle(tmp_path_factory.mktemp("adamw") / "bundle", AdamW(lr=0.05, weight_decay=0.1))
