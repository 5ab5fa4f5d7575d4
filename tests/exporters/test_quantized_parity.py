"""A quantized frozen base trains exactly like an fp32 model whose frozen weights are the dequantized values.

The reference is an independent fp32 copy of the PEFT model in which every quantized layer's weight is replaced by
its dequantized values, trained the ordinary torch way. The exported graphs compute the forward with MatMulNBits on
the packed codes and the backward from a per-layer dequantization of the same bytes; they must agree with it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from device_runtime import Trainer
from edgepeft.quantization import QuantizedConv, QuantizedEmbedding, QuantizedLinear, quantize_frozen
from exporters.onnx import export

from .parity_cases import OPTIMIZERS, TorchReference, build_model, example_inputs, make_batch

RTOL, ATOL = 1e-4, 1e-5
STEPS = 10
pytestmark = pytest.mark.slow


def quantized_pair(model_name: str, method: str, scheme: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(quantized model, fp32 reference with the dequantized weights)."""
    model = build_model(model_name, method)
    reference = copy.deepcopy(model)
    quantize_frozen(model, scheme)
    quantized = dict(model.named_modules())
    count = 0
    for name, module in reference.named_modules():
        q = quantized.get(name)
        if isinstance(q, (QuantizedLinear, QuantizedEmbedding, QuantizedConv)):
            with torch.no_grad():
                module.weight.copy_(q.dequantized_weight())
            count += 1
    assert count > 0
    return model, reference


CASES = [
    *[("mlp", m, o, s) for m in ("lora", "bitfit") for o in ("sgd", "adamw") for s in ("int8", "int4")],
    ("transformer", "lora+bitfit", "adamw", "int8"),
    ("transformer", "lora+bitfit", "sgd", "int4"),
    ("cnn", "lora", "sgd", "int8"),
]


@pytest.mark.parametrize("model_name,method,optimizer,scheme", CASES)
def test_quantized_train_step_matches_dequantized_torch(tmp_path: Path, model_name, method, optimizer, scheme) -> None:
    model, reference_model = quantized_pair(model_name, method, scheme)
    reference = TorchReference(reference_model, OPTIMIZERS[optimizer])
    export(model, example_inputs(model_name), out=tmp_path / "b", optimizer=OPTIMIZERS[optimizer])
    trainer = Trainer.open(tmp_path / "b")
    assert trainer.bundle.manifest["quantization"]["scheme"] == scheme
    rng = np.random.default_rng(2)
    for step in range(STEPS):
        batch = make_batch(model, model_name, 5 if step % 2 else 2, rng, seq=9 if step % 2 else 4)
        np.testing.assert_allclose(trainer.step(batch), reference.step(batch), rtol=RTOL, atol=ATOL,
                                   err_msg=f"loss at step {step + 1}")
        for name, want in reference.trainable().items():
            np.testing.assert_allclose(trainer.trainable_state()[name], want, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} after step {step + 1}")
    inputs = {k: v for k, v in make_batch(model, model_name, 3, rng).items() if k != "labels"}
    np.testing.assert_allclose(trainer.predict(inputs), reference.logits(inputs), rtol=RTOL, atol=ATOL)


def test_frozen_weights_on_disk_shrink(tmp_path: Path) -> None:
    """weights.bin of the default built-in transformer: int8 <= 0.3x and int4 <= 0.2x of fp32."""
    from edgepeft import LoRAConfig, apply, load_model
    from edgepeft.models import make_example_batch
    from exporters.onnx import plan_export
    from exporters.onnx_graph import write_weights_file

    sizes = {}
    for scheme in (None, "int8", "int4"):
        torch.manual_seed(0)
        model = apply(load_model("transformer"), LoRAConfig(r=8, alpha=16))
        quantize_frozen(model, scheme)
        plan = plan_export(model, make_example_batch(model, 3, 7))
        path = tmp_path / f"{scheme}.bin"
        write_weights_file({n: t.numpy() for n, t in plan.frozen.items()}, path)
        sizes[scheme] = path.stat().st_size
    assert sizes["int8"] / sizes[None] <= 0.3, sizes
    assert sizes["int4"] / sizes[None] <= 0.2, sizes
