"""Bottleneck adapters: serial (Houlsby, after the layer) and parallel (beside it), identity at init."""

from __future__ import annotations

import copy

import pytest
import torch

import edgepeft
from edgepeft.errors import ConfigError
from edgepeft.methods import AdapterLayer

SMALL = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16, num_classes=5)


def _model(**kw):
    torch.manual_seed(0)
    model = edgepeft.load_model("transformer", **SMALL)
    ref = copy.deepcopy(model)
    return edgepeft.apply(model, edgepeft.AdapterConfig(**kw)), ref


def test_houlsby_positions_and_identity_at_init():
    model, ref = _model(bottleneck=8)
    layer = model.layers[1]
    assert isinstance(layer.attn.out, AdapterLayer) and isinstance(layer.ffn.fc2, AdapterLayer)
    assert layer.ffn.fc2.adapter_down.weight.shape == (8, 32)  # serial: reads fc2's output (d_model)
    batch = edgepeft.make_example_batch(model, 3, 7)
    torch.testing.assert_close(model(**batch), ref(**batch), rtol=0, atol=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names[:4] == ["layers.0.attn.out.adapter_down.weight", "layers.0.attn.out.adapter_down.bias",
                         "layers.0.attn.out.adapter_up.weight", "layers.0.attn.out.adapter_up.bias"]
    assert len(names) == 16


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_adapter_forward(mode):
    model, ref = _model(bottleneck=4, mode=mode, scaling=2.0, activation="tanh")
    fc2, base = model.layers[0].ffn.fc2, ref.layers[0].ffn.fc2
    with torch.no_grad():
        fc2.adapter_up.weight.normal_()
    h = torch.randn(2, 5, 64)
    reads = base(h) if mode == "serial" else h
    adapter = fc2.adapter_up(torch.tanh(fc2.adapter_down(reads)))
    torch.testing.assert_close(fc2(h), base(h) + 2.0 * adapter)
    assert fc2.adapter_down.in_features == (32 if mode == "serial" else 64)


def test_adapter_config_errors_and_layer_selection():
    with pytest.raises(ConfigError, match="adapter mode must be one of \\['serial', 'parallel'\\]"):
        edgepeft.AdapterConfig(mode="sequential")
    with pytest.raises(ConfigError, match="bottleneck must be an integer >= 1"):
        edgepeft.AdapterConfig(bottleneck=0)
    with pytest.raises(ConfigError, match="activation must be one of"):
        edgepeft.AdapterConfig(activation="swish")
    model, _ = _model(layers_to_transform=1)
    assert {n.split(".adapter")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        "layers.1.attn.out", "layers.1.ffn.fc2"}
