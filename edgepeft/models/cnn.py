"""`cnn`: two conv + BatchNorm blocks and a linear head over 1x8x8 digit images.

BatchNorm is meant to run in eval mode (`load_model` returns the model that way): its running statistics are part
of the frozen base, and a device batch of a few samples would give useless batch statistics anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import check_positive_int
from .registry import register_model

__all__ = ["CNNConfig", "CNNClassifier"]


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1
    image_size: int = 8
    conv1_channels: int = 16
    conv2_channels: int = 32
    num_classes: int = 10

    def __post_init__(self) -> None:
        check_positive_int("in_channels", self.in_channels, "1 fits grey-scale digits")
        check_positive_int("image_size", self.image_size, "8 fits the 8x8 digits")
        check_positive_int("conv1_channels", self.conv1_channels, "16 is the default")
        check_positive_int("conv2_channels", self.conv2_channels, "32 is the default")
        check_positive_int("num_classes", self.num_classes, "10 fits the digits")


@register_model("cnn", CNNConfig)
class CNNClassifier(nn.Module):
    """x [batch, C, H, W] -> (conv3x3 -> BN -> ReLU) x2 -> mean over H, W -> head -> logits [batch, num_classes]."""

    default_lora_targets = ("conv1", "conv2")

    def __init__(self, config: CNNConfig = CNNConfig()):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(config.in_channels, config.conv1_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(config.conv1_channels)
        self.conv2 = nn.Conv2d(config.conv1_channels, config.conv2_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(config.conv2_channels)
        self.head = nn.Linear(config.conv2_channels, config.num_classes)
        self.num_classes = config.num_classes
        size = config.image_size
        self.input_specs = [{"name": "x", "dtype": "float32", "shape": ["batch", config.in_channels, size, size]}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        # Global average pooling written as a mean: one plain op in the exported graph.
        return self.head(h.mean(dim=(2, 3)))
