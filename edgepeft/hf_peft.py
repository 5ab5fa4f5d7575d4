"""Move LoRA / DoRA / IA3 adapters between edgepeft and Hugging Face PEFT's directory format, both ways, without
importing peft.

PEFT saves an adapter as `adapter_config.json` + `adapter_model.safetensors` with keys such as
`base_model.model.<module>.lora_A.weight`, `<module>.lora_magnitude_vector` (DoRA) and `base_model.model.<module>.<param>`
for `modules_to_save`. edgepeft's LoRA wrappers keep PEFT's layout (`<module>.base_layer`, A [r, in], B [out, r]),
so moving between the two is a renaming plus a config translation:

- `load_peft_adapter(model, directory)` applies the matching LoRA / DoRA + train-head configs to a model and loads
  the saved tensors: exported afterwards, the adapter is the bundle's initial trainable state.
- `save_peft_adapter(adapter_dir, out)` turns a device adapter (`Trainer.export_adapter`) or a bundle's initial
  adapter into a directory `peft.PeftModel.from_pretrained(base_model, out)` loads.

Covered: LoRA and DoRA on Linear / Conv layers, rsLoRA, IA3 on Linear layers (PEFT keeps `ia3_l` as [out, 1], or
[1, in] for a feed-forward module; edgepeft as a vector), `modules_to_save` (edgepeft's train_head). LoRA on
embeddings, per-layer ranks (`rank_pattern`), LoRA biases, IA3 on convolutions and other PEFT methods (edgepeft's
bottleneck adapters, prompt and prefix tuning, BitFit have no PEFT directory equivalent) are refused with a message.
"""

from __future__ import annotations

import json
import re
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
from .methods import DoRAConfig, IA3Config, LoRAConfig, TrainHeadConfig, apply
from .methods.targets import pattern_matches

__all__ = ["PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "read_peft_adapter", "load_peft_adapter", "save_peft_adapter"]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# edgepeft tensor suffix <-> PEFT key suffix (the adapter name "default" is not part of saved keys).
_SUFFIXES = ((".lora_A", ".lora_A.weight"), (".lora_B", ".lora_B.weight"), (".lora_magnitude", ".lora_magnitude_vector"))
_LORA_FAMILY = {"lora": LoRAConfig, "dora": DoRAConfig}
_IA3 = ".ia3_l"
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
    """The edgepeft method configs and tensors (edgepeft names) of a PEFT LoRA / DoRA / IA3 adapter directory."""
    directory = Path(directory)
    config_path, weights_path = directory / PEFT_CONFIG_FILE, directory / PEFT_WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{directory}: a PEFT adapter directory holds {PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE} "
                         "(save it with PeftModel.save_pretrained, safe_serialization=True)")
    config = json.loads(config_path.read_text())
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "IA3"):
        raise ConfigError(f"{config_path}: peft_type {peft_type!r}; only LORA (incl. DoRA) and IA3 adapters are "
                          "imported")
    tensors = {_our_name(k): torch.from_numpy(np.array(v)) for k, v in load_numpy(str(weights_path)).items()}
    configs, method_modules = (_lora_configs if peft_type == "LORA" else _ia3_configs)(config, config_path, tensors)
    if not method_modules:
        raise ConfigError(f"{weights_path}: holds no {'lora_A / lora_B' if peft_type == 'LORA' else 'ia3_l'} tensors")
    saved_modules = sorted({_module_of(n) for n in tensors if _module_of(n) not in method_modules})
    if saved_modules:
        configs.append(TrainHeadConfig(target_modules=saved_modules))
    return configs, tensors


def _lora_configs(config: Mapping[str, Any], config_path: Path,
                  tensors: dict[str, torch.Tensor]) -> tuple[list[Any], list[str]]:
    for field, default in _REFUSED.items():
        if config.get(field) is not None and config[field] != default:
            raise ConfigError(f"{config_path}: {field}={config[field]!r} is not supported by edgepeft's LoRA; "
                              f"train the adapter with {field}={default!r}")
    modules = sorted({_module_of(n) for n in tensors if n.endswith((".lora_A", ".lora_B", ".lora_magnitude"))})
    lora_cls = DoRAConfig if config.get("use_dora") else LoRAConfig
    return [lora_cls(r=int(config["r"]), alpha=float(config["lora_alpha"]), target_modules=modules,
                     use_rslora=bool(config.get("use_rslora", False)))], modules


