"""BitFit and TrainHead: which tensors become trainable, composition with LoRA, and the no-bias error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgepeft
from edgepeft.errors import ConfigError, ModelError


def _trainable(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def _load(name: str) -> nn.Module:
    torch.manual_seed(0)
    return edgepeft.load_model(name)


def test_bitfit_trains_linear_biases_only():
    model = edgepeft.apply(_load("mlp"), edgepeft.BitFitConfig())
    assert _trainable(model) == ["fc1.bias", "fc2.bias", "head.bias"]


def test_bitfit_norms_only_when_asked():
    assert _trainable(edgepeft.apply(_load("cnn"), edgepeft.BitFitConfig())) == ["conv1.bias", "conv2.bias", "head.bias"]
    with_norm = _trainable(edgepeft.apply(_load("cnn"), edgepeft.BitFitConfig(include_norm=True)))
    assert with_norm == ["bn1.bias", "bn2.bias", "conv1.bias", "conv2.bias", "head.bias"]  # BN scales stay frozen


def test_bitfit_target_modules_restricts_search():
    model = edgepeft.apply(_load("transformer"), edgepeft.BitFitConfig(target_modules=["layers.3.attn"], include_norm=True))
    assert _trainable(model) == [f"layers.3.attn.{p}.bias" for p in ("key", "out", "query", "value")]
    with pytest.raises(ConfigError, match="matches no module"):
        edgepeft.apply(_load("mlp"), edgepeft.BitFitConfig(target_modules=["attn"]))


def test_bitfit_without_biases_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    with pytest.raises(ModelError, match="no Linear/Conv biases to train; pass include_norm=True"):
        edgepeft.apply(model, edgepeft.BitFitConfig())
    edgepeft.apply(model, edgepeft.BitFitConfig(include_norm=True))
    assert _trainable(model) == ["1.bias"]


def test_lora_plus_bitfit_compose_in_one_call_and_train_together():
    model = edgepeft.apply(_load("mlp"), edgepeft.LoRAConfig(r=2, target_modules=["fc1"]), edgepeft.BitFitConfig())
    expected = ["fc1.base_layer.bias", "fc1.lora_A", "fc1.lora_B", "fc2.bias", "head.bias"]
    assert _trainable(model) == expected
    with torch.no_grad():
        model.fc1.lora_B.normal_()
    F.cross_entropy(model(torch.randn(6, 64)), torch.arange(6)).backward()
    assert sorted(n for n, p in model.named_parameters() if p.grad is not None) == expected


def test_bitfit_then_lora_across_calls_keeps_both():
    model = edgepeft.apply(_load("mlp"), edgepeft.BitFitConfig())
    edgepeft.apply(model, edgepeft.LoRAConfig(r=2, target_modules=["fc2"]))
    assert _trainable(model) == ["fc1.bias", "fc2.base_layer.bias", "fc2.lora_A", "fc2.lora_B", "head.bias"]


def test_train_head_makes_the_whole_head_trainable():
    model = edgepeft.apply(_load("transformer"), edgepeft.LoRAConfig(r=2), edgepeft.TrainHeadConfig())
    assert _trainable(model) == ["head.bias", "head.weight"] + sorted(
        f"layers.{i}.attn.{p}.lora_{ab}" for i in range(4) for p in ("query", "value") for ab in "AB"
    )
    with pytest.raises(ModelError, match="'1' \\(ReLU\\) has no parameters"):
        edgepeft.apply(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), edgepeft.TrainHeadConfig(target_modules=["1"]))
