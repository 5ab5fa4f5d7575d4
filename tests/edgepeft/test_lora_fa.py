"""LoRA-FA: LoRA whose A stays frozen at its random init; only B trains."""

from __future__ import annotations

import torch

import edgepeft
from edgepeft.methods import LoRALinear, method_config_class


def test_lora_fa_freezes_a_and_trains_b_only():
    torch.manual_seed(0)
    model = edgepeft.apply(edgepeft.load_model("mlp"), edgepeft.LoRAFAConfig(r=4, alpha=8))
    assert method_config_class("lora_fa") is edgepeft.LoRAFAConfig
    assert isinstance(model.fc1, LoRALinear)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc1.lora_B", "fc2.lora_B"]
    assert torch.count_nonzero(model.fc1.lora_A) == model.fc1.lora_A.numel()  # random, not zero: it projects
    assert model.edgepeft_methods[0]["name"] == "lora_fa"
    assert model.edgepeft_methods[0]["config"]["target_modules"] == ["fc1", "fc2"]


def test_lora_fa_gradient_of_b_uses_the_frozen_projection():
    torch.manual_seed(0)
    model = edgepeft.apply(edgepeft.load_model("mlp"), edgepeft.LoRAFAConfig(r=4, alpha=8, target_modules=["fc1"]))
    x = torch.randn(3, 64)
    model.fc1(x).sum().backward()
    assert model.fc1.lora_A.grad is None
    expected = model.fc1.scaling * torch.ones(3, 128).T @ (x @ model.fc1.lora_A.T)
    torch.testing.assert_close(model.fc1.lora_B.grad, expected, rtol=1e-5, atol=1e-5)


def test_lora_fa_on_the_top_block_only():
    torch.manual_seed(0)
    model = edgepeft.load_model("transformer", n_layers=3)
    edgepeft.apply(model, edgepeft.LoRAFAConfig(layers_to_transform=[2]))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "layers.2.attn.query.lora_B", "layers.2.attn.value.lora_B"]
