"""HF PEFT interop with the real `peft` package: PEFT adapters in, device-trained adapters out.

Import: an adapter saved by `PeftModel.save_pretrained` (LoRA, DoRA or IA3 + a modules_to_save classifier) loaded
with `load_peft_adapter` computes PEFT's logits, and exported it is the bundle's initial trainable state.
Export: an adapter trained by the device runtime, written by `save_peft_adapter`, loads with
`PeftModel.from_pretrained` and gives the device runtime's predictions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from device_runtime import Trainer
from device_runtime.optim_spec import AdamW
from edgepeft import AdapterConfig, DoRAConfig, IA3Config, LoRAConfig, TrainHeadConfig, apply, make_example_batch
from edgepeft.errors import ConfigError, ModelError
from edgepeft.hf_peft import load_peft_adapter, read_peft_adapter, save_peft_adapter
from exporters import export

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("optimum")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random BERT classifier saved as a local model directory (what `from_pretrained` reads)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=24, num_labels=3)
    path = tmp_path_factory.mktemp("base")
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    return path


def _ours(base_dir):
    from edgepeft.models import load_hf_model

    return load_hf_model(base_dir, task="text-classification", num_labels=3)


def _peft_base(base_dir):
    return transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3).eval()


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 60, (4, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _torch(inputs):
    return {k: torch.from_numpy(v) for k, v in inputs.items()}


def _saved_peft_adapter(base_dir, out, use_dora: bool):
    torch.manual_seed(1)
    model = peft.get_peft_model(_peft_base(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", use_dora=use_dora))
    with torch.no_grad():  # a trained-looking adapter: B != 0, a changed classifier and magnitudes
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return model.eval()


def _train_on_device_and_save_for_peft(model, base_dir, tmp_path, lr: float):
    """Export `model`, train it 5 AdamW steps in the device runtime, write its adapter in PEFT's format."""
    export(model, make_example_batch(model, batch_size=3, seq_len=7), out=tmp_path / "bundle", optimizer=AdamW(lr=lr))
    trainer = Trainer.open(tmp_path / "bundle")
    rng = np.random.default_rng(0)
    for step in range(5):
        trainer.step({**_inputs(step), "labels": rng.integers(0, 3, 4).astype(np.int64)})
    trainer.export_adapter(tmp_path / "device_adapter")
    out = save_peft_adapter(tmp_path / "device_adapter", tmp_path / "peft", base_model_name_or_path=str(base_dir))
    return trainer, out


