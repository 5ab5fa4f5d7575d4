"""PEFT methods: configs, the `apply` verb that puts them on a model, and parameter counts.

Importing this package registers every built-in method, so `method_config_class("lora")` works from the CLI.
"""

from __future__ import annotations

from .base import (
    METHODS_ATTR,
    MethodConfig,
    apply,
    config_from_record,
    config_to_dict,
    method_config_class,
    method_names,
    register_method,
)
from .bitfit import BitFitConfig
from .head import TrainHeadConfig
from .lora import LoRAConfig, LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear, lora_layers
from .summary import format_trainable_parameters, print_trainable_parameters, trainable_parameters

__all__ = [
    "METHODS_ATTR",
    "MethodConfig",
    "apply",
    "config_from_record",
    "config_to_dict",
    "method_config_class",
    "method_names",
    "register_method",
    "BitFitConfig",
    "TrainHeadConfig",
    "LoRAConfig",
    "LoRALayer",
    "LoRALinear",
    "LoRAConv",
    "LoRAEmbedding",
    "lora_layers",
    "trainable_parameters",
    "print_trainable_parameters",
    "format_trainable_parameters",
]
