"""LoRA layers: identity at init, forward = base + scaling * B A x, exact merge / unmerge, for each layer type."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgepeft
from edgepeft.errors import ModelError
from edgepeft.methods import LoRAConv, LoRAEmbedding, LoRALinear, lora_layers


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 5, 3, padding=2, dilation=2)
        self.c2 = nn.Conv2d(3, 6, 3, stride=2, padding=1)


class Embeds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)


def _mlp_with_lora(**kw) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = edgepeft.load_model("mlp")
    ref = copy.deepcopy(model)
    edgepeft.apply(model, edgepeft.LoRAConfig(target_modules=["fc1"], **kw))
    return model, ref


def test_linear_lora_starts_as_the_base_model():
    model, ref = _mlp_with_lora(r=4, alpha=8)
    x = torch.randn(5, 64)
    assert isinstance(model.fc1, LoRALinear)
    assert model.fc1.lora_A.shape == (4, 64) and model.fc1.lora_B.shape == (128, 4)
    assert torch.count_nonzero(model.fc1.lora_B) == 0
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_lora_A_init_is_kaiming_uniform_with_a_sqrt5():
    model, _ = _mlp_with_lora(r=16)
    bound = 1 / math.sqrt(64)  # gain sqrt(2 / (1 + 5)) * sqrt(3 / fan_in) == 1 / sqrt(fan_in)
    a = model.fc1.lora_A
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.9 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound  # std of U(-b, b) is b / sqrt(3)


def test_linear_forward_equals_base_plus_scaled_BAx():
    model, ref = _mlp_with_lora(r=4, alpha=8)
    with torch.no_grad():
        model.fc1.lora_B.normal_()
    x = torch.randn(3, 64)
    A, B = model.fc1.lora_A.detach(), model.fc1.lora_B.detach()
    h = x @ ref.fc1.weight.T + ref.fc1.bias + 2.0 * (x @ A.T) @ B.T
    expected = ref.head(torch.relu(ref.fc2(F.gelu(h))))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


def test_rslora_scales_by_alpha_over_sqrt_r():
    model, _ = _mlp_with_lora(r=4, alpha=8, use_rslora=True)
    assert model.fc1.scaling == 4.0
    model, _ = _mlp_with_lora(r=4, alpha=8)
    assert model.fc1.scaling == 2.0


def test_linear_merge_unmerge_round_trip():
    model, ref = _mlp_with_lora(r=4, alpha=8)
    layer = model.fc1
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    before = model(x).detach()
    expected_weight = ref.fc1.weight + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(layer.merged_weight(), expected_weight, rtol=0, atol=1e-6)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.merged_weight(), expected_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    with pytest.raises(ModelError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), ref.fc1.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    with pytest.raises(ModelError, match="not merged"):
        layer.unmerge()


def test_conv_lora_shapes_forward_and_merge():
    torch.manual_seed(0)
    model = Convs()
    ref = copy.deepcopy(model)
    edgepeft.apply(model, edgepeft.LoRAConfig(r=3, alpha=6, target_modules=["c1", "c2"]))
    assert isinstance(model.c1, LoRAConv) and isinstance(model.c2, LoRAConv)
    assert model.c1.lora_A.shape == (3, 4, 3) and model.c1.lora_B.shape == (5, 3, 1)
    assert model.c2.lora_A.shape == (3, 3, 3, 3) and model.c2.lora_B.shape == (6, 3, 1, 1)
    x1, x2 = torch.randn(2, 4, 11), torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(model.c1(x1), ref.c1(x1), rtol=0, atol=0)
    torch.testing.assert_close(model.c2(x2), ref.c2(x2), rtol=0, atol=0)
    with torch.no_grad():
        model.c1.lora_B.normal_()
        model.c2.lora_B.normal_()
    # Independent of the two-conv forward: one conv with the update written out as an einsum over the rank.
    for name, x, conv in (("c1", x1, F.conv1d), ("c2", x2, F.conv2d)):
        layer, base = getattr(model, name), getattr(ref, name)
        B = layer.lora_B.detach().flatten(1)
        delta = 2.0 * torch.einsum("or,ri...->oi...", B, layer.lora_A.detach())
        expected = base(x) + conv(x, delta, None, base.stride, base.padding, base.dilation)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.merged_weight(), base.weight + delta, rtol=0, atol=1e-6)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight.detach(), base.weight, rtol=0, atol=1e-6)


def test_embedding_lora_lookup_and_merge():
    torch.manual_seed(0)
    model = Embeds()
    ref = copy.deepcopy(model)
    edgepeft.apply(model, edgepeft.LoRAConfig(r=2, alpha=4, target_modules="emb"))
    layer = model.emb
    assert isinstance(layer, LoRAEmbedding)
    assert layer.lora_A.shape == (2, 20) and layer.lora_B.shape == (6, 2)
    ids = torch.tensor([[0, 3, 19], [7, 7, 1]])
    # PEFT's embedding init: A = 0, B random; the update is still zero.
    assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) > 0
    torch.testing.assert_close(layer(ids), ref.emb(ids), rtol=0, atol=0)
    with torch.no_grad():
        layer.lora_A.normal_()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    expected = ref.emb.weight[ids] + 2.0 * (B @ A[:, ids.flatten()]).T.reshape(2, 3, 6)
    torch.testing.assert_close(layer(ids), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.merged_weight(), ref.emb.weight + 2.0 * (B @ A).T, rtol=0, atol=1e-6)
    layer.merge()
    torch.testing.assert_close(layer(ids), expected, rtol=0, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), ref.emb.weight, rtol=0, atol=1e-6)


def test_only_lora_tensors_train_and_get_gradients():
    model, _ = _mlp_with_lora(r=4)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["fc1.lora_A", "fc1.lora_B"]
    assert "fc1.base_layer.weight" in dict(model.named_parameters())
    with torch.no_grad():
        model.fc1.lora_B.normal_()
    F.cross_entropy(model(torch.randn(4, 64)), torch.tensor([0, 1, 2, 3])).backward()
    with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    assert with_grad == ["fc1.lora_A", "fc1.lora_B"]
    assert model.fc1.lora_A.grad.abs().sum() > 0


def test_lora_follows_base_dtype_and_lists_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    edgepeft.apply(model, edgepeft.LoRAConfig(r=2, target_modules=["0", "2"]))
    assert model[0].lora_A.dtype == torch.float64
    assert [n for n, _ in lora_layers(model)] == ["0", "2"]
    assert model(torch.randn(2, 3, dtype=torch.float64)).shape == (2, 2)
