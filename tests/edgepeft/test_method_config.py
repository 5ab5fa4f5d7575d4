"""Method configs: validation messages, JSON records, the registry and `apply`'s bookkeeping."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import edgepeft
from edgepeft.errors import ConfigError, EdgePeftError
from edgepeft.methods import config_from_record, method_config_class, method_names


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"rank must be an integer >= 1, got 0; pass --rank 8"),
        ({"r": True}, r"rank must be an integer >= 1, got True"),
        ({"r": 2.5}, r"rank must be an integer >= 1, got 2.5"),
        ({"alpha": 0}, r"alpha must be a finite number > 0, got 0"),
        ({"alpha": float("inf")}, r"alpha must be a finite number > 0"),
        ({"dropout": 0.1}, r"dropout must be 0.0, got 0.1; .*train step random"),
        ({"target_modules": []}, r"target_modules is empty"),
        ({"target_modules": ["fc1", ""]}, r"non-empty strings"),
        ({"target_modules": ["re:(fc"]}, r"regex 're:\(fc' does not compile"),
        ({"layers_to_transform": [-1]}, r"layers_to_transform must be .* ints >= 0"),
        ({"layers_to_transform": []}, r"layers_to_transform must be"),
        ({"use_rslora": 1}, r"use_rslora must be True or False"),
    ],
)
def test_lora_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        edgepeft.LoRAConfig(**kwargs)


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError):
        edgepeft.LoRAConfig(r=0)
    assert issubclass(ConfigError, EdgePeftError)


def test_configs_are_frozen_and_normalised():
    config = edgepeft.LoRAConfig(target_modules="fc1", layers_to_transform=2)
    assert config.target_modules == ("fc1",) and config.layers_to_transform == (2,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 4  # type: ignore[misc]
    assert edgepeft.BitFitConfig(target_modules=["fc1"]).target_modules == ("fc1",)
    with pytest.raises(ConfigError, match="include_norm must be True or False"):
        edgepeft.BitFitConfig(include_norm="yes")  # type: ignore[arg-type]
    for empty in ([], None, ""):
        with pytest.raises(ConfigError, match="target_modules is empty|non-empty strings"):
            edgepeft.TrainHeadConfig(target_modules=empty)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a list of name patterns, got int"):
        edgepeft.LoRAConfig(target_modules=5)  # type: ignore[arg-type]


def test_registry_knows_builtin_methods():
    assert method_names() == ["adapter", "bitfit", "dora", "ia3", "lora", "lora_fa", "prefix_tuning",
                              "prompt_tuning", "train_head"]
    assert method_config_class("lora") is edgepeft.LoRAConfig
    with pytest.raises(ConfigError, match="unknown method 'loha'; known methods: adapter, bitfit, dora, ia3, lora"):
        method_config_class("loha")


def test_apply_records_json_configs_across_calls():
    torch.manual_seed(0)
    model = edgepeft.load_model("mlp")
    edgepeft.apply(model, edgepeft.LoRAConfig(r=4, use_rslora=True))
    edgepeft.apply(model, edgepeft.BitFitConfig(), edgepeft.TrainHeadConfig())
    records = json.loads(json.dumps(model.edgepeft_methods))
    assert records == [
        {"name": "lora", "config": {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["fc1", "fc2"],
                                    "layers_to_transform": None, "use_rslora": True}},
        {"name": "bitfit", "config": {"include_norm": False, "target_modules": None}},
        {"name": "train_head", "config": {"target_modules": ["head"]}},
    ]
    rebuilt = [config_from_record(r) for r in records]
    assert rebuilt[0] == edgepeft.LoRAConfig(r=4, use_rslora=True, target_modules=["fc1", "fc2"])
    assert rebuilt[1:] == [edgepeft.BitFitConfig(), edgepeft.TrainHeadConfig()]
    with pytest.raises(ConfigError, match=r"LoRAConfig has no field\(s\) \['rank'\]"):
        config_from_record({"name": "lora", "config": {"rank": 4}})


def test_apply_rejects_bad_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="at least one method config"):
        edgepeft.apply(model)
    with pytest.raises(ConfigError, match="takes method configs, got dict"):
        edgepeft.apply(model, {"r": 8})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="torch.nn.Module first"):
        edgepeft.apply("mlp", edgepeft.BitFitConfig())  # type: ignore[arg-type]
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen by the failed calls
