"""In train steps, torch's GELU is exported as one onnxruntime kernel (`Gelu` for the erf form, `FastGelu` for the
tanh form), and the train step built around it still equals torch autograd; the inference graph keeps standard
ONNX ops, which mobile EPs' op tables list.

Its backward stays the decomposed `gelu_backward`; only the forward changes, so the parity here checks that the
contrib kernel computes torch's formula for each approximation (FastGelu's constants are the tanh form's).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from device_runtime import Trainer
from edgepeft import LoRAConfig, apply, load_model, make_example_batch
from exporters.onnx import export

from .parity_cases import OPTIMIZERS, TorchReference, make_batch

RTOL, ATOL = 1e-4, 1e-5
KERNELS = {"none": "Gelu", "tanh": "FastGelu"}


def _mlp_with_gelu(approximate: str) -> nn.Module:
    torch.manual_seed(0)
    model = load_model("mlp")
    model.act1 = nn.GELU(approximate=approximate)
    apply(model, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():  # LoRA's B starts at zero: perturb so step 1 already has a gradient through the GELU
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("approximate", sorted(KERNELS))
def test_gelu_is_one_kernel_and_trains_like_torch(tmp_path, approximate: str) -> None:
    model = _mlp_with_gelu(approximate)
    reference = TorchReference(model, OPTIMIZERS["adamw"])
    bundle = export(model, make_example_batch(model, batch_size=3), out=tmp_path / "bundle",
                    optimizer=OPTIMIZERS["adamw"]).path

    train = onnx.load(str(bundle / "train_step.onnx"), load_external_data=False).graph.node
    kernels = [n for n in train if n.op_type == KERNELS[approximate]]
    assert len(kernels) == 1 and kernels[0].domain == "com.microsoft"
    infer = onnx.load(str(bundle / "infer.onnx"), load_external_data=False).graph.node
    assert all(n.domain in ("", "ai.onnx") for n in infer)
    assert {"Erf" if approximate == "none" else "Tanh"} <= {n.op_type for n in infer}

    trainer = Trainer.open(bundle)
    rng = np.random.default_rng(0)
    for step, size in enumerate([4, 2, 5, 3, 4, 1]):
        batch = make_batch(model, "mlp", size, rng)
        loss = trainer.step(batch)
        expected = reference.step(batch)
        np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL, err_msg=f"loss at step {step}")
        ours = trainer.trainable_state()
        for name, tensor in reference.trainable().items():
            np.testing.assert_allclose(ours[name], tensor, rtol=RTOL, atol=ATOL, err_msg=f"{name} at step {step}")
    probe = make_batch(model, "mlp", 3, rng)
    inputs = {k: v for k, v in probe.items() if k != "labels"}
    np.testing.assert_allclose(trainer.predict(inputs), reference.logits(inputs), rtol=RTOL, atol=ATOL)
