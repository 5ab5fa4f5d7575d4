"""Parameter counts: exact numbers for a known model, tied weights counted once, PEFT's print format."""

from __future__ import annotations

import torch
from torch import nn

import edgepeft
from edgepeft.methods import format_trainable_parameters


def test_counts_for_mlp_with_lora_on_fc1(capsys):
    torch.manual_seed(0)
    model = edgepeft.apply(edgepeft.load_model("mlp"), edgepeft.LoRAConfig(r=8, target_modules=["fc1"]))
    base = (64 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10)
    lora = 8 * 64 + 128 * 8
    assert edgepeft.trainable_parameters(model) == (lora, base + lora)
    edgepeft.print_trainable_parameters(model)
    percent = f"{100 * lora / (base + lora):.4f}"
    assert capsys.readouterr().out == f"trainable params: 1,536 || all params: 27,658 || trainable%: {percent}\n"


def test_tied_weights_are_counted_once():
    emb = nn.Embedding(10, 4)
    out = nn.Linear(4, 10, bias=False)
    out.weight = emb.weight
    model = nn.Sequential(emb, out)
    assert edgepeft.trainable_parameters(model) == (40, 40)


def test_empty_model_has_zero_percent():
    assert format_trainable_parameters(nn.ReLU()) == "trainable params: 0 || all params: 0 || trainable%: 0.0000"
