"""Screening and DP maths of the fleet aggregator, on small hand-built updates (no Flower run needed)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from edgepeft.errors import ConfigError
from edgepeft.fleet.robust import (
    DPConfig,
    RobustConfig,
    dp_mean,
    gaussian_epsilon,
    screen_updates,
    update_norm,
    weighted_mean,
)


def _update(rng: np.random.Generator, norm: float) -> dict[str, np.ndarray]:
    a, b = rng.normal(size=(4, 8)), rng.normal(size=(8,))
    scale = norm / math.sqrt(float(np.sum(a**2) + np.sum(b**2)))
    return {"lora_A": (a * scale).astype(np.float32), "bias": (b * scale).astype(np.float32)}


def _cohort(n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [_update(rng, norm) for norm in np.linspace(1.0, 2.0, n)]


def test_update_norm_is_the_global_l2_norm_over_all_tensors() -> None:
    update = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}
    assert update_norm(update) == 5.0
    assert math.isnan(update_norm({"a": np.array([1.0, np.nan], np.float32)}))
    assert math.isnan(update_norm({"a": np.array([np.inf], np.float32)}))


def test_non_finite_and_huge_updates_are_rejected_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    updates = _cohort()
    updates[2] = {k: np.full_like(v, np.nan) for k, v in updates[2].items()}
    updates[5] = {**updates[5], "bias": np.full_like(updates[5]["bias"], np.inf)}
    updates[6] = _update(np.random.default_rng(1), 1e6)
    with caplog.at_level(logging.WARNING, logger="edgepeft.fleet"):
        kept, decisions = screen_updates(updates, list(range(8)), RobustConfig())
    assert [d.action for d in decisions] == ["accepted"] * 2 + ["rejected"] + ["accepted"] * 2 + ["rejected"] * 2 + [
        "accepted"]
    assert [k is None for k in kept] == [d.action == "rejected" for d in decisions]
    assert decisions[6].norm == pytest.approx(1e6, rel=1e-6)
    assert "x cohort median" in decisions[6].reason and "non-finite" in decisions[2].reason
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 3
    for update, kept_update in zip(updates, kept):  # what is accepted is passed on unchanged
        if kept_update is not None:
            for name in update:
                assert kept_update[name].dtype == np.float64  # aggregated in float64
                np.testing.assert_array_equal(kept_update[name], update[name])


def test_clip_mode_scales_an_outlier_down_to_the_bound() -> None:
    updates = _cohort()
    updates[0] = _update(np.random.default_rng(2), 1e6)
    finite_median = float(np.median([update_norm(u) for u in updates]))
    kept, decisions = screen_updates(updates, list(range(8)), RobustConfig(max_norm_ratio=3.0, outlier_action="clip"))
    assert decisions[0].action == "clipped"
    assert update_norm(kept[0]) == pytest.approx(3.0 * finite_median, rel=1e-9)
    np.testing.assert_allclose(kept[0]["bias"] / updates[0]["bias"], decisions[0].scale, rtol=1e-5)  # same direction


def test_the_median_rule_needs_a_cohort() -> None:
    updates = _cohort(2)
    updates[1] = _update(np.random.default_rng(3), 1e6)
    _, decisions = screen_updates(updates, [0, 1], RobustConfig())  # a median of two would be the attacker's half
    assert [d.action for d in decisions] == ["accepted", "accepted"]
    _, decisions = screen_updates(updates, [0, 1], RobustConfig(), median_rule=False)
    assert [d.action for d in decisions] == ["accepted", "accepted"]


def test_weighted_mean_weights_by_examples() -> None:
    a = {"t": np.array([1.0, 2.0], np.float32)}
    b = {"t": np.array([4.0, -1.0], np.float32)}
    np.testing.assert_allclose(weighted_mean([a, b], [1, 2])["t"], [3.0, 0.0])


def test_dp_mean_clips_each_update_and_adds_calibrated_noise() -> None:
    updates = _cohort(4)  # norms 1 .. 2
    config = DPConfig(clip_norm=1.5, noise_multiplier=0.8)
    noiseless, report = dp_mean(updates, DPConfig(clip_norm=1.5, noise_multiplier=0.0), np.random.default_rng(0))
    clipped = [{k: v.astype(np.float64) * min(1.0, 1.5 / update_norm(u)) for k, v in u.items()} for u in updates]
    np.testing.assert_allclose(noiseless["lora_A"], np.mean([c["lora_A"] for c in clipped], axis=0), rtol=1e-6)
    assert report.clipped == 2 and report.cohort == 4  # norms 1.67 and 2.0 are above 1.5
    draws = np.concatenate([(dp_mean(updates, config, np.random.default_rng(s))[0]["lora_A"] -
                             noiseless["lora_A"]).ravel() for s in range(200)])
    expected = 0.8 * 1.5 / 4
    assert dp_mean(updates, config, np.random.default_rng(0))[1].noise_std == pytest.approx(expected)
    assert np.std(draws) == pytest.approx(expected, rel=0.03)
    assert abs(np.mean(draws)) < 0.01 * expected * 10


def test_gaussian_epsilon_matches_the_closed_form_rdp_bound() -> None:
    # min over a of R*a/(2 z^2) + ln(1/delta)/(a - 1) is reached at a = 1 + z*sqrt(2 ln(1/delta) / R), giving
    # R/(2 z^2) + sqrt(2 R ln(1/delta)) / z; the accountant searches a grid of orders, so it lands just above.
    for z, rounds in ((1.0, 20), (2.0, 50), (5.0, 10)):
        closed = rounds / (2 * z**2) + math.sqrt(2 * rounds * math.log(1e5)) / z
        eps = gaussian_epsilon(z, rounds, 1e-5)
        assert closed <= eps <= closed * 1.002
    assert gaussian_epsilon(1.0, 40, 1e-5) > gaussian_epsilon(1.0, 20, 1e-5) > gaussian_epsilon(2.0, 20, 1e-5)
    assert gaussian_epsilon(0.0, 1, 1e-5) == math.inf


@pytest.mark.parametrize("kwargs", [{"max_norm_ratio": 0.5}, {"outlier_action": "drop"}, {"min_cohort": 2}])
def test_robust_config_refuses_nonsense(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        RobustConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"clip_norm": 0.0, "noise_multiplier": 1.0},
                                    {"clip_norm": 1.0, "noise_multiplier": -1.0},
                                    {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.5}])
def test_dp_config_refuses_nonsense(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        DPConfig(**kwargs)


def test_claimed_sample_counts_are_capped_at_a_multiple_of_the_median(caplog: pytest.LogCaptureFixture) -> None:
    from edgepeft.fleet.robust import cap_weights

    honest = [30, 41, 55, 78, 40]
    assert cap_weights(honest, list(range(5)), RobustConfig()) == [float(w) for w in honest]  # nobody above 5 x 41
    with caplog.at_level(logging.WARNING, logger="edgepeft.fleet"):
        capped = cap_weights(honest + [10**9], list(range(6)), RobustConfig())
    assert capped[-1] == 5 * float(np.median(honest + [10**9]))
    assert "client 5: claimed 1000000000 examples" in caplog.text
