"""Move LoRA adapters between edgepeft and Hugging Face PEFT's directory format, both ways, without importing peft.

PEFT saves an adapter as `adapter_config.json` + `adapter_model.safetensors` with keys such as
`base_model.model.<module>.lora_A.weight`, `<module>.lora_magnitude_vector` (DoRA) and `base_model.model.<module>.<param>`
for `modules_to_save`. edgepeft's LoRA wrappers keep PEFT's layout (`<module>.base_layer`, A [r, in], B [out, r]),
so moving between the two is a renaming plus a config translation:

- `load_peft_adapter(model, directory)` applies the matching LoRA / DoRA + train-head configs to a model and loads
  the saved tensors: exported afterwards, the adapter is the bundle's initial trainable state.
- `save_peft_adapter(adapter_dir, out)` turns a device adapter (`Trainer.export_adapter`) or a bundle's initial
  adapter into a directory `peft.PeftModel.from_pretrained(base_model, out)` loads.

Covered: LoRA and DoRA on Linear / Conv layers, rsLoRA, `modules_to_save` (edgepeft's train_head). LoRA on
embeddings, per-layer ranks (`rank_pattern`), LoRA biases and other PEFT methods are refused with a message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from torch import nn

from device_runtime.atomic_io import fsync_file, staged_dir, write_and_hash

from .errors import ConfigError, ModelError
from .methods import DoRAConfig, LoRAConfig, TrainHeadConfig, apply

__all__ = ["PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "read_peft_adapter", "load_peft_adapter", "save_peft_adapter"]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# edgepeft tensor suffix <-> PEFT key suffix (the adapter name "default" is not part of saved keys).
_SUFFIXES = ((".lora_A", ".lora_A.weight"), (".lora_B", ".lora_B.weight"), (".lora_magnitude", ".lora_magnitude_vector"))
_LORA_FAMILY = {"lora": LoRAConfig, "dora": DoRAConfig}
_TASK_TYPES = {"text-classification": "SEQ_CLS", "text-generation": "CAUSAL_LM"}
# PEFT config fields that change what is computed; any non-default value is refused rather than silently dropped.
_REFUSED = {"rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "lora_bias": False, "layer_replication": None,
            "target_parameters": None, "trainable_token_indices": None, "use_qalora": False, "exclude_modules": None}


def _peft_key(name: str) -> str:
    for ours, theirs in _SUFFIXES:
        if name.endswith(ours):
            return _PREFIX + name[: -len(ours)] + theirs
    return _PREFIX + name


def _our_name(key: str) -> str:
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    for ours, theirs in _SUFFIXES:
        if name.endswith(theirs):
            return name[: -len(theirs)] + ours
    if ".lora_embedding_" in name:
        raise ConfigError(f"PEFT tensor {key!r} is LoRA on an embedding, which this importer does not map yet; "
                          "re-train without the embedding in target_modules")
    return name


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def read_peft_adapter(directory: str | Path) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """The edgepeft method configs and tensors (edgepeft names) of a PEFT LoRA adapter directory."""
    directory = Path(directory)
    config_path, weights_path = directory / PEFT_CONFIG_FILE, directory / PEFT_WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{directory}: a PEFT adapter directory holds {PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE} "
                         "(save it with PeftModel.save_pretrained, safe_serialization=True)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{config_path}: peft_type {config.get('peft_type')!r}; only LORA adapters are imported")
    for field, default in _REFUSED.items():
        if config.get(field) is not None and config[field] != default:
            raise ConfigError(f"{config_path}: {field}={config[field]!r} is not supported by edgepeft's LoRA; "
                              f"train the adapter with {field}={default!r}")
    tensors = {_our_name(k): torch.from_numpy(np.array(v)) for k, v in load_numpy(str(weights_path)).items()}
    lora_modules = sorted({_module_of(n) for n in tensors if n.endswith((".lora_A", ".lora_B", ".lora_magnitude"))})
    if not lora_modules:
        raise ConfigError(f"{weights_path}: holds no lora_A / lora_B tensors")
    lora_cls = DoRAConfig if config.get("use_dora") else LoRAConfig
    configs: list[Any] = [lora_cls(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                                   target_modules=lora_modules, use_rslora=bool(config.get("use_rslora", False)))]
    saved_modules = sorted({_module_of(n) for n in tensors if _module_of(n) not in lora_modules})
    if saved_modules:
        configs.append(TrainHeadConfig(target_modules=saved_modules))
    return configs, tensors


def load_peft_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply a PEFT LoRA adapter's methods to `model` and load its tensors; every trainable tensor must be covered."""
    configs, tensors = read_peft_adapter(directory)
    apply(model, *configs)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(tensors) - set(trainable))
    missing = sorted(set(trainable) - set(tensors))
    if unknown or missing:
        raise ModelError(f"{directory}: the adapter does not fit this model (tensors the model does not train: "
                         f"{unknown[:6]}; trainable tensors the adapter lacks: {missing[:6]}); load it on the base "
                         "model it was trained on")
    with torch.no_grad():
        for name, value in tensors.items():
            if trainable[name].shape != value.shape:
                raise ModelError(f"{directory}: {name} has shape {list(value.shape)}, the model's is "
                                 f"{list(trainable[name].shape)}; load the adapter on the base model it was trained on")
            trainable[name].copy_(value)
    return model


