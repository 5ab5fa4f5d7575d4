"""Training losses written in the aten ops that export to ONNX exactly.

Why not `torch.nn.functional.cross_entropy`: its backward (aten.nll_loss_backward) is mistranslated by
torch.onnx (dynamo, torch 2.13) — the logits' gradient comes out wrong by O(1). The same loss written as
log_softmax + gather has a backward of plain ops and exports exactly. Each loss returns `(loss, count)`, where
`count` is the number of targets that were counted, so that evaluation can average exactly over batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UnsupportedLossError

__all__ = ["LossSpec", "cross_entropy", "mse", "resolve_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean negative log-likelihood over targets != ignore_index (logits [..., C], labels [...])."""
    num_classes = logits.shape[-1]
    flat_logits = logits.reshape(-1, num_classes)
    flat_labels = labels.reshape(-1)
    counted = flat_labels != ignore_index
    # Ignored targets index class 0 so gather stays in range; their term is masked out below.
    safe_labels = torch.where(counted, flat_labels, torch.zeros_like(flat_labels))
    log_probs = torch.log_softmax(flat_logits, dim=-1)
    picked = torch.gather(log_probs, 1, safe_labels.unsqueeze(1)).squeeze(1)
    weights = counted.to(logits.dtype)
    count = weights.sum()
    # A batch whose targets are all ignored gives loss 0 and zero gradients instead of 0/0 = NaN.
    loss = -(picked * weights).sum() / torch.clamp(count, min=1.0)
    return loss, count


def mse(predictions: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error over every element, as torch.nn.functional.mse_loss(reduction='mean')."""
    diff = predictions - targets
    count = torch.ones((), dtype=predictions.dtype) * diff.numel()
    return (diff * diff).mean(), count


@dataclass(frozen=True)
class LossSpec:
    """A loss plus what the bundle manifest and label validation need to know about it."""

    name: str
    fn: LossFn
    label_dtype: torch.dtype
    labels_like_output: bool  # mse: labels have the output's shape; cross_entropy: output shape minus classes
    ignore_index: int | None = None

    def manifest_entry(self, num_classes: int | None) -> dict:
        entry: dict = {"name": self.name}
        if self.name == "cross_entropy":
            entry.update(ignore_index=self.ignore_index, num_classes=num_classes)
        return entry


def resolve_loss(
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ignore_index: int = -100,
    label_dtype: torch.dtype | None = None,
) -> LossSpec:
    """Turn a loss name or a user torch function `fn(outputs, labels) -> scalar` into a LossSpec."""
    if loss == "cross_entropy":
        return LossSpec(
            "cross_entropy",
            lambda out, y: cross_entropy(out, y, ignore_index),
            torch.int64,
            labels_like_output=False,
            ignore_index=ignore_index,
        )
    if loss == "mse":
        return LossSpec("mse", mse, torch.float32, labels_like_output=True)
    if callable(loss):
        user_fn = loss

        def custom(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            value = user_fn(out, y)
            if value.dim() != 0:
                raise UnsupportedLossError(
                    f"a custom loss must return a scalar, got shape {tuple(value.shape)}; reduce it with .mean()"
                )
            return value, torch.ones((), dtype=out.dtype) * out.shape[0]

        return LossSpec("custom", custom, label_dtype or torch.float32, labels_like_output=True)
    raise UnsupportedLossError(
        f"unknown loss {loss!r}; use 'cross_entropy', 'mse' or a torch function fn(outputs, labels) -> scalar"
    )