def _assert_peft_predicts_like_the_device(base_dir, tmp_path, trainer, out) -> None:
    loaded = peft.PeftModel.from_pretrained(_peft_base(base_dir), out).eval()
    inputs = _inputs(seed=9)
    with torch.no_grad():
        expected = loaded(**_torch(inputs)).logits.numpy()
    got = trainer.predict(inputs)
    assert np.abs(got - Trainer.open(tmp_path / "bundle").predict(inputs)).max() > 1e-3  # training moved it
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_imported_peft_adapter_computes_peft_logits(base_dir, tmp_path, use_dora: bool) -> None:
    reference = _saved_peft_adapter(base_dir, tmp_path / "peft", use_dora)
    configs, _ = read_peft_adapter(tmp_path / "peft")
    assert type(configs[0]) is (DoRAConfig if use_dora else LoRAConfig) and configs[0].r == 4
    assert configs[1] == TrainHeadConfig(target_modules=["classifier"])
    model = load_peft_adapter(_ours(base_dir), tmp_path / "peft")
    inputs = _torch(_inputs())
    with torch.no_grad():
        np.testing.assert_allclose(model(**inputs).logits.numpy(), reference(**inputs).logits.numpy(),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_imported_peft_adapter_is_the_bundles_initial_state(base_dir, tmp_path) -> None:
    reference = _saved_peft_adapter(base_dir, tmp_path / "peft", use_dora=False)
    model = load_peft_adapter(_ours(base_dir), tmp_path / "peft")
    export(model, make_example_batch(model, batch_size=3, seq_len=7), out=tmp_path / "bundle")
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    initial = load_file(str(tmp_path / "bundle" / "adapter.safetensors"))
    assert len(initial) == len(saved) == 10
    np.testing.assert_array_equal(initial["bert.encoder.layer.1.attention.self.value.lora_B"],
                                  saved["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"])
    inputs = _inputs()
    with torch.no_grad():
        expected = reference(**_torch(inputs)).logits.numpy()
    np.testing.assert_allclose(Trainer.open(tmp_path / "bundle").predict(inputs), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", [LoRAConfig, DoRAConfig], ids=["lora", "dora"])
def test_device_trained_adapter_loads_in_peft_with_the_same_logits(base_dir, tmp_path, method) -> None:
    torch.manual_seed(2)
    model = apply(_ours(base_dir), method(r=4, alpha=8, target_modules=["query", "value"]),
                  TrainHeadConfig(target_modules=["classifier"]))
    trainer, out = _train_on_device_and_save_for_peft(model, base_dir, tmp_path, lr=1e-2)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] == (method is DoRAConfig) and config["modules_to_save"] == ["classifier"]
    _assert_peft_predicts_like_the_device(base_dir, tmp_path, trainer, out)


def test_save_refuses_methods_peft_cannot_hold(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    from safetensors.numpy import save_file

    save_file({"x.adapter.down.weight": np.ones((2, 3), np.float32)}, str(tmp_path / "a" / "adapter.safetensors"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({
        "format": "edgepeft-adapter", "methods": [{"name": "adapter", "config": AdapterConfig().to_dict()}],
        "model": {}}))
    with pytest.raises(ConfigError, match=r"methods \['adapter'\] cannot be written as one PEFT adapter"):
        save_peft_adapter(tmp_path / "a", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelError, match="not an edgepeft adapter or bundle"):
        save_peft_adapter(tmp_path, tmp_path / "out")


def test_read_refuses_per_layer_ranks(tmp_path) -> None:
    from safetensors.numpy import save_file

    save_file({"base_model.model.q.lora_A.weight": np.zeros((2, 3), np.float32)},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"q": 4}}))
    with pytest.raises(ConfigError, match=r"rank_pattern=\{'q': 4\} is not supported"):
        read_peft_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ConfigError, match=r"only LORA \(incl. DoRA\) and IA3 adapters are imported"):
        read_peft_adapter(tmp_path)


# IA3 as in the paper: keys and values scaled at the output, the second feed-forward layer at its input. The suffix
# "output.dense" also selects each attention block's output projection, so two kinds of feed-forward module occur.
_IA3_TARGETS, _IA3_FEEDFORWARD = ["key", "value", "output.dense"], ["output.dense"]


def test_imported_peft_ia3_adapter_computes_peft_logits(base_dir, tmp_path) -> None:
    torch.manual_seed(3)
    reference = peft.get_peft_model(_peft_base(base_dir), peft.IA3Config(
        target_modules=_IA3_TARGETS, feedforward_modules=_IA3_FEEDFORWARD, task_type="SEQ_CLS"))
    with torch.no_grad():
        for p in reference.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    reference.save_pretrained(tmp_path / "peft")
    configs, tensors = read_peft_adapter(tmp_path / "peft")
    assert type(configs[0]) is IA3Config and len(configs[0].feedforward_modules) == 4  # 2 layers x 2 output.dense
    assert all(t.dim() == 1 for n, t in tensors.items() if n.endswith(".ia3_l"))
    model = load_peft_adapter(_ours(base_dir), tmp_path / "peft")
    inputs = _torch(_inputs())
    with torch.no_grad():
        np.testing.assert_allclose(model(**inputs).logits.numpy(), reference.eval()(**inputs).logits.numpy(),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_device_trained_ia3_adapter_loads_in_peft_with_the_same_logits(base_dir, tmp_path) -> None:
    torch.manual_seed(4)
    model = apply(_ours(base_dir), IA3Config(target_modules=_IA3_TARGETS, feedforward_modules=_IA3_FEEDFORWARD),
                  TrainHeadConfig(target_modules=["classifier"]))
    trainer, out = _train_on_device_and_save_for_peft(model, base_dir, tmp_path, lr=5e-2)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and set(config["feedforward_modules"]) <= set(config["target_modules"])
    _assert_peft_predicts_like_the_device(base_dir, tmp_path, trainer, out)
