"""`quantize_frozen`'s choices and refusals, and the int8-dynamic layer's stored weights."""

from __future__ import annotations

import pytest
import torch

from edgepeft import LoRAConfig, apply, load_model
from edgepeft.errors import ConfigError
from edgepeft.models import make_example_batch
from edgepeft.quantization import DynamicQuantizedLinear, quantize_frozen
from exporters.errors import ExportError


def _lora_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return apply(load_model("mlp"), LoRAConfig(r=4, alpha=8))


def test_int8_dynamic_keeps_weights_within_half_a_step_and_trainables_untouched() -> None:
    model = _lora_mlp()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad}
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    quantize_frozen(model, "int8-dynamic")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DynamicQuantizedLinear)}
    assert set(layers) == set(originals)
    for name, layer in layers.items():
        assert layer.codes.dtype == torch.uint8 and layer.codes.shape == originals[name].t().shape
        step = layer.scales[:, None]
        assert torch.all((layer.dequantized_weight() - originals[name]).abs() <= step / 2 + 1e-7), name
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before
    record = model.edgepeft_quantization
    assert record["scheme"] == "int8-dynamic" and record["input_gradients"] == "int8"


def test_refusals_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="unknown quantization 'int3'"):
        quantize_frozen(_lora_mlp(), "int3")
    with pytest.raises(ConfigError, match="int8_gradients=False only applies to 'int8-dynamic'"):
        quantize_frozen(_lora_mlp(), "int8", int8_gradients=False)
    model = quantize_frozen(_lora_mlp(), "int8-dynamic")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_frozen(model, "int8")


def test_executorch_refuses_int8_dynamic_before_lowering(tmp_path) -> None:
    pytest.importorskip("executorch")
    from exporters.executorch import export

    model = quantize_frozen(_lora_mlp(), "int8-dynamic")
    with pytest.raises(ExportError, match="quantize with 'int8' for ExecuTorch"):
        export(model, make_example_batch(model, 3), out=tmp_path / "b")
    assert not (tmp_path / "b").exists()
