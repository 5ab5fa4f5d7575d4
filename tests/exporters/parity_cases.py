"""Shared builders for the parity tests: seeded PEFT models, batches, and the torch reference trainer.

The reference is the plain torch way of training the same model: `torch.nn.functional.cross_entropy`,
`loss.backward()`, `clip_grad_norm_`, `torch.optim.SGD` / `AdamW`. None of the exporter's code is used in it.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from device_runtime.optim_spec import SGD, AdamW
from edgepeft import BitFitConfig, LoRAConfig, apply, load_model

SMALL_TRANSFORMER = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16, num_classes=5)
MODELS = {"mlp": {}, "cnn": {}, "transformer": SMALL_TRANSFORMER}
# The attention key bias gets an identically zero gradient (softmax is shift-invariant along each query's row), so
# AdamW turns float32 rounding noise into lr-sized updates in any implementation; on the transformer BitFit trains
# every other bias. (SGD would pass with the key bias too: its update is lr * noise.)
_TRANSFORMER_BIASES = ["query", "value", "out", "ffn", "head"]
METHODS = {
    "lora": lambda model: [LoRAConfig(r=4, alpha=8)],
    "bitfit": lambda model: [BitFitConfig(target_modules=_TRANSFORMER_BIASES if model == "transformer" else None)],
    "lora+bitfit": lambda model: [LoRAConfig(r=4, alpha=8), *METHODS["bitfit"](model)],
}
OPTIMIZERS = {
    "sgd": SGD(lr=0.05, momentum=0.9, weight_decay=1e-3),
    # eps=1e-6, not 1e-8: where a gradient element is ~0, AdamW's first update lr * g / (|g| + eps) amplifies float32
    # rounding of g by up to lr / eps (5e5 at eps=1e-8), so two correct implementations differ there by ~1e-5.
    "adamw": AdamW(lr=5e-3, eps=1e-6, weight_decay=0.01, max_grad_norm=1.0),
}


def build_model(model_name: str, method: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = load_model(model_name, **MODELS[model_name])
    apply(model, *METHODS[method](model_name))
    # LoRA starts with B = 0; perturb every trainable tensor so step 1 already exercises every gradient path.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def example_inputs(model_name: str) -> dict[str, torch.Tensor]:
    from edgepeft.models import make_example_batch

    return make_example_batch(build_model(model_name, "bitfit"), batch_size=3, seq_len=7)


def make_batch(model: torch.nn.Module, model_name: str, batch: int, rng: np.random.Generator, seq: int = 6) -> dict:
    num_classes = model.num_classes
    if model_name == "mlp":
        inputs = {"x": rng.standard_normal((batch, 64)).astype(np.float32)}
    elif model_name == "cnn":
        inputs = {"x": rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)}
    else:
        ids = rng.integers(0, SMALL_TRANSFORMER["vocab_size"], (batch, seq)).astype(np.int64)
        lengths = rng.integers(1, seq + 1, batch)
        lengths[0] = seq
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        inputs = {"input_ids": ids, "attention_mask": mask}
    labels = rng.integers(0, num_classes, batch).astype(np.int64)
    return {**inputs, "labels": labels}


class TorchReference:
    """The same model trained the ordinary torch way."""

    def __init__(self, model: torch.nn.Module, optimizer) -> None:
        self.model = copy.deepcopy(model).eval()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.max_grad_norm = optimizer.max_grad_norm
        self.params = params
        if isinstance(optimizer, AdamW):
            self.optimizer = torch.optim.AdamW(params, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                                               weight_decay=optimizer.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=optimizer.lr, momentum=optimizer.momentum,
                                             dampening=optimizer.dampening, weight_decay=optimizer.weight_decay,
                                             nesterov=optimizer.nesterov)

    def step(self, batch: dict) -> float:
        inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k != "labels"}
        self.optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(**inputs), torch.from_numpy(batch["labels"]))
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return float(loss.detach())

    def logits(self, inputs: dict) -> np.ndarray:
        with torch.no_grad():
            return self.model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()

    def trainable(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in zip(self.names, self.params)}