def save_peft_adapter(adapter_dir: str | Path, out: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write a device adapter (or a bundle's initial one) as a PEFT adapter directory, atomically; return its path.

    `adapter_dir` is what `Trainer.export_adapter` wrote (`adapter_config.json` + `adapter.safetensors`) or a bundle
    (`manifest.json` + `adapter.safetensors`). `base_model_name_or_path` is recorded for PeftModel.from_pretrained.
    """
    adapter_dir = Path(adapter_dir)
    description = _read_description(adapter_dir)
    tensors = load_numpy(str(adapter_dir / "adapter.safetensors"))
    methods = description.get("methods", [])
    names = [m["name"] for m in methods]
    lora = [m for m in methods if m["name"] in _LORA_FAMILY]
    others = sorted(set(names) - set(_LORA_FAMILY) - {"train_head"})
    if len(lora) != 1 or others:
        raise ConfigError(f"{adapter_dir}: methods {names} cannot be written as one PEFT LoRA adapter; PEFT export "
                          "covers exactly one lora or dora plus optional train_head")
    record = lora[0]["config"]
    lora_modules = sorted({_module_of(n) for n in tensors if n.endswith((".lora_A", ".lora_B"))})
    head_modules = sorted({_module_of(n) for n in tensors if _module_of(n) not in lora_modules})
    task = description.get("model", {}).get("task")
    config = {
        "peft_type": "LORA",
        "task_type": _TASK_TYPES.get(task),
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(record["r"]),
        "lora_alpha": record["alpha"],
        "lora_dropout": 0.0,
        "use_rslora": bool(record.get("use_rslora", False)),
        "use_dora": lora[0]["name"] == "dora",
        "target_modules": lora_modules,
        "modules_to_save": head_modules or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    arrays = {_peft_key(n): np.ascontiguousarray(v) for n, v in tensors.items()}
    out = Path(out)
    with staged_dir(out, marker=PEFT_CONFIG_FILE) as staged:
        save_numpy(arrays, str(staged / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        fsync_file(staged / PEFT_WEIGHTS_FILE)
        write_and_hash((json.dumps(config, indent=2) + "\n").encode("utf-8"), staged / PEFT_CONFIG_FILE)
    return out


def _read_description(directory: Path) -> Mapping[str, Any]:
    """The methods and model entry of a device adapter (adapter_config.json) or a bundle (manifest.json)."""
    for name in ("adapter_config.json", "manifest.json"):
        path = directory / name
        if path.is_file():
            description = json.loads(path.read_text())
            if description.get("format") in ("edgepeft-adapter", "edgepeft-bundle"):
                return description
    raise ModelError(f"{directory}: not an edgepeft adapter or bundle (no adapter_config.json / manifest.json written "
                     f"by edgepeft){'; it looks like a PEFT adapter already' if (directory / PEFT_WEIGHTS_FILE).exists() else ''}")

