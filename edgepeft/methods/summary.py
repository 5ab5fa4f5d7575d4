"""Count trainable vs. all parameters of a model, and print the count the way PEFT does.

Counting goes through `model.parameters()`, which yields a shared (tied) parameter once, and a LoRA wrapper's
base weight is counted once as part of the model's total, never again as "the layer's" weight.
"""

from __future__ import annotations

from torch import nn

__all__ = ["trainable_parameters", "print_trainable_parameters", "format_trainable_parameters"]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of trainable parameters, number of all parameters), counting each tensor once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def format_trainable_parameters(model: nn.Module) -> str:
    """'trainable params: 1,234 || all params: 56,789 || trainable%: 2.1731'."""
    trainable, total = trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print `format_trainable_parameters(model)`."""
    print(format_trainable_parameters(model))
