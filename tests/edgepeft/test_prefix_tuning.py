"""Prefix tuning: learned keys and values every query attends to, in chosen attention layers."""

from __future__ import annotations

import copy

import pytest
import torch

import edgepeft
from edgepeft.errors import ConfigError, ModelError
from edgepeft.methods import KVPrefix

SMALL = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_len=16, num_classes=5)


def test_prefix_slots_filled_per_layer_selection():
    torch.manual_seed(0)
    model = edgepeft.apply(edgepeft.load_model("transformer", **SMALL),
                           edgepeft.PrefixTuningConfig(num_virtual_tokens=4, layers_to_transform=[1, 2]))
    assert model.layers[0].attn.kv_prefix is None and isinstance(model.layers[2].attn.kv_prefix, KVPrefix)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "layers.1.attn.kv_prefix.key", "layers.1.attn.kv_prefix.value",
        "layers.2.attn.kv_prefix.key", "layers.2.attn.kv_prefix.value"]
    assert model.edgepeft_methods[0]["config"]["target_modules"] == ["layers.1.attn", "layers.2.attn"]


def test_prefix_attention_equals_attention_over_prepended_keys():
    torch.manual_seed(0)
    model = edgepeft.load_model("transformer", **SMALL)
    attn = model.layers[0].attn
    plain = copy.deepcopy(attn)
    edgepeft.apply(model, edgepeft.PrefixTuningConfig(num_virtual_tokens=2, layers_to_transform=[0]))
    prefix = attn.kv_prefix
    x = torch.randn(2, 5, 32)
    bias = torch.zeros(2, 1, 1, 5)
    bias[1, ..., 3:] = -1e9  # row 1 has two padded tokens; prefixes stay visible to it
    q = plain.query(x).reshape(2, 5, 4, 8).transpose(1, 2)
    k = torch.cat([prefix.key.expand(2, -1, -1), plain.key(x)], 1).reshape(2, 7, 4, 8).transpose(1, 2)
    v = torch.cat([prefix.value.expand(2, -1, -1), plain.value(x)], 1).reshape(2, 7, 4, 8).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / 8 ** 0.5 + torch.cat([torch.zeros(2, 1, 1, 2), bias], -1)
    expected = plain.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x, bias), expected, rtol=1e-5, atol=1e-6)


def test_prefix_tuning_errors():
    with pytest.raises(ModelError, match="no attention module with a kv_prefix slot"):
        edgepeft.apply(edgepeft.load_model("mlp"), edgepeft.PrefixTuningConfig())
    model = edgepeft.load_model("transformer", **SMALL)
    with pytest.raises(ConfigError, match=r"\['layers.0.ffn'\] have no kv_prefix slot"):
        edgepeft.apply(model, edgepeft.PrefixTuningConfig(target_modules=["layers.0.ffn"]))
    edgepeft.apply(model, edgepeft.PrefixTuningConfig(target_modules=["layers.0.attn"]))
    with pytest.raises(ConfigError, match="already has a prefix"):
        edgepeft.apply(model, edgepeft.PrefixTuningConfig())


def _tiny_hf(kind: str):
    transformers = pytest.importorskip("transformers")
    from edgepeft.models import load_hf_model

    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=24)
        return load_hf_model(config, task="text-classification", num_labels=3)
    config = transformers.GPT2Config(vocab_size=60, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=1, eos_token_id=1)
    return load_hf_model(config, task="text-generation")


def _hf_reference_attention(module, prefix, x: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention over [prefix; tokens] written out by hand: what the prefixed HF module must compute."""
    b, t, width = x.shape
    n, heads = prefix.key.shape[0], 4
    if hasattr(module, "c_attn"):  # GPT-2: one fused projection, then c_proj
        q, k, v = module.c_attn(x).split(width, dim=-1)
        out = module.c_proj
    else:
        q, k, v = module.query(x), module.key(x), module.value(x)
        out = None
    k = torch.cat([prefix.key.expand(b, -1, -1), k], 1)
    v = torch.cat([prefix.value.expand(b, -1, -1), v], 1)
    split = lambda z: z.reshape(b, z.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    allowed = mask[:, None, None, :].bool().expand(b, 1, t, t)
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool).tril()
    allowed = torch.cat([torch.ones(b, 1, t, n, dtype=torch.bool), allowed], -1)
    scores = (split(q) @ split(k).transpose(-2, -1)) / (width // heads) ** 0.5
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    context = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, t, width)
    return out(context) if out is not None else context


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hf_prefix_attention_equals_attention_over_prepended_keys(kind: str):
    """The registry hook on real transformers modules: bidirectional (BERT) and causal (GPT-2), with padding."""
    model = _tiny_hf(kind)
    model = edgepeft.apply(model, edgepeft.PrefixTuningConfig(num_virtual_tokens=3, layers_to_transform=[0]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 and all(".0." in n and ".kv_prefix." in n for n in names)
    attn_name = names[0].rsplit(".kv_prefix.", 1)[0]
    module = model.get_submodule(attn_name)
    captured = {}
    hook = module.register_forward_hook(lambda m, args, kwargs, out: captured.update(x=args[0] if args else
                                        kwargs["hidden_states"], out=out[0]), with_kwargs=True)
    ids = torch.randint(2, 60, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        hook.remove()
        expected = _hf_reference_attention(module, module.kv_prefix, captured["x"], mask, causal=kind == "gpt2")
    got = captured["out"]
    keep = mask.bool()  # padded query rows are not compared (their softmax rows are all-masked noise)
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_hf_prefix_leaves_untargeted_layers_as_before():
    model = _tiny_hf("bert")
    plain = copy.deepcopy(model)
    edgepeft.apply(model, edgepeft.PrefixTuningConfig(num_virtual_tokens=2, layers_to_transform=[1]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()  # zero keys: a prefix still takes attention mass, so outputs must differ in layer 1 only
    ids, mask = torch.randint(2, 60, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        a = model.bert.encoder.layer[0](model.bert.embeddings(ids), attention_mask=None)[0]
        b = plain.bert.encoder.layer[0](plain.bert.embeddings(ids), attention_mask=None)[0]
        torch.testing.assert_close(a, b)
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                                  plain(input_ids=ids, attention_mask=mask).logits)
