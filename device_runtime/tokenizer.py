"""Text to model inputs on the device: a Hugging Face `tokenizer.json` run by the `tokenizers` library (no torch).

`TextTokenizer.from_bundle(bundle_dir)` loads the tokenizer a text bundle was exported with (verified with the
bundle's other files); `TextTokenizer.from_file("tokenizer.json").encode(texts)` gives the int64 `input_ids` / `attention_mask` arrays a
text bundle takes (padded to the longest text, or to `pad_to`; truncated to `max_len`). `causal_lm_labels` turns
a padded batch into next-token labels for a causal LM bundle, with padding and the last position ignored.
`tokenizers` is a small self-contained wheel (Rust, no Python dependencies): `pip install edgepeft[device]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import BatchError, BundleError

__all__ = ["TextTokenizer", "causal_lm_labels", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class TextTokenizer:
    """A `tokenizers.Tokenizer` configured to produce fixed-dtype batches for a bundle."""

    def __init__(self, tokenizer, max_len: int, pad_id: int) -> None:
        self._tokenizer = tokenizer
        self.max_len = int(max_len)
        self.pad_id = int(pad_id)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_len)

    @classmethod
    def from_file(cls, path: Union[str, Path], max_len: int = 128, pad_token: Optional[str] = None) -> "TextTokenizer":
        """Load `tokenizer.json`; `pad_token` defaults to the file's padding token, then [PAD], then id 0."""
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError("device tokenization needs the 'tokenizers' package: pip install tokenizers "
                              "(or edgepeft[device])") from exc
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}; use the bundle's sequence bound")
        tokenizer = Tokenizer.from_file(str(path))
        padding = tokenizer.padding or {}
        pad_id = padding.get("pad_id") if pad_token is None else tokenizer.token_to_id(pad_token)
        if pad_id is None:
            pad_id = tokenizer.token_to_id("[PAD]")
        if pad_id is None and pad_token is not None:
            raise ValueError(f"{path}: the vocabulary has no token {pad_token!r}")
        return cls(tokenizer, max_len, 0 if pad_id is None else pad_id)

    @classmethod
    def from_bundle(cls, bundle, max_len: Optional[int] = None, pad_token: Optional[str] = None) -> "TextTokenizer":
        """The bundle's own tokenizer (`bundle`: a directory or a `Bundle`); `max_len` defaults to the model's.

        A directory is read with every file's sha256 checked, so a damaged tokenizer.json is refused like a
        damaged graph.
        """
        from .bundle import Bundle, read_bundle

        bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
        entry = bundle.manifest.get("tokenizer")
        if entry is None:
            raise BundleError(f"{bundle.path}: this bundle carries no tokenizer; export it with tokenizer=PATH "
                              "(Hugging Face models loaded from a directory with tokenizer.json bring theirs), or "
                              "use TextTokenizer.from_file")
        return cls.from_file(bundle.path / entry["file"], max_len=max_len or entry.get("max_len") or 128,
                             pad_token=pad_token)

    def encode(self, texts: Sequence[str], pad_to: Optional[int] = None) -> dict[str, np.ndarray]:
        """`input_ids` and `attention_mask` [len(texts), T] int64, T = the longest text (or `pad_to`)."""
        if isinstance(texts, str) or not texts:
            raise BatchError("encode takes a non-empty list of strings; wrap a single text in a list")
        encodings = self._tokenizer.encode_batch(list(texts))
        lengths = [len(e.ids) for e in encodings]
        width = max(lengths) if pad_to is None else int(pad_to)
        if width < max(lengths):
            raise BatchError(f"pad_to={pad_to} is shorter than the longest encoded text ({max(lengths)} tokens)")
        ids = np.full((len(texts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : lengths[row]] = encoding.ids
            mask[row, : lengths[row]] = 1
        return {"input_ids": ids, "attention_mask": mask}


def causal_lm_labels(input_ids: np.ndarray, attention_mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """labels[:, t] = input_ids[:, t + 1] where that next token is real, else `ignore_index` (right padding).

    The bundle's cross-entropy then averages the next-token loss over real next tokens only.
    """
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.shape != mask.shape or ids.ndim != 2:
        raise BatchError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [batch, seq]")
    labels = np.full(ids.shape, ignore_index, dtype=np.int64)
    real_next = mask[:, 1:].astype(bool) & mask[:, :-1].astype(bool)
    labels[:, :-1] = np.where(real_next, ids[:, 1:], ignore_index)
    return labels
