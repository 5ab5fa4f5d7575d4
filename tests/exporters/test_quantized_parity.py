"""A quantized frozen base trains exactly like its torch counterpart.

int8 / int4 (weights only): the reference is an independent fp32 copy of the PEFT model in which every quantized
layer's weight is replaced by its dequantized values, trained the ordinary torch way. The exported graphs compute the
forward with MatMulNBits on the packed codes and the backward from a per-layer dequantization of the same bytes;
they must agree with it.

int8-dynamic (activations rounded to uint8 too): no fp32 model computes that, so the reference is the quantized
torch model itself, trained with torch autograd; its matmul reproduces onnxruntime's kernel bit for bit
(`test_quantized_ops`). Rounding is discontinuous: an ulp of difference upstream can move a value across a rounding
boundary, and with int8 input gradients AdamW turns such flips into lr-sized differences within a few steps
(measured: the 2-layer transformer leaves rtol 1e-4 at step 4 of 10). So the int8-gradient variant is checked step
by step from the same state — before each step the reference takes the trainer's tensors and optimizer state — and
the fp32-gradient variant over 10 free-running steps like the others.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from device_runtime import Trainer
from edgepeft.quantization import (DynamicQuantizedLinear, QuantizedConv, QuantizedEmbedding, QuantizedLinear,
                                   quantize_frozen)
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


def _assert_trains_like(trainer: Trainer, reference: TorchReference, model: torch.nn.Module, model_name: str, *,
                        tensor_atol: float = ATOL, synced: bool = False, predictions: bool = True) -> None:
    """STEPS steps at alternating batch / sequence sizes: each loss and every trainable tensor after it must match
    the reference (with `synced`, the reference first takes the trainer's state: see `_sync_reference`); then the
    predictions on a fresh batch."""
    rng = np.random.default_rng(2)
    for step in range(STEPS):
        if synced:
            _sync_reference(reference, trainer, step)
        batch = make_batch(model, model_name, 5 if step % 2 else 2, rng, seq=9 if step % 2 else 4)
        np.testing.assert_allclose(trainer.step(batch), reference.step(batch), rtol=RTOL, atol=ATOL,
                                   err_msg=f"loss at step {step + 1}")
        for name, want in reference.trainable().items():
            np.testing.assert_allclose(trainer.trainable_state()[name], want, rtol=RTOL, atol=tensor_atol,
                                       err_msg=f"{name} after step {step + 1}")
    if predictions:
        inputs = {k: v for k, v in make_batch(model, model_name, 3, rng).items() if k != "labels"}
        np.testing.assert_allclose(trainer.predict(inputs), reference.logits(inputs), rtol=RTOL, atol=ATOL)


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
    _assert_trains_like(trainer, reference, model, model_name)


DYNAMIC_CASES = [
    ("mlp", "lora", "sgd"),
    ("mlp", "bitfit", "adamw"),
    ("transformer", "lora+bitfit", "adamw"),
    ("transformer", "lora+bitfit", "sgd"),
    ("cnn", "lora", "adamw"),
]


def _dynamic_bundle(tmp_path: Path, model_name: str, method: str, optimizer: str, int8_gradients: bool):
    model = build_model(model_name, method)
    quantize_frozen(model, "int8-dynamic", int8_gradients=int8_gradients)
    reference = TorchReference(model, OPTIMIZERS[optimizer])
    export(model, example_inputs(model_name), out=tmp_path / "b", optimizer=OPTIMIZERS[optimizer])
    trainer = Trainer.open(tmp_path / "b")
    record = trainer.bundle.manifest["quantization"]
    assert record["scheme"] == "int8-dynamic"
    assert record["input_gradients"] == ("int8" if int8_gradients else "fp32")
    graph = onnx.load(trainer.bundle.graph_path("train_step"), load_external_data=False)
    counts = [n.op_type for n in graph.graph.node].count("DynamicQuantizeMatMul")
    linears = sum(isinstance(m, DynamicQuantizedLinear) for m in model.modules())
    return model, reference, trainer, counts, linears


@pytest.mark.parametrize("model_name,method,optimizer", DYNAMIC_CASES)
def test_int8_dynamic_with_fp32_gradients_matches_torch(tmp_path: Path, model_name, method, optimizer) -> None:
    model, reference, trainer, int8_matmuls, _ = _dynamic_bundle(tmp_path, model_name, method, optimizer, False)
    assert int8_matmuls > 0
    _assert_trains_like(trainer, reference, model, model_name)


def _sync_reference(reference: TorchReference, trainer: Trainer, step: int) -> None:
    """Give the torch reference the trainer's tensors and optimizer state (torch's own names and layout)."""
    trainable, state = trainer.trainable_state(), trainer.optimizer_state()
    with torch.no_grad():
        for name, param in zip(reference.names, reference.params):
            param.copy_(torch.from_numpy(trainable[name]))
            if step == 0:
                continue
            kinds = {k.split("/", 1)[0] for k in state if k.endswith("/" + name)}
            slot = {kind: torch.from_numpy(state[f"{kind}/{name}"]).clone() for kind in kinds}
            if "exp_avg" in slot:
                slot["step"] = torch.tensor(float(step))
            reference.optimizer.state[param] = slot


@pytest.mark.parametrize("model_name,method,optimizer", DYNAMIC_CASES)
def test_int8_dynamic_with_int8_gradients_matches_torch_step_by_step(tmp_path: Path, model_name, method,
                                                                     optimizer) -> None:
    """Losses tight always; tensors tight under SGD. Under AdamW a gradient code that rounds the other way moves the
    update of an element whose gradient is ~0 by a fraction of lr (measured: 2.1e-5 on 4 of 128 elements, lr 5e-3),
    so the tensors get atol = lr / 100 there: an error in the step itself would be lr-sized on most elements."""
    model, reference, trainer, _, _ = _dynamic_bundle(tmp_path, model_name, method, optimizer, True)
    atol = ATOL if optimizer == "sgd" else OPTIMIZERS[optimizer].lr / 100
    _assert_trains_like(trainer, reference, model, model_name, tensor_atol=atol, synced=True, predictions=False)


def test_int8_gradients_put_the_backward_on_the_int8_kernel(tmp_path: Path) -> None:
    """The backward's dX = dY @ W runs as DynamicQuantizeMatMul too, not as a dequantized fp32 matmul."""
    counts, linears = {}, {}
    for int8_gradients in (False, True):
        _, _, _, counts[int8_gradients], linears[int8_gradients] = _dynamic_bundle(
            tmp_path / str(int8_gradients), "transformer", "lora+bitfit", "sgd", int8_gradients)
    assert counts[False] == linears[False] > 0, (counts, linears)  # the forward only
    assert counts[True] > counts[False], counts  # plus input gradients (not for layers below every trainable one)


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
