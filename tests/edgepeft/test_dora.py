"""DoRA: magnitude x normalized (W + s B A), the norm detached as in PEFT, exact merge / unmerge, Linear only."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import edgepeft
from edgepeft.errors import ConfigError, ModelError
from edgepeft.methods import DoRALinear, LoRALinear, method_config_class


def _mlp(**kw):
    torch.manual_seed(0)
    model = edgepeft.load_model("mlp")
    ref = copy.deepcopy(model)
    edgepeft.apply(model, edgepeft.DoRAConfig(r=4, alpha=8, target_modules=["fc1"], **kw))
    return model, ref


def _trained(layer: DoRALinear) -> None:
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(1.5)


def test_dora_starts_unchanged_with_magnitude_equal_to_row_norms():
    model, ref = _mlp()
    layer = model.fc1
    assert isinstance(layer, DoRALinear) and isinstance(layer, LoRALinear)
    torch.testing.assert_close(layer.lora_magnitude, ref.fc1.weight.norm(dim=1), rtol=0, atol=0)
    x = torch.randn(5, 64)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-6, atol=1e-6)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc1.lora_A", "fc1.lora_B", "fc1.lora_magnitude"]


def test_dora_forward_is_magnitude_times_normalized_direction():
    model, _ = _mlp()
    layer = model.fc1
    _trained(layer)
    x = torch.randn(5, 64)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    direction = w + layer.scaling * layer.lora_B @ layer.lora_A
    expected = F.linear(x, layer.lora_magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True), b)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dora_norm_is_detached_like_peft():
    """The gradient of A, B goes through the numerator only: d/dB of m * (W + sBA)x / c with c constant."""
    model, _ = _mlp()
    layer = model.fc1
    _trained(layer)
    x = torch.randn(3, 64)
    layer(x).sum().backward()
    norm = (layer.base_layer.weight + layer.delta_weight()).norm(dim=1).detach()
    a, b = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_()
    direction = layer.base_layer.weight + layer.scaling * b @ a
    F.linear(x, (layer.lora_magnitude.detach() / norm)[:, None] * direction, layer.base_layer.bias).sum().backward()
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-4, atol=1e-5)


def test_dora_merge_and_unmerge_are_exact():
    model, _ = _mlp()
    layer = model.fc1
    _trained(layer)
    x = torch.randn(4, 64)
    before = layer(x)
    weight = layer.base_layer.weight.clone()
    torch.testing.assert_close(F.linear(x, layer.merged_weight(), layer.base_layer.bias), before, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_dora_wraps_linear_only_and_is_registered():
    assert method_config_class("dora") is edgepeft.DoRAConfig
    model = edgepeft.load_model("cnn")
    with pytest.raises(ConfigError, match="dora: pattern 'conv1' matched 'conv1', a Conv2d, which dora cannot wrap"):
        edgepeft.apply(model, edgepeft.DoRAConfig(target_modules=["conv1"]))
    with pytest.raises(ConfigError, match="rank must be an integer >= 1"):
        edgepeft.DoRAConfig(r=0)
