"""`plan_export` names the output's and labels' axes by how they follow the inputs' dynamic dims, not by size."""

from __future__ import annotations

import torch

import edgepeft
from exporters.onnx import plan_export


def test_a_class_count_equal_to_the_example_batch_stays_fixed() -> None:
    model = edgepeft.load_model("mlp", num_classes=3)
    edgepeft.apply(model, edgepeft.BitFitConfig())
    plan = plan_export(model, {"x": torch.randn(3, 64)})
    assert plan.output_axes == {0: "batch"} and plan.label_axes == {0: "batch"}


def test_sequence_outputs_follow_both_dims() -> None:
    class Tagger(torch.nn.Module):
        """Per-token logits [batch, seq, 7], with seq's example size equal to the class count."""

        input_specs = [{"name": "x", "dtype": "float32", "shape": ["batch", "seq", 4]}]

        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(4, 7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x)

    plan = plan_export(Tagger(), {"x": torch.randn(3, 7, 4)})
    assert plan.output_axes == {0: "batch", 1: "seq"} and plan.label_axes == {0: "batch", 1: "seq"}
