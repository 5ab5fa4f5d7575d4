"""The ExecuTorch bundle trains like torch autograd + torch.optim, and like the ONNX bundle, step by step.

Same models (MLP; CNN with eval-mode BatchNorm; 2-layer transformer with padding masks), methods (LoRA, BitFit,
LoRA+BitFit) and optimizers (SGD with momentum + weight decay; AdamW + clipping) as `test_onnx_parity.py`. One
ExecuTorch export costs 10-60 s of CPU, so by default each model runs three of its six (method, optimizer) pairs,
chosen so that every model and every method is trained with both optimizers; EDGEPEFT_FULL_EXECUTORCH_PARITY=1 runs
all eighteen. Each case trains 12 steps at alternating batch sizes (and sequence lengths) from one bundle, with the
ONNX backend on the same batches, comparing losses and every trainable tensor after every step.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from device_runtime import Trainer
from device_runtime.executorch_backend import ExecuTorchTrainer, MergedInference, PARAMETER_PREFIX
from exporters.errors import ExportError
from exporters.executorch import export
from exporters.onnx import export as export_onnx

from .parity_cases import METHODS, MODELS, OPTIMIZERS, TorchReference, build_model, example_inputs, make_batch

pytest.importorskip("executorch")

RTOL, ATOL = 1e-4, 1e-5
STEPS = 12
# Every model meets both optimizers and every method meets both optimizers (across models).
COVERING = [("mlp", "lora", "sgd"), ("mlp", "bitfit", "adamw"), ("mlp", "lora+bitfit", "adamw"),
            ("cnn", "lora", "adamw"), ("cnn", "bitfit", "sgd"), ("cnn", "lora+bitfit", "sgd"),
            ("transformer", "lora", "sgd"), ("transformer", "bitfit", "adamw"), ("transformer", "lora+bitfit", "adamw")]
FULL = list(itertools.product(sorted(MODELS), sorted(METHODS), sorted(OPTIMIZERS)))
CASES = FULL if os.environ.get("EDGEPEFT_FULL_EXECUTORCH_PARITY") == "1" else COVERING
FAST = {("mlp", "lora+bitfit", "adamw")}


def _case(model: str, method: str, optimizer: str):  # type: ignore[no-untyped-def]
    marks = [] if (model, method, optimizer) in FAST else [pytest.mark.slow]
    return pytest.param(model, method, optimizer, marks=marks, id=f"{model}-{method}-{optimizer}")


def _close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=f"{name} {what}")


@pytest.mark.parametrize(("model_name", "method", "optimizer"), [_case(*c) for c in CASES])
def test_executorch_matches_torch_and_onnx(tmp_path: Path, model_name: str, method: str, optimizer: str) -> None:
    model = build_model(model_name, method)
    reference = TorchReference(model, OPTIMIZERS[optimizer])
    examples = example_inputs(model_name)
    # The LoRA+BitFit cases lower train.pte to XNNPACK (the trainable LoRA matrices and biases must stay live next
    # to the delegates), and infer.pte too for the MLP and CNN; the rest stays on ExecuTorch's CPU kernels, which
    # is much cheaper to export.
    delegate = method == "lora+bitfit"
    bundle = export(model, examples, out=tmp_path / "et", optimizer=OPTIMIZERS[optimizer],
                    delegate_infer=delegate and model_name != "transformer", delegate_train=delegate)
    assert bundle.manifest["executorch"]["train"]["delegate"] == ("XnnpackBackend" if delegate else None)
    export_onnx(model, examples, out=tmp_path / "onnx", optimizer=OPTIMIZERS[optimizer])
    trainer, onnx_trainer = ExecuTorchTrainer.open(bundle.path), Trainer.open(tmp_path / "onnx")
    assert not trainer.uses_native_sgd  # these SGD specs have momentum: the bundle's optimizer_step runs

    rng = np.random.default_rng(1)
    batch = make_batch(model, model_name, 4, rng, seq=5)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    np.testing.assert_allclose(MergedInference(bundle).predict(inputs), reference.logits(inputs), rtol=RTOL,
                               atol=ATOL, err_msg="infer.pte (adapters merged) before training")
    for step in range(STEPS):
        batch_size, seq = (5, 9) if step % 2 == 0 else (2, 4)
        batch = make_batch(model, model_name, batch_size, rng, seq=seq)
        expected, loss, onnx_loss = reference.step(batch), trainer.step(batch), onnx_trainer.step(batch)
        np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL, err_msg=f"loss at step {step + 1} vs torch")
        np.testing.assert_allclose(loss, onnx_loss, rtol=RTOL, atol=ATOL, err_msg=f"loss at step {step + 1} vs onnx")
        state = trainer.trainable_state()
        _close(state, reference.trainable(), f"after step {step + 1} vs torch")
        _close(state, onnx_trainer.trainable_state(), f"after step {step + 1} vs onnx")
    _close(trainer.optimizer_state(), onnx_trainer.optimizer_state(), "optimizer state vs onnx")
    assert trainer.last_grad_norm == pytest.approx(onnx_trainer.last_grad_norm, rel=1e-4)

    batch = make_batch(model, model_name, 3, rng, seq=5)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    np.testing.assert_allclose(trainer.predict(inputs), reference.logits(inputs), rtol=RTOL, atol=ATOL)
    metrics, onnx_metrics = trainer.evaluate([batch]), onnx_trainer.evaluate([batch])
    assert metrics == pytest.approx(onnx_metrics, rel=1e-4)


def test_frozen_weights_get_no_gradient(tmp_path: Path) -> None:
    """Proof on the program itself: the train method returns one gradient per trainable tensor and no other."""
    from executorch.extension.pybindings import _C

    from exporters.executorch_programs import training_programs
    from exporters.onnx import plan_export

    model = build_model("cnn", "lora")  # frozen: conv / BatchNorm / head weights and biases, BN running stats
    plan = plan_export(model, example_inputs("cnn"), optimizer=OPTIMIZERS["adamw"])
    joint = training_programs(plan, {"batch": 8})["train"]
    kinds = [(s.kind.name, s.target) for s in joint.graph_signature.output_specs]
    grads = [target for kind, target in kinds if kind == "GRADIENT_TO_PARAMETER"]
    assert grads == [PARAMETER_PREFIX + n for n in plan.trainable]
    frozen_params = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen_params) >= 6 and not any(PARAMETER_PREFIX + n in grads for n in frozen_params)
    assert [k for k, _ in kinds].count("USER_OUTPUT") == 0 and kinds[0][0] == "LOSS_OUTPUT"

    bundle = export(model, example_inputs("cnn"), out=tmp_path / "b", optimizer=OPTIMIZERS["adamw"],
                    delegate_infer=False, delegate_train=False)
    program = _C._load_program(str(bundle.graph_path("train")))
    fqns = program.load_method("__et_training_fqn_train").call([])
    grad_start = program.load_method("__et_training_gradients_index_train").call([])[0]
    param_start = program.load_method("__et_training_parameters_index_train").call([])[0]
    assert fqns == grads and (grad_start, param_start) == (1, 1 + len(grads))
    assert program.load_method("train").method_meta().num_outputs() == 1 + 2 * len(grads)


def test_trainable_tensor_without_gradient_is_refused(tmp_path: Path) -> None:
    model = build_model("mlp", "lora")
    model.register_parameter("unused", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ExportError, match="unused"):
        export(model, example_inputs("mlp"), out=tmp_path / "b", delegate_infer=False, delegate_train=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_int8_frozen_base_matches_torch_and_onnx(tmp_path: Path) -> None:
    """`edgepeft.quantize_frozen(model, "int8")`: the .pte stores int8 codes; training matches eager and ONNX."""
    import edgepeft

    model = edgepeft.quantize_frozen(build_model("mlp", "lora+bitfit"), "int8")
    reference = TorchReference(model, OPTIMIZERS["adamw"])
    bundle = export(model, example_inputs("mlp"), out=tmp_path / "et", optimizer=OPTIMIZERS["adamw"])
    export_onnx(model, example_inputs("mlp"), out=tmp_path / "onnx", optimizer=OPTIMIZERS["adamw"])
    assert bundle.manifest["quantization"]["scheme"] == "int8"
    fp32 = export(build_model("mlp", "lora+bitfit"), example_inputs("mlp"), out=tmp_path / "fp32",
                  delegate_infer=False, delegate_train=False)
    assert bundle.graph_path("train").stat().st_size < 0.7 * fp32.graph_path("train").stat().st_size
    trainer, onnx_trainer = ExecuTorchTrainer.open(bundle.path), Trainer.open(tmp_path / "onnx")
    rng = np.random.default_rng(2)
    for step in range(10):
        batch = make_batch(model, "mlp", 5 if step % 2 else 3, rng)
        expected, loss = reference.step(batch), trainer.step(batch)
        np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(loss, onnx_trainer.step(batch), rtol=RTOL, atol=ATOL)
        _close(trainer.trainable_state(), reference.trainable(), f"after step {step + 1} vs torch")
        _close(trainer.trainable_state(), onnx_trainer.trainable_state(), f"after step {step + 1} vs onnx")
