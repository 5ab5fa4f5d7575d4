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


@pytest.fixture(scope="session")
def exported_mlp(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real bundle: the built-in mlp with LoRA (fc1, fc2) + BitFit exported by the ONNX exporter (~6 s, once).

    Read-only like the handmade ones: copy it (shutil.copytree) before damaging it.
    """
    import torch

    import edgepeft
    from exporters.onnx import export

    torch.manual_seed(0)
    model = edgepeft.load_model("mlp")
    edgepeft.apply(model, edgepeft.LoRAConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]), edgepeft.BitFitConfig())
    example = edgepeft.make_example_batch(model, batch_size=3)
    return export(model, example, out=tmp_path_factory.mktemp("mlp") / "bundle",
                  optimizer=AdamW(lr=1e-2, weight_decay=0.0))
