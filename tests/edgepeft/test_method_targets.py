"""Target selection: suffix and regex patterns, layers_to_transform, and the errors for bad targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edgepeft
from edgepeft.errors import ConfigError
from edgepeft.methods import lora_layers
from edgepeft.methods.targets import find_targets, in_layers, pattern_matches


def _transformer() -> nn.Module:
    torch.manual_seed(0)
    return edgepeft.load_model("transformer", n_layers=4)


def _lora_names(**kw) -> list[str]:
    model = _transformer()
    edgepeft.apply(model, edgepeft.LoRAConfig(r=2, **kw))
    return [n for n, _ in lora_layers(model)]


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("query", "layers.0.attn.query", True),
        ("attn.query", "layers.0.attn.query", True),
        ("query", "query", True),
        ("query", "layers.0.attn.my_query", False),
        ("uery", "layers.0.attn.query", False),
        ("re:layers\\.\\d\\.attn\\.(query|value)", "layers.3.attn.value", True),
        ("re:attn\\.query", "layers.0.attn.query", False),  # a regex must match the whole name
    ],
)
def test_pattern_rules(pattern, name, expected):
    assert pattern_matches(pattern, name) is expected


def test_in_layers_uses_dotted_indices():
    assert in_layers("layers.1.attn.query", [1])
    assert not in_layers("layers.11.attn.query", [1])
    assert not in_layers("head", [0])
    assert in_layers("head", None)


def test_suffix_patterns_pick_every_layer():
    assert _lora_names(target_modules=["query", "attn.value"]) == [
        f"layers.{i}.attn.{p}" for i in range(4) for p in ("query", "value")
    ]


def test_regex_pattern():
    names = _lora_names(target_modules=["re:layers\\.[02]\\.(attn\\.key|ffn\\.fc1)"])
    assert names == ["layers.0.attn.key", "layers.0.ffn.fc1", "layers.2.attn.key", "layers.2.ffn.fc1"]


def test_layers_to_transform_restricts_to_numbered_blocks():
    names = _lora_names(target_modules=["query", "value"], layers_to_transform=[1, 3])
    assert names == ["layers.1.attn.query", "layers.1.attn.value", "layers.3.attn.query", "layers.3.attn.value"]
    assert _lora_names(target_modules=["fc2"], layers_to_transform=2) == ["layers.2.ffn.fc2"]


def test_default_targets_of_builtin_model():
    assert _lora_names() == [f"layers.{i}.attn.{p}" for i in range(4) for p in ("query", "value")]


def test_pattern_matching_nothing_lists_available_names():
    with pytest.raises(ConfigError, match=r"pattern 'q_proj' matches no module; .*layers\.0\.attn\.query"):
        _lora_names(target_modules=["query", "q_proj"])


def test_pattern_outside_requested_layers_says_so():
    with pytest.raises(ConfigError, match=r"'head' matches no module inside layers \[0\]"):
        _lora_names(target_modules=["head"], layers_to_transform=[0])


def test_matching_a_container_suggests_its_layers():
    with pytest.raises(ConfigError, match=r"matched 'layers\.0\.attn', a SelfAttention.*layers\.0\.attn\.query"):
        _lora_names(target_modules=["attn"])


def test_failed_lora_leaves_model_untouched():
    model = _transformer()
    with pytest.raises(ConfigError):
        edgepeft.apply(model, edgepeft.LoRAConfig(target_modules=["query", "attn"]))
    assert lora_layers(model) == []


def test_second_lora_on_same_layer_is_refused():
    model = _transformer()
    edgepeft.apply(model, edgepeft.LoRAConfig(target_modules=["query"]))
    for targets in (["query"], ["re:.*base_layer"]):
        with pytest.raises(ConfigError, match="already has LoRA"):
            edgepeft.apply(model, edgepeft.LoRAConfig(target_modules=targets))
    edgepeft.apply(model, edgepeft.LoRAConfig(target_modules=["value"]))  # other layers are fine
    assert len(lora_layers(model)) == 8


def test_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="groups=2"):
        edgepeft.apply(model, edgepeft.LoRAConfig(target_modules=["0"]))


def test_custom_model_needs_explicit_targets():
    with pytest.raises(ConfigError, match="target_modules is required for Sequential"):
        edgepeft.apply(nn.Sequential(nn.Linear(2, 2)), edgepeft.LoRAConfig())


def test_find_targets_returns_model_order_once():
    model = _transformer()
    hits = find_targets(model, ["re:layers\\.0\\..*", "query"], method="test", layers=[0])
    names = [n for n, _ in hits]
    assert names[:2] == ["layers.0.attn", "layers.0.attn.query"] and names.count("layers.0.attn.query") == 1
