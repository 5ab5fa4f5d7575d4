"""LoRA-FA: LoRA with the down-projection A frozen at its random init; only B trains (Zhang et al. 2023).

With A fixed, the gradient of B needs only `A x` (r values per token) instead of the layer input, which halves the
trainable tensors and the optimizer state and shrinks what the pruned backward keeps alive. A becomes part of the
frozen base (it is stored in the bundle's weights file); the trainable tensors are the `<layer>.lora_B` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .base import register_method
from .lora import LoRAConfig

__all__ = ["LoRAFAConfig"]


@register_method
@dataclass(frozen=True)
class LoRAFAConfig(LoRAConfig):
    """LoRA's hyper-parameters (r, alpha, target_modules, layers_to_transform, use_rslora); A is frozen."""

    name: ClassVar[str] = "lora_fa"

    def apply_to(self, model: nn.Module) -> dict[str, Any]:
        """Inject LoRA wrappers, then freeze each wrapper's A."""
        targets, wrappers = self.inject(model)
        for _, wrapper in wrappers:
            wrapper.lora_A.requires_grad_(False)
        return dict(self.to_dict(), target_modules=list(targets))