def _ia3_configs(config: Mapping[str, Any], config_path: Path,
                 tensors: dict[str, torch.Tensor]) -> tuple[list[Any], list[str]]:
    """IA3's vectors flattened to edgepeft's layout; feed-forward modules chosen by PEFT's own rule (a list entry
    matches a module name it ends with; a string is a regex matched in full)."""
    if config.get("fan_in_fan_out"):
        raise ConfigError(f"{config_path}: fan_in_fan_out=True (GPT-2 Conv1D layers) is not supported for IA3 import; "
                          "train the adapter on a model with Linear layers")
    modules = sorted({_module_of(n) for n in tensors if n.endswith(_IA3)})
    feedforward = config.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        is_ff = {m: re.fullmatch(feedforward, m) is not None for m in modules}
    else:
        is_ff = {m: any(m.endswith(key) for key in feedforward) for m in modules}
    for module in modules:
        vector = tensors[module + _IA3]
        expected = 0 if is_ff[module] else 1  # the axis of size 1 in PEFT's [1, in] / [out, 1]
        if vector.dim() != 2 or vector.shape[expected] != 1:
            raise ConfigError(f"{config_path}: {module}{_IA3} has shape {list(vector.shape)}, which does not fit a "
                              f"{'feed-forward' if is_ff[module] else 'non-feed-forward'} IA3 Linear; re-save the "
                              "adapter with the peft version that trained it")
        tensors[module + _IA3] = vector.flatten()
    return [IA3Config(target_modules=modules, feedforward_modules=[m for m in modules if is_ff[m]])], modules


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
    main = [m for m in methods if m["name"] in (*_LORA_FAMILY, "ia3")]
    others = sorted(set(names) - set(_LORA_FAMILY) - {"ia3", "train_head"})
    if len(main) != 1 or others:
        raise ConfigError(f"{adapter_dir}: methods {names} cannot be written as one PEFT adapter; PEFT export covers "
                          "exactly one of lora, dora or ia3, plus optional train_head")
    method = main[0]
    suffixes = (_IA3,) if method["name"] == "ia3" else (".lora_A", ".lora_B")
    modules = sorted({_module_of(n) for n in tensors if n.endswith(suffixes)})
    head_modules = sorted({_module_of(n) for n in tensors if _module_of(n) not in modules})
    common = {
        "task_type": _TASK_TYPES.get(description.get("model", {}).get("task")),
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": modules,
        "modules_to_save": head_modules or None,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if method["name"] == "ia3":
        config, tensors = _ia3_for_peft(method["config"], modules, tensors, common)
    else:
        record = method["config"]
        config = {"peft_type": "LORA", **common, "r": int(record["r"]), "lora_alpha": record["alpha"],
                  "lora_dropout": 0.0, "use_rslora": bool(record.get("use_rslora", False)),
                  "use_dora": method["name"] == "dora", "bias": "none", "init_lora_weights": True}
    arrays = {_peft_key(n): np.ascontiguousarray(v) for n, v in tensors.items()}
    out = Path(out)
    with staged_dir(out, marker=PEFT_CONFIG_FILE) as staged:
        save_numpy(arrays, str(staged / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        fsync_file(staged / PEFT_WEIGHTS_FILE)
        write_and_hash((json.dumps(config, indent=2) + "\n").encode("utf-8"), staged / PEFT_CONFIG_FILE)
    return out


def _ia3_for_peft(record: Mapping[str, Any], modules: list[str], tensors: dict[str, np.ndarray],
                  common: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """PEFT's IA3 config and [out, 1] / [1, in] vectors. Feed-forward modules are listed by full name, which PEFT's
    suffix rule matches exactly (a bare pattern like "output.dense" could also hit "attention.output.dense")."""
    patterns = record.get("feedforward_modules") or []
    feedforward = [m for m in modules if any(pattern_matches(p, m) for p in patterns)]
    shaped = dict(tensors)
    for module in modules:
        vector = tensors[module + _IA3]
        shaped[module + _IA3] = vector.reshape(1, -1) if module in feedforward else vector.reshape(-1, 1)
    return {"peft_type": "IA3", **common, "feedforward_modules": feedforward, "init_ia3_weights": True}, shaped


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

