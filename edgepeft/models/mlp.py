"""`mlp`: a three-layer perceptron over flattened 8x8 digit images (sklearn's digits), the smallest built-in."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import check_positive_int
from .registry import register_model

__all__ = ["MLPConfig", "MLPClassifier"]


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 64
    hidden_features: int = 128
    num_classes: int = 10

    def __post_init__(self) -> None:
        check_positive_int("in_features", self.in_features, "64 fits flattened 8x8 digits")
        check_positive_int("hidden_features", self.hidden_features, "128 is the default")
        check_positive_int("num_classes", self.num_classes, "10 fits the digits")


@register_model("mlp", MLPConfig)
class MLPClassifier(nn.Module):
    """x [batch, in] -> fc1 -> GELU -> fc2 -> ReLU -> head -> logits [batch, num_classes]."""

    default_lora_targets = ("fc1", "fc2")

    def __init__(self, config: MLPConfig = MLPConfig()):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.in_features, config.hidden_features)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(config.hidden_features, config.hidden_features)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(config.hidden_features, config.num_classes)
        self.num_classes = config.num_classes
        self.input_specs = [{"name": "x", "dtype": "float32", "shape": ["batch", config.in_features]}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))
