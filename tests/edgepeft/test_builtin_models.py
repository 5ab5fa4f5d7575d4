"""Built-in models: forward on example batches, architecture checked against hand-written maths, padding
invariance of the transformer, seeded determinism, and the registry's errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import edgepeft
from edgepeft.errors import ConfigError, ModelError
from edgepeft.models import make_example_batch, model_names

NUM_CLASSES = {"mlp": 10, "cnn": 10, "transformer": 4}


def _load(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return edgepeft.load_model(name, **kw)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_forward_on_example_batch(name, batch_size):
    model = _load(name)
    batch = make_example_batch(model, batch_size)
    assert [s["name"] for s in model.input_specs] == list(batch)
    for spec in model.input_specs:
        tensor = batch[spec["name"]]
        assert str(tensor.dtype) == f"torch.{spec['dtype']}"
        assert tensor.shape[0] == batch_size
        assert [d for d in spec["shape"] if isinstance(d, int)] == [
            n for d, n in zip(spec["shape"], tensor.shape) if isinstance(d, int)
        ]
    logits = model(**batch)
    assert model.num_classes == NUM_CLASSES[name]
    assert logits.shape == (batch_size, NUM_CLASSES[name])
    assert torch.isfinite(logits).all()
    assert not model.training
    assert model.edgepeft_model["id"] == name and model.edgepeft_model["source"] == "builtin"


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_same_seed_same_weights(name):
    a, b = _load(name).state_dict(), _load(name).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mlp_matches_its_definition():
    model = _load("mlp")
    x = make_example_batch(model, 3)["x"]
    h = F.gelu(x @ model.fc1.weight.T + model.fc1.bias)
    h = torch.relu(h @ model.fc2.weight.T + model.fc2.bias)
    torch.testing.assert_close(model(x), h @ model.head.weight.T + model.head.bias, rtol=0, atol=1e-6)


def test_cnn_matches_its_definition_in_eval_mode():
    model = _load("cnn")
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BatchNorm is really exercised
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = make_example_batch(model, 2)["x"]

    def block(h, conv, bn):
        h = F.conv2d(h, conv.weight, conv.bias, padding=1)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return torch.relu((h - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None])

    h = block(block(x, model.conv1, model.bn1), model.conv2, model.bn2).mean(dim=(2, 3))
    torch.testing.assert_close(model(x), h @ model.head.weight.T + model.head.bias, rtol=0, atol=1e-5)


def test_transformer_attention_matches_sdpa():
    model = _load("transformer")
    batch = make_example_batch(model, 3, seq_len=10)
    mask = batch["attention_mask"].bool()
    x = torch.randn(3, 10, 64)
    attn = model.layers[0].attn
    score_bias = (1.0 - mask.float())[:, None, None, :] * -1e9

    def heads(t):
        return t.reshape(3, 10, 4, 16).transpose(1, 2)

    q, k, v = heads(attn.query(x)), heads(attn.key(x)), heads(attn.value(x))
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    expected = attn.out(context.transpose(1, 2).reshape(3, 10, 64))
    torch.testing.assert_close(attn(x, score_bias), expected, rtol=0, atol=1e-5)


def test_transformer_padding_does_not_change_logits():
    model = _load("transformer")
    batch = make_example_batch(model, 5, seq_len=12, seed=3)
    mask = batch["attention_mask"]
    assert (mask == 0).any() and (mask.sum(1) == 12).any()
    logits = model(**batch)
    other_ids = torch.where(mask.bool(), batch["input_ids"], torch.randint(0, 1000, mask.shape))
    assert not torch.equal(other_ids, batch["input_ids"])
    torch.testing.assert_close(model(other_ids, mask), logits, rtol=0, atol=1e-6)
    # A padded row gives the same logits as its real tokens alone.
    for row in range(5):
        n = int(mask[row].sum())
        alone = model(batch["input_ids"][row : row + 1, :n], mask[row : row + 1, :n])
        torch.testing.assert_close(alone[0], logits[row], rtol=0, atol=1e-5)


def test_transformer_fully_padded_row_stays_finite():
    model = _load("transformer")
    ids = torch.randint(0, 1000, (2, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert torch.isfinite(model(ids, mask)).all()
    torch.testing.assert_close(model(ids), model(ids, torch.ones_like(ids)), rtol=0, atol=0)


def test_transformer_larger_config_parameter_count():
    d, layers, heads, ff, vocab, max_len, classes = 256, 6, 8, 1024, 1000, 128, 4
    model = _load("transformer", d_model=d, n_layers=layers, n_heads=heads, d_ff=ff)
    per_layer = 4 * (d * d + d) + 2 * (2 * d) + (d * ff + ff) + (ff * d + d)
    expected = vocab * d + max_len * d + layers * per_layer + d * classes + classes
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model(**make_example_batch(model, 2, seq_len=7)).shape == (2, 4)


def test_make_example_batch_is_seeded_and_masks_prefixes():
    model = _load("transformer")
    a, b = make_example_batch(model, 6, seq_len=9), make_example_batch(model, 6, seq_len=9)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = make_example_batch(model, 6, seq_len=9, seed=1)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    mask = a["attention_mask"]
    lengths = mask.sum(1)
    assert lengths[0] == 9 and (lengths >= 1).all()
    assert torch.equal(mask, (torch.arange(9) < lengths[:, None]).long())
    assert 0 <= int(a["input_ids"].min()) and int(a["input_ids"].max()) < 1000
    assert make_example_batch(model, 2)["input_ids"].shape == (2, 16)


def test_make_example_batch_errors():
    model = _load("transformer", max_len=8)
    with pytest.raises(ConfigError, match="seq_len 9 exceeds the model's max_len 8"):
        make_example_batch(model, 2, seq_len=9)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        make_example_batch(model, 0)
    with pytest.raises(ModelError, match="has no input_specs"):
        make_example_batch(torch.nn.Linear(2, 2), 1)


def test_registry_errors_and_passthrough():
    assert model_names() == ["cnn", "minilm", "mlp", "transformer"]
    module = torch.nn.Linear(2, 2)
    assert edgepeft.load_model(module) is module
    with pytest.raises(ModelError, match="unknown model .resnet.; built-in models: cnn, minilm, mlp, transformer"):
        edgepeft.load_model("resnet")
    with pytest.raises(ConfigError, match=r"no option\(s\) \['d'\]; its options are \['vocab_size', 'd_model'"):
        edgepeft.load_model("transformer", d=8)
    with pytest.raises(ConfigError, match=r"d_model \(64\) must be divisible by n_heads \(5\)"):
        edgepeft.load_model("transformer", n_heads=5)
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 1, got 0"):
        edgepeft.load_model("mlp", num_classes=0)
    with pytest.raises(ConfigError, match="only configure built-in models"):
        edgepeft.load_model(module, num_classes=3)
    assert math.isclose(_load("transformer").config.layer_norm_eps, 1e-5)
