"""SampleBuffer: reservoir sampling is uniform, FIFO keeps the newest, order and files survive, bad input refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_runtime import BatchError, LoopConfigError, SampleBuffer, SampleBufferError


def stream(start: int, n: int) -> dict[str, np.ndarray]:
    """n examples whose features and label encode their stream position."""
    ids = np.arange(start, start + n)
    return {"x": np.stack([ids, -ids], axis=1).astype(np.float32), "labels": ids.astype(np.int64)}


def test_fifo_keeps_the_newest_in_arrival_order() -> None:
    buf = SampleBuffer(5, "fifo")
    assert buf.add(stream(0, 3)) == 3
    assert buf.add(stream(3, 4)) == 4
    assert (len(buf), buf.seen) == (5, 7)
    np.testing.assert_array_equal(buf.arrays()["labels"], [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(buf.arrays()["x"][:, 1], [-2, -3, -4, -5, -6])  # rows stay together
    assert buf.add(stream(7, 12)) == 5  # a batch larger than the buffer keeps only its tail
    np.testing.assert_array_equal(buf.arrays()["labels"], [14, 15, 16, 17, 18])


def test_reservoir_fills_then_samples_uniformly() -> None:
    buf = SampleBuffer(10, "reservoir", seed=1)
    buf.add(stream(0, 10))
    np.testing.assert_array_equal(buf.arrays()["labels"], np.arange(10))  # not full yet: keeps everything
    # Over many seeded runs every position of a 100-example stream is kept with probability 10/100.
    counts = np.zeros(100)
    for seed in range(2000):
        buf = SampleBuffer(10, "reservoir", seed=seed)
        for start in range(0, 100, 30):  # uneven chunks (30, 30, 30, 10)
            buf.add(stream(start, min(30, 100 - start)))
        kept = buf.arrays()["labels"]
        assert len(kept) == 10 and len(set(kept)) == 10 and np.all(np.diff(kept) > 0)  # arrival order
        counts[kept] += 1
    frequency = counts / 2000
    assert abs(frequency.mean() - 0.1) < 1e-12
    assert frequency.min() > 0.07 and frequency.max() < 0.13  # binomial sd ~0.0067: all within 4.5 sd
    assert abs(frequency[:50].mean() - frequency[50:].mean()) < 0.01  # old and new examples equally likely


def test_one_example_at_a_time_equals_one_batch() -> None:
    one_by_one, batched = SampleBuffer(8, seed=3), SampleBuffer(8, seed=3)
    for i in range(40):
        one_by_one.add(stream(i, 1))
    batched.add(stream(0, 40))
    np.testing.assert_array_equal(one_by_one.arrays()["labels"], batched.arrays()["labels"])


def test_arrays_are_copies() -> None:
    buf = SampleBuffer(4)
    buf.add(stream(0, 4))
    buf.arrays()["labels"][:] = 99
    np.testing.assert_array_equal(buf.arrays()["labels"], [0, 1, 2, 3])


def test_save_load_continues_the_same_sample(tmp_path: Path) -> None:
    straight, saved = SampleBuffer(6, seed=5), SampleBuffer(6, seed=5)
    straight.add(stream(0, 30))
    saved.add(stream(0, 30))
    path = saved.save(tmp_path / "buffer.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffer.npz"]  # written in place, no temp left
    loaded = SampleBuffer.load(path)
    assert (loaded.capacity, loaded.policy, loaded.seen, len(loaded)) == (6, "reservoir", 30, 6)
    straight.add(stream(30, 50))
    loaded.add(stream(30, 50))  # the random state was saved too: the same examples are kept
    for name in ("x", "labels"):
        np.testing.assert_array_equal(loaded.arrays()[name], straight.arrays()[name])
    empty = SampleBuffer(3, "fifo").save(tmp_path / "empty.npz")
    assert len(SampleBuffer.load(empty)) == 0


def test_load_refuses_damaged_or_foreign_files(tmp_path: Path) -> None:
    buf = SampleBuffer(4)
    buf.add(stream(0, 9))
    good = buf.save(tmp_path / "good.npz")
    raw = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.npz").write_text("not a buffer")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with np.load(good) as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(tmp_path / "short.npz", **{**arrays, "arrival": arrays["arrival"][:2]})
    np.savez(tmp_path / "dupes.npz", **{**arrays, "arrival": np.zeros(4, np.int64)})
    np.savez(tmp_path / "version.npz", **{**arrays, "meta": np.array(str(arrays["meta"]).replace(
        '"format_version": 1', '"format_version": 9'))})
    np.savez(tmp_path / "strings.npz", **{**arrays, "example::x": np.array([["a", "b"]] * 4)})
    np.savez(tmp_path / "meta.npz", **{**arrays, "meta": np.array("[1, 2]")})
    for name, message in [("truncated.npz", "not a readable sample buffer"), ("text.npz", "not a readable"),
                          ("plain.npy", "not a readable"), ("short.npz", "does not fit seen=9"),
                          ("dupes.npz", "arrival positions"), ("version.npz", "version 9"),
                          ("strings.npz", "not all numeric"), ("meta.npz", "metadata is a list"),
                          ("missing.npz", "not a readable")]:
        with pytest.raises(SampleBufferError, match=message) as info:
            SampleBuffer.load(tmp_path / name)
        assert name in str(info.value) and "delete it to start a new buffer" in str(info.value)


def test_mismatched_examples_are_refused() -> None:
    buf = SampleBuffer(4)
    buf.add(stream(0, 2))
    good = stream(2, 2)
    cases = [
        ({"x": good["x"]}, r"the buffer holds \['labels', 'x'\], these examples have \['x'\]"),
        ({**good, "x": good["x"].astype(np.float64)}, r"'x' examples are float64 \[2\], the buffer holds float32"),
        ({**good, "x": np.zeros((2, 3), np.float32)}, r"'x' examples are float32 \[3\]"),
        ({**good, "labels": good["labels"][:1]}, r"examples must share axis 0"),
        ({**good, "labels": np.int64(3)}, r"examples must share axis 0"),
        ({**good, "x": np.array([["a", "b"]] * 2)}, r"'x' has dtype <U1; the buffer keeps numeric arrays only"),
        ({}, r"add\(\) takes a dict"),
    ]
    for examples, message in cases:
        with pytest.raises(BatchError, match=message):
            buf.add(examples)
    assert (len(buf), buf.seen) == (2, 2)  # nothing was half-added
    assert buf.add({k: v[:0] for k, v in good.items()}) == 0


def test_constructor_checks() -> None:
    with pytest.raises(LoopConfigError, match="buffer capacity must be an int >= 1, got 0"):
        SampleBuffer(0)
    with pytest.raises(LoopConfigError, match="unknown buffer policy 'newest'"):
        SampleBuffer(3, "newest")
