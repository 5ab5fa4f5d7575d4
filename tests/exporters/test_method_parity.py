"""Every PEFT method (and the hybrids) through the exported ONNX train step equals torch autograd + torch.optim.

For each case — DoRA, LoRA-FA, serial and parallel bottleneck adapters, IA3, prompt tuning, prefix tuning, and the
hybrids LoRA + BitFit + head on the top block only, LoRA + adapter, prompt + LoRA — and each optimizer (SGD with
momentum + weight decay; AdamW + global-norm clipping): 12 steps from one bundle at alternating batch sizes and
sequence lengths, comparing the loss and every trainable tensor after every step, then the infer graph's logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_runtime import Trainer
from edgepeft import (
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
    load_model,
    make_example_batch,
)
from exporters.onnx import export

from .parity_cases import MODELS, OPTIMIZERS, TorchReference, make_batch

RTOL, ATOL = 1e-4, 1e-5
STEPS = 12

pytestmark = pytest.mark.slow

CASES = {
    "dora": ("transformer", lambda: [DoRAConfig(r=4, alpha=8)]),
    "dora-mlp": ("mlp", lambda: [DoRAConfig(r=4, alpha=8)]),
    "lora_fa": ("transformer", lambda: [LoRAFAConfig(r=4, alpha=8)]),
    "adapter-serial": ("transformer", lambda: [AdapterConfig(bottleneck=8)]),
    "adapter-parallel": ("transformer", lambda: [AdapterConfig(bottleneck=8, mode="parallel", scaling=2.0,
                                                               activation="gelu")]),
    "ia3": ("transformer", lambda: [IA3Config()]),
    "ia3-mlp": ("mlp", lambda: [IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])]),
    "prompt_tuning": ("transformer", lambda: [PromptTuningConfig(num_virtual_tokens=4)]),
    "prefix_tuning": ("transformer", lambda: [PrefixTuningConfig(num_virtual_tokens=3)]),
    # Layer-index selection: only block 1 is adapted, so the backward stops above block 0.
    "lora+bitfit+head-top-block": ("transformer", lambda: [
        LoRAConfig(r=4, alpha=8, layers_to_transform=[1]),
        BitFitConfig(target_modules=["layers.1.ffn", "layers.1.attn.value"]), TrainHeadConfig()]),
    "lora+adapter": ("transformer", lambda: [LoRAConfig(r=4, alpha=8), AdapterConfig(bottleneck=8)]),
    "prompt+lora": ("transformer", lambda: [PromptTuningConfig(num_virtual_tokens=4), LoRAConfig(r=4, alpha=8)]),
}


def build(case: str, seed: int = 0) -> tuple[str, torch.nn.Module]:
    model_name, configs = CASES[case]
    torch.manual_seed(seed)
    model = apply(load_model(model_name, **MODELS[model_name]), *configs())
    # Zero-initialised parts (LoRA B, adapter up-projections) would give some tensors zero gradients at step 1;
    # perturb every trainable tensor so the first step already exercises every gradient path.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model_name, model.eval()


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES))
def test_method_train_step_matches_torch(tmp_path, case: str, optimizer: str) -> None:
    model_name, model = build(case)
    reference = TorchReference(model, OPTIMIZERS[optimizer])
    export(model, make_example_batch(model, batch_size=3, seq_len=7), out=tmp_path / "bundle",
           optimizer=OPTIMIZERS[optimizer])
    trainer = Trainer.open(tmp_path / "bundle")
    assert sorted(trainer.trainable_state()) == sorted(reference.names)

    rng = np.random.default_rng(1)
    for step in range(STEPS):
        batch_size, seq = (5, 9) if step % 2 == 0 else (2, 4)
        batch = make_batch(model, model_name, batch_size, rng, seq=seq)
        expected = reference.step(batch)
        np.testing.assert_allclose(trainer.step(batch), expected, rtol=RTOL, atol=ATOL, err_msg=f"loss, step {step + 1}")
        got, want = trainer.trainable_state(), reference.trainable()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=f"{name}, step {step + 1}")

    batch = make_batch(model, model_name, 3, rng, seq=5)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    np.testing.assert_allclose(trainer.predict(inputs), reference.logits(inputs), rtol=RTOL, atol=ATOL)

