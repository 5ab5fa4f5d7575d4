"""Property-based fuzzing: whatever a manifest, a batch, a checkpoint or a buffer file holds, the runtime either
accepts it (and then it is well-formed) or refuses it with one of our error types, never KeyError/TypeError/etc.

Hypothesis runs derandomized (a fixed seed per test) so the suite stays deterministic.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from .damage import flipped
from .handmade_bundle import IGNORE, NUM_CLASSES, Handmade, build_bundle

from device_runtime import (
    AdamW,
    BatchError,
    BundleError,
    CheckpointError,
    SampleBuffer,
    SampleBufferError,
    load_checkpoint,
    read_bundle,
    save_checkpoint,
    validate_batch,
)
from device_runtime.manifest_schema import MANIFEST_SHA256, manifest_sha256, parse_manifest

FUZZ = settings(derandomize=True, deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["float32", "int64", "batch", "cross_entropy", "adamw", "sgd", "onnx", "eval.onnx", "../x",
                     "/abs", "", "x", "labels", "lr", "a::b", "0" * 64]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location inside a JSON value, as a key/index path."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, prefix + (i,))
    return out


@st.composite
def mutated_manifests(draw: st.DrawFn, base: dict) -> dict:
    """The valid manifest with 1-4 random edits: delete, replace with any JSON, retype, duplicate or wrap."""
    manifest = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(paths(manifest)[1:]))
        parent = manifest
        for key in where[:-1]:
            parent = parent[key]
        key = where[-1]
        op = draw(st.sampled_from(["delete", "replace", "wrap", "duplicate", "stringify"]))
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(json_values)
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif op == "stringify":
            parent[key] = json.dumps(parent[key])
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        else:
            parent[key + "_copy"] = copy.deepcopy(parent[key])
        if not paths(manifest)[1:]:
            break
    return manifest


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Handmade:
    return build_bundle(tmp_path_factory.mktemp("fuzz") / "bundle", AdamW(lr=0.01))


def test_parse_manifest_accepts_the_base(base: Handmade) -> None:
    parse_manifest(base.bundle.manifest, "base")


def test_mutated_manifests_raise_only_bundle_errors(base: Handmade) -> None:
    manifest = base.bundle.manifest
    outcomes = {"ok": 0, "refused": 0}

    @FUZZ
    @given(mutated_manifests(manifest))
    def run(mutated: dict) -> None:
        try:
            parsed = parse_manifest(mutated, "fuzz")
        except BundleError:
            outcomes["refused"] += 1
            return
        outcomes["ok"] += 1
        assert parsed.trainable and parsed.inputs  # accepted means usable

    run()
    assert outcomes["refused"] > 200  # the mutations mostly break something: the fuzzer is not idling


@FUZZ
@given(json_values)
def test_arbitrary_json_is_refused_cleanly(value: Any) -> None:
    with pytest.raises(BundleError):
        parse_manifest(value, "fuzz")


def test_mutated_manifest_files_raise_only_bundle_errors(tmp_path: Path, base: Handmade) -> None:
    """The same through read_bundle, with the checksum resealed half of the time so the schema runs behind it."""
    root = tmp_path / "bundle"
    shutil.copytree(base.bundle.path, root)

    @settings(FUZZ, max_examples=100)
    @given(mutated_manifests(base.bundle.manifest), st.booleans())
    def run(mutated: dict, reseal: bool) -> None:
        if reseal:
            try:
                mutated[MANIFEST_SHA256] = manifest_sha256(mutated)
            except ValueError:  # NaN / Infinity cannot be written canonically: leave the old checksum
                pass
        (root / "manifest.json").write_text(json.dumps(mutated))
        try:
            read_bundle(root, verify=False)
        except BundleError:
            pass

    run()


# ---- validate_batch ----
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_,
          np.complex64]
values = st.one_of(
    hnp.arrays(dtype=st.sampled_from(DTYPES), shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
    hnp.arrays(dtype=np.float32, shape=st.tuples(st.integers(0, 4), st.just(4)),
               elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    hnp.arrays(dtype=np.int64, shape=st.integers(0, 4), elements=st.integers(-200, 5)),
    json_values,
)


@st.composite
def near_valid_batches(draw: st.DrawFn) -> tuple[dict, bool]:
    """(batch, with_labels) that is right or nearly right: the interesting boundary for a validator."""
    n = draw(st.integers(1, 5))
    x = draw(hnp.arrays(np.float32, (n, 4), elements=st.floats(-1e3, 1e3, width=32)))
    labels = draw(hnp.arrays(np.int64, n, elements=st.sampled_from([0, 1, 2, IGNORE])))
    with_labels = draw(st.booleans())
    batch: dict[str, Any] = {"x": x, "labels": labels} if with_labels else {"x": x}
    for _ in range(draw(st.integers(0, 1))):
        key = draw(st.sampled_from(["x", "labels"]))
        change = draw(st.sampled_from(["dtype", "reshape", "drop", "list", "slice", "poison"]))
        if key not in batch:
            continue
        if change == "dtype":
            with np.errstate(all="ignore"):  # 3e38 -> int overflows; that garbage is fine input here
                batch[key] = np.asarray(batch[key]).astype(draw(st.sampled_from(DTYPES)))
        elif change == "reshape":
            batch[key] = np.asarray(batch[key]).reshape(draw(st.sampled_from([(-1,), (1, -1), (-1, 1)])))
        elif change == "drop":
            del batch[key]
        elif change == "list":
            batch[key] = np.asarray(batch[key]).tolist()
        elif change == "slice":
            batch[key] = np.asarray(batch[key])[: draw(st.integers(0, n))]
        else:  # one bad value: NaN/Inf in the features, an out-of-range class id in the labels
            bad = draw(st.sampled_from([np.nan, np.inf, -np.inf] if key == "x" else [-1, NUM_CLASSES, 2**40]))
            poisoned = np.array(batch[key], copy=True)
            if poisoned.size == 0 or poisoned.dtype.kind not in ("f" if key == "x" else "iu"):
                continue
            with np.errstate(all="ignore"):
                try:
                    poisoned.reshape(-1)[draw(st.integers(0, poisoned.size - 1))] = bad
                except OverflowError:  # 2**40 does not fit a narrowed label dtype; leave this batch as it is
                    continue
            batch[key] = poisoned
    return batch, with_labels


def test_validate_batch_accepts_well_formed_or_raises_batch_error(base: Handmade) -> None:
    outcomes = {"ok": 0, "refused": 0}

    @FUZZ
    @given(st.one_of(near_valid_batches(), st.tuples(
        st.dictionaries(st.sampled_from(["x", "labels", "extra", "x "]), values, max_size=3), st.booleans())))
    def run(case: tuple[dict, bool]) -> None:
        batch, with_labels = case
        try:
            out = validate_batch(batch, base.bundle, with_labels=with_labels)
        except BatchError:
            outcomes["refused"] += 1
            return
        outcomes["ok"] += 1
        assert set(out) == ({"x", "labels"} if with_labels else {"x"})
        x = out["x"]
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 4 and x.shape[0] >= 1
        assert np.isfinite(x).all() and x.flags.c_contiguous
        if with_labels:
            labels = out["labels"]
            assert labels.dtype == np.int64 and labels.shape == (x.shape[0],)
            assert np.all((labels == IGNORE) | ((labels >= 0) & (labels < NUM_CLASSES)))

    run()
    assert outcomes["ok"] >= 30 and outcomes["refused"] >= 100, outcomes  # both branches really ran


# ---- bytes on disk: checkpoints and sample buffers ----
def test_every_bit_flip_in_a_checkpoint_is_refused(tmp_path: Path, base: Handmade) -> None:
    """All 8 bits of every byte: tensors (payload hash), metadata such as the step (metadata hash), header."""
    state = {s.name: np.full(s.shape, 0.25, np.float32) for s in base.bundle.optimizer_state}
    file = save_checkpoint(tmp_path / "ck", base.bundle.bundle_id, 5, {"head.weight": base.weight,
                                                                       "head.bias": base.bias}, state)
    raw = file.read_bytes()
    accepted = []
    for offset in range(len(raw)):
        for bit in range(8):
            with flipped(file, offset, 1 << bit) as damaged:
                try:
                    step, trainable, _ = load_checkpoint(tmp_path / "ck", base.bundle)
                except CheckpointError:
                    continue
            accepted.append(damaged)
            assert step == 5 and np.array_equal(trainable["head.weight"], base.weight)
    # Only JSON whitespace in the header can change without changing a value: a space becoming a tab or newline.
    assert set(accepted) <= {b"\t", b"\n", b"\r"} and len(accepted) < 100, accepted
    step_digit = raw.index(b'"step":"5"') + len(b'"step":"')
    with flipped(file, step_digit, 0x01):  # "5" -> "4": the case that used to load as step 4
        with pytest.raises(CheckpointError, match="metadata does not match its metadata_sha256"):
            load_checkpoint(tmp_path / "ck", base.bundle)
    for cut in range(0, len(raw), max(1, len(raw) // 50)):
        file.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / "ck", base.bundle)


def test_bit_flips_in_a_buffer_file_never_escape_as_foreign_errors(tmp_path: Path) -> None:
    buf = SampleBuffer(4, seed=1)
    buf.add({"x": np.arange(20, dtype=np.float32).reshape(10, 2), "labels": np.arange(10)})
    path = buf.save(tmp_path / "buffer.npz")
    reference = buf.arrays()
    refused = 0
    for offset in range(path.stat().st_size):
        with flipped(path, offset, 0x10):
            try:
                loaded = SampleBuffer.load(path)
            except SampleBufferError:
                refused += 1
                continue
        # zip metadata (timestamps, attributes) can change harmlessly; the examples themselves are CRC-checked
        for name, value in reference.items():
            np.testing.assert_array_equal(loaded.arrays()[name], value)
    assert refused > path.stat().st_size // 2


def test_fuzz_helpers_cover_nested_paths() -> None:
    assert paths({"a": [1, {"b": 2}]}) == [(), ("a",), ("a", 0), ("a", 1), ("a", 1, "b")]
