"""IA3: output scaling (keys, values) or input scaling (feed-forward) by learned vectors, starting at ones."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import edgepeft
from edgepeft.errors import ConfigError
from edgepeft.methods import IA3Linear

SMALL = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16, num_classes=5)


def _transformer(**kw):
    torch.manual_seed(0)
    model = edgepeft.load_model("transformer", **SMALL)
    return model, copy.deepcopy(model), edgepeft.apply(model, edgepeft.IA3Config(**kw))


def test_ia3_defaults_scale_keys_values_and_the_ffn_input():
    model, ref, _ = _transformer()
    attn, ffn = model.layers[0].attn, model.layers[0].ffn
    assert isinstance(attn.key, IA3Linear) and not attn.key.feedforward and attn.key.ia3_l.shape == (32,)
    assert isinstance(ffn.fc2, IA3Linear) and ffn.fc2.feedforward and ffn.fc2.ia3_l.shape == (64,)
    assert not isinstance(attn.query, IA3Linear)
    batch = edgepeft.make_example_batch(model, 3, 7)
    torch.testing.assert_close(model(**batch), ref(**batch), rtol=0, atol=0)
    assert model.edgepeft_methods[0]["config"]["feedforward_modules"] == ["fc2"]


def test_ia3_forward_and_merge():
    model, ref, _ = _transformer()
    key, fc2 = model.layers[0].attn.key, model.layers[0].ffn.fc2
    with torch.no_grad():
        key.ia3_l.uniform_(0.5, 1.5)
        fc2.ia3_l.uniform_(0.5, 1.5)
    x, h = torch.randn(2, 5, 32), torch.randn(2, 5, 64)
    base_key, base_fc2 = ref.layers[0].attn.key, ref.layers[0].ffn.fc2
    torch.testing.assert_close(key(x), base_key(x) * key.ia3_l)  # the bias is scaled too, as in PEFT
    torch.testing.assert_close(fc2(h), base_fc2(h * fc2.ia3_l))
    torch.testing.assert_close(F.linear(h, fc2.merged_weight(), base_fc2.bias), fc2(h), rtol=1e-5, atol=1e-6)
    before = key(x)
    key.merge()
    torch.testing.assert_close(key(x), before, rtol=1e-5, atol=1e-6)
    key.unmerge()
    torch.testing.assert_close(key.base_layer.weight, base_key.weight, rtol=1e-5, atol=1e-6)


def test_ia3_target_selection_and_errors():
    model, _, _ = _transformer(target_modules=["value"], feedforward_modules=[], layers_to_transform=[1])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["layers.1.attn.value.ia3_l"]
    with pytest.raises(ConfigError, match="feedforward_modules pattern 'fc1' matches none of the targets"):
        _transformer(target_modules=["key"], feedforward_modules=["fc1"])
    with pytest.raises(ConfigError, match="ia3: target_modules is required for MLPClassifier .*default_ia3_targets"):
        edgepeft.apply(edgepeft.load_model("mlp"), edgepeft.IA3Config())
