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
from .adapters import AdapterConfig, AdapterLayer
from .bitfit import BitFitConfig
from .dora import DoRAConfig, DoRALinear
from .head import TrainHeadConfig
from .ia3 import IA3Config, IA3Linear
from .lora import LoRAConfig, LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear, lora_layers
from .lora_fa import LoRAFAConfig
from .prefix_tuning import KVPrefix, PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig, SoftPrompt
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
    "DoRAConfig",
    "DoRALinear",
    "LoRAFAConfig",
    "IA3Config",
    "IA3Linear",
    "AdapterConfig",
    "AdapterLayer",
    "PromptTuningConfig",
    "SoftPrompt",
    "PrefixTuningConfig",
    "KVPrefix",
    "trainable_parameters",
    "print_trainable_parameters",
    "format_trainable_parameters",
]
