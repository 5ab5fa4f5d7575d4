"""edgepeft: put PEFT methods on a small torch model and export its train step for on-device fine-tuning.

The host API reads like torchao's one-verb style: `model = load_model("mlp")`,
`apply(model, LoRAConfig(r=8, target_modules=["fc1"]))`, then hand the model to an exporter. Kept import-light:
torch, and the optimizer specs that belong to the bundle format; nothing from onnx.
"""

from __future__ import annotations

from device_runtime.optim_spec import SGD, AdamW

from .errors import ConfigError, EdgePeftError, ModelError
from .methods import (
    AdapterConfig,
    BitFitConfig,
    DoRAConfig,
    IA3Config,
    LoRAConfig,
    LoRAFAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TrainHeadConfig,
    apply,
    print_trainable_parameters,
    trainable_parameters,
)
from .models import load_model, make_example_batch

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_model",
    "make_example_batch",
    "apply",
    "quantize_frozen",
    "LoRAConfig",
    "BitFitConfig",
    "TrainHeadConfig",
    "DoRAConfig",
    "LoRAFAConfig",
    "IA3Config",
    "AdapterConfig",
    "PromptTuningConfig",
    "PrefixTuningConfig",
    "trainable_parameters",
    "print_trainable_parameters",
    "SGD",
    "AdamW",
    "EdgePeftError",
    "ConfigError",
    "ModelError",
]


def __getattr__(name: str):
    # quantize_frozen pulls in the quantized-matmul custom op (exporters.quantized_ops); load it on first use so
    # that `import edgepeft` stays light.
    if name == "quantize_frozen":
        from .quantization import quantize_frozen

        return quantize_frozen
    raise AttributeError(f"module 'edgepeft' has no attribute {name!r}")
