"""DoRA: weight-decomposed LoRA (Liu et al. 2024) — a trainable magnitude per output row times a LoRA-updated direction.

The layer computes `m * (W + s B A) x / ||W + s B A||` (+ bias), where `||.||` is the L2 norm of each output row of
the weight (the paper's "column" norm; torch stores Linear weights as [out, in]). As in huggingface/peft, the norm
is *detached*: it is treated as a constant in the backward (the DoRA paper, section 4.3, does the same to save
memory), so gradients reach `m` directly and `A`, `B` only through the numerator. Our parity reference is torch
autograd over this same forward, and the interop test compares with PEFT's `use_dora=True` layer.

The forward is written the way PEFT writes it, `base(x) + (m / n - 1) * (x W^T) + (m / n) * s * B A x` with
`x W^T = base(x) - bias`, so the base layer stays one plain call (and may be quantized). Only nn.Linear is wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ModelError
from .base import register_method
from .lora import LoRAConfig, LoRALinear

__all__ = ["DoRAConfig", "DoRALinear"]


@register_method
@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """LoRA's hyper-parameters (r, alpha, target_modules, layers_to_transform, use_rslora); Linear layers only.

    Trainable tensors per layer: `<layer>.lora_A`, `<layer>.lora_B` and `<layer>.lora_magnitude` ([out_features]).
    """

    name: ClassVar[str] = "dora"

    @property
    def supported_layers(self) -> tuple[type[nn.Module], ...]:
        return (nn.Linear,)

    def wrap(self, name: str, module: nn.Module) -> DoRALinear:
        return DoRALinear(module, self.r, self.scaling)


class DoRALinear(LoRALinear):
    """A LoRALinear plus `lora_magnitude`, initialised to the row norms of the base weight (so it starts unchanged)."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float):
        super().__init__(base_layer, r, scaling)
        with torch.no_grad():
            self.lora_magnitude = nn.Parameter(self.weight_norm())
        self._merge_norm: torch.Tensor | None = None

    def base_weight(self) -> torch.Tensor:
        """W of the base layer, dequantized if `edgepeft.quantize_frozen` replaced it by a quantized layer."""
        weight = getattr(self.base_layer, "weight", None)
        return weight if isinstance(weight, torch.Tensor) else self.base_layer.dequantized_weight()

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, detached (a constant to autograd, as in PEFT)."""
        return torch.linalg.vector_norm(self.base_weight() + self.delta_weight().detach(), dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        scale = self.lora_magnitude / self.weight_norm()
        bias = self.base_layer.bias
        base_no_bias = result if bias is None else result - bias  # x W^T without a second matmul, as PEFT does
        return result + (scale - 1) * base_no_bias + scale * self.lora_forward(x) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        with torch.no_grad():
            if self.merged:
                return self.base_layer.weight.clone()
            direction = self.base_weight() + self.delta_weight()
            return (self.lora_magnitude / self.weight_norm())[:, None] * direction

    def merge(self) -> None:
        """Replace the base weight by the DoRA weight; the norm used is kept so `unmerge` can invert it."""
        if self.merged:
            raise ModelError("this DoRA layer is already merged; call unmerge() before merging again")
        with torch.no_grad():
            norm = self.weight_norm()
            self.base_layer.weight.copy_(self.merged_weight())
        self._merge_norm = norm
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged or self._merge_norm is None:
            raise ModelError("this DoRA layer is not merged; there is nothing to unmerge")
        with torch.no_grad():
            direction = self.base_layer.weight * (self._merge_norm / self.lora_magnitude)[:, None]
            self.base_layer.weight.copy_(direction - self.delta_weight())
        self._merge_norm = None
        self.merged = False
