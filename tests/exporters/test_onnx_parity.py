"""The exported ONNX train step equals torch autograd + torch.optim, step by step, at two batch sizes.

For every built-in model family (MLP; CNN with BatchNorm in eval mode; transformer encoder with embeddings,
padding-masked multi-head attention, LayerNorm, GELU, softmax) x method (LoRA, BitFit, LoRA+BitFit) x optimizer
(SGD with momentum + weight decay; AdamW + global-norm clipping): 20 steps from one bundle, alternating batch sizes
(and sequence lengths for the transformer), comparing the loss and every trainable tensor after every step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from device_runtime import Trainer
from exporters.onnx import export

from .parity_cases import METHODS, MODELS, OPTIMIZERS, TorchReference, build_model, example_inputs, make_batch

RTOL, ATOL = 1e-4, 1e-5
STEPS = 20

pytestmark = pytest.mark.slow


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_train_step_matches_torch(tmp_path: Path, model_name: str, method: str, optimizer: str) -> None:
    model = build_model(model_name, method)
    reference = TorchReference(model, OPTIMIZERS[optimizer])
    bundle = tmp_path / "bundle"
    export(model, example_inputs(model_name), out=bundle, optimizer=OPTIMIZERS[optimizer])
    files_before = _hashes(bundle)

    trainer = Trainer.open(bundle)
    rng = np.random.default_rng(1)
    for step in range(STEPS):
        batch_size, seq = (5, 9) if step % 2 == 0 else (2, 4)
        batch = make_batch(model, model_name, batch_size, rng, seq=seq)
        expected_loss = reference.step(batch)
        loss = trainer.step(batch)
        np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL, err_msg=f"loss at step {step + 1}")
        got, want = trainer.trainable_state(), reference.trainable()
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} after step {step + 1}")

    # Eval and infer graphs see the trained adapter too.
    batch = make_batch(model, model_name, 3, rng, seq=5)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    np.testing.assert_allclose(trainer.predict(inputs), reference.logits(inputs), rtol=RTOL, atol=ATOL)
    metrics = trainer.evaluate([batch])
    expected_eval = reference.logits(inputs)
    shifted = expected_eval - expected_eval.max(-1, keepdims=True)
    nll = -(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))[np.arange(3), batch["labels"]]
    np.testing.assert_allclose(metrics["loss"], nll.mean(), rtol=RTOL, atol=ATOL)

    # The runtime never wrote into the bundle: frozen weights and graphs are bit-identical.
    assert _hashes(bundle) == files_before


def test_adamw_default_eps_with_exactly_zero_gradients(tmp_path: Path) -> None:
    """Fresh LoRA (B = 0) gives A an exactly zero first gradient, so AdamW's update is 0 / (0 + eps).

    Regression: onnxscript's graph optimizer once folded `+ 1e-8` away as `+ 0`, turning that into 0 / 0 = NaN.
    """
    from device_runtime.optim_spec import AdamW
    from edgepeft import LoRAConfig, apply, load_model

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = apply(load_model("mlp"), LoRAConfig(r=4, alpha=8))
    optimizer = AdamW(lr=1e-2)  # eps = 1e-8, the default
    reference = TorchReference(model, optimizer)
    export(model, {"x": torch.randn(3, 64)}, out=tmp_path / "b", optimizer=optimizer)
    trainer = Trainer.open(tmp_path / "b")
    rng = np.random.default_rng(0)
    for step in range(5):
        batch = make_batch(model, "mlp", 4, rng)
        np.testing.assert_allclose(trainer.step(batch), reference.step(batch), rtol=RTOL, atol=ATOL)
        for name, want in reference.trainable().items():
            np.testing.assert_allclose(trainer.trainable_state()[name], want, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} after step {step + 1}")
