"""Prefix tuning: learned keys and values every query attends to, in chosen attention layers."""

from __future__ import annotations

import copy

import pytest
import torch

import edgepeft
from edgepeft.errors import ConfigError, ModelError
from edgepeft.methods import KVPrefix

SMALL = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_len=16, num_classes=5)


def test_prefix_slots_filled_per_layer_selection():
    torch.manual_seed(0)
    model = edgepeft.apply(edgepeft.load_model("transformer", **SMALL),
                           edgepeft.PrefixTuningConfig(num_virtual_tokens=4, layers_to_transform=[1, 2]))
    assert model.layers[0].attn.kv_prefix is None and isinstance(model.layers[2].attn.kv_prefix, KVPrefix)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "layers.1.attn.kv_prefix.key", "layers.1.attn.kv_prefix.value",
        "layers.2.attn.kv_prefix.key", "layers.2.attn.kv_prefix.value"]
    assert model.edgepeft_methods[0]["config"]["target_modules"] == ["layers.1.attn", "layers.2.attn"]


def test_prefix_attention_equals_attention_over_prepended_keys():
    torch.manual_seed(0)
    model = edgepeft.load_model("transformer", **SMALL)
    attn = model.layers[0].attn
    plain = copy.deepcopy(attn)
    edgepeft.apply(model, edgepeft.PrefixTuningConfig(num_virtual_tokens=2, layers_to_transform=[0]))
    prefix = attn.kv_prefix
    x = torch.randn(2, 5, 32)
    bias = torch.zeros(2, 1, 1, 5)
    bias[1, ..., 3:] = -1e9  # row 1 has two padded tokens; prefixes stay visible to it
    q = plain.query(x).reshape(2, 5, 4, 8).transpose(1, 2)
    k = torch.cat([prefix.key.expand(2, -1, -1), plain.key(x)], 1).reshape(2, 7, 4, 8).transpose(1, 2)
    v = torch.cat([prefix.value.expand(2, -1, -1), plain.value(x)], 1).reshape(2, 7, 4, 8).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / 8 ** 0.5 + torch.cat([torch.zeros(2, 1, 1, 2), bias], -1)
    expected = plain.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x, bias), expected, rtol=1e-5, atol=1e-6)


def test_prefix_tuning_errors():
    with pytest.raises(ModelError, match="no attention module with a kv_prefix slot"):
        edgepeft.apply(edgepeft.load_model("mlp"), edgepeft.PrefixTuningConfig())
    model = edgepeft.load_model("transformer", **SMALL)
    with pytest.raises(ConfigError, match=r"\['layers.0.ffn'\] have no kv_prefix slot"):
        edgepeft.apply(model, edgepeft.PrefixTuningConfig(target_modules=["layers.0.ffn"]))
    edgepeft.apply(model, edgepeft.PrefixTuningConfig(target_modules=["layers.0.attn"]))
    with pytest.raises(ConfigError, match="already has a prefix"):
        edgepeft.apply(model, edgepeft.PrefixTuningConfig())
