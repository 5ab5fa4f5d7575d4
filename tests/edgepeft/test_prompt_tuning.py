"""Prompt tuning: soft tokens prepended to the input embeddings, the attention mask extended to cover them."""

from __future__ import annotations

import copy

import pytest
import torch

import edgepeft
from edgepeft.errors import ConfigError, ModelError

SMALL = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16, num_classes=5)


def test_soft_prompt_is_prepended_and_masked_in():
    torch.manual_seed(0)
    model = edgepeft.load_model("transformer", **SMALL)
    plain = copy.deepcopy(model)
    edgepeft.apply(model, edgepeft.PromptTuningConfig(num_virtual_tokens=3))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["soft_prompt.weight"]
    assert model.max_len == 13  # three positions now belong to the prompt
    # "vocab" init: every prompt row is a row of the token embedding table
    rows = model.soft_prompt.weight
    assert all(any(torch.equal(r, e) for e in model.token_embedding.weight) for r in rows)

    batch = edgepeft.make_example_batch(model, 2, 5)
    embeds = torch.cat([rows.expand(2, -1, -1), plain.token_embedding(batch["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.int64), batch["attention_mask"]], dim=1)
    torch.testing.assert_close(model(**batch), plain(inputs_embeds=embeds, attention_mask=mask), rtol=0, atol=0)


def test_prompt_tuning_errors():
    with pytest.raises(ConfigError, match="num_virtual_tokens must be an integer >= 1"):
        edgepeft.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ModelError, match="has no get_input_embeddings"):
        edgepeft.apply(edgepeft.load_model("mlp"), edgepeft.PromptTuningConfig())
    model = edgepeft.load_model("transformer", **SMALL)
    with pytest.raises(ConfigError, match="leaves no room for real tokens"):
        edgepeft.apply(model, edgepeft.PromptTuningConfig(num_virtual_tokens=16))
    edgepeft.apply(model, edgepeft.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="already has a soft prompt"):
        edgepeft.apply(model, edgepeft.PromptTuningConfig(num_virtual_tokens=2))
