"""Robust aggregation of adapter updates: drop non-finite ones, reject or clip norm outliers, optional central DP.

An update is what a client's round changed: its returned trainable tensors minus the global ones it was sent.
Screening happens per round over the cohort that replied:
1. any NaN or Inf, or a malformed reply, rejects the update (one bad device must not poison everyone);
2. with at least `min_cohort` finite updates, an update whose L2 norm exceeds `max_norm_ratio` times the cohort's
   median norm is an outlier: rejected, or scaled down to that bound (`outlier_action="clip"`). The median is
   what a minority of attackers cannot move, so a 1e6-norm update stands out however large it is;
3. FedAvg weights (self-reported sample counts) are capped the same way (`cap_weights`).
Every decision is logged on the `edgepeft.fleet` logger and returned, so the round record shows who was dropped.

Differential privacy (`DPConfig`) is central, client-level DP with a trusted server: each update is clipped to
`clip_norm`, the clipped updates are averaged with equal weight, and Gaussian noise with standard deviation
`noise_multiplier * clip_norm / n` is added to the mean. The median rule is then off (its data-dependent
decision is not covered by the accounting; clipping already bounds every client). `gaussian_epsilon` turns the
noise multiplier and the number of rounds into an (epsilon, delta) bound with the RDP accountant of the Gaussian
mechanism (every client in every round, no subsampling amplification: a conservative figure).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..errors import ConfigError, check_positive_number

__all__ = ["ACTIONS", "DPConfig", "DPReport", "RobustConfig", "UpdateDecision", "cap_weights", "dp_mean",
           "gaussian_epsilon", "screen_updates", "update_norm", "weighted_mean"]

log = logging.getLogger("edgepeft.fleet")

ACTIONS = ("accepted", "clipped", "rejected")
Tensors = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class RobustConfig:
    """How a round screens its updates. `max_norm_ratio` is a multiple of the cohort's median update norm."""

    max_norm_ratio: float = 5.0
    outlier_action: str = "reject"  # or "clip": scale the update down to max_norm_ratio x median
    min_cohort: int = 3  # the median rule needs this many finite updates; fewer and only non-finite ones are dropped

    def __post_init__(self) -> None:
        check_positive_number("max_norm_ratio", self.max_norm_ratio, "5 rejects updates five times the median norm")
        if self.max_norm_ratio < 1:
            raise ConfigError(f"max_norm_ratio must be >= 1 (a ratio to the median), got {self.max_norm_ratio}; "
                              "pass e.g. 5")
        if self.outlier_action not in ("reject", "clip"):
            raise ConfigError(f"outlier_action must be 'reject' or 'clip', got {self.outlier_action!r}")
        if isinstance(self.min_cohort, bool) or not isinstance(self.min_cohort, int) or self.min_cohort < 3:
            raise ConfigError(f"min_cohort must be an int >= 3 (a median of two is their mean), got "
                              f"{self.min_cohort!r}")


@dataclass(frozen=True)
class DPConfig:
    """Central client-level DP: clip every update to `clip_norm`, add N(0, (noise_multiplier * clip_norm / n)^2)."""

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_number("clip_norm", self.clip_norm, "set it near the median update norm of a run without DP")
        if isinstance(self.noise_multiplier, bool) or not isinstance(self.noise_multiplier, (int, float)) or not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}; "
                              "1.0 is a common start")
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise ConfigError(f"delta must be a float in (0, 1), got {self.delta!r}; use about 1/number of users")


@dataclass(frozen=True)
class UpdateDecision:
    """What screening did with one client's update (`norm` is NaN for a non-finite one)."""

    client_id: int
    norm: float
    action: str
    reason: str
    scale: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DPReport:
    """One round's DP figures: what was clipped and how much noise the mean received."""

    clip_norm: float
    noise_multiplier: float
    noise_std: float
    clipped: int
    cohort: int

    def to_dict(self) -> dict:
        return asdict(self)


def update_norm(update: Tensors) -> float:
    """Global L2 norm over all tensors of an update, in float64 (NaN or Inf if any value is not finite)."""
    total = 0.0
    for value in update.values():
        total += float(np.sum(np.square(value, dtype=np.float64)))
    return math.sqrt(total) if math.isfinite(total) else float("nan")


def _scaled(update: Tensors, scale: float) -> dict[str, np.ndarray]:
    return {name: np.asarray(value, dtype=np.float64) * scale for name, value in update.items()}


def screen_updates(updates: Sequence[Tensors], client_ids: Sequence[int], config: RobustConfig,
                   median_rule: bool = True) -> tuple[list[Optional[dict[str, np.ndarray]]], list[UpdateDecision]]:
    """Screen a round's updates; returns the kept ones (None where rejected, clipped ones scaled) and decisions."""
    norms = [update_norm(u) for u in updates]
    finite = [n for n in norms if math.isfinite(n)]
    bound = None
    if median_rule and len(finite) >= config.min_cohort:
        bound = config.max_norm_ratio * float(np.median(finite))
    kept: list[Optional[dict[str, np.ndarray]]] = []
    decisions: list[UpdateDecision] = []
    for update, norm, client in zip(updates, norms, client_ids):
        if not math.isfinite(norm):
            decision = UpdateDecision(client, norm, "rejected", "non-finite values (NaN or Inf)", 0.0)
            kept.append(None)
        elif bound is not None and norm > bound:
            reason = f"norm {norm:.4g} > {config.max_norm_ratio:g} x cohort median ({bound:.4g})"
            if config.outlier_action == "clip":
                scale = bound / norm
                decision = UpdateDecision(client, norm, "clipped", reason, scale)
                kept.append(_scaled(update, scale))
            else:
                decision = UpdateDecision(client, norm, "rejected", reason, 0.0)
                kept.append(None)
        else:
            decision = UpdateDecision(client, norm, "accepted", "", 1.0)
            kept.append(_scaled(update, 1.0))
        if decision.action != "accepted":
            log.warning("client %s: update %s (%s)", client, decision.action, decision.reason)
        decisions.append(decision)
    return kept, decisions


def cap_weights(weights: Sequence[float], client_ids: Sequence[int], config: RobustConfig) -> list[float]:
    """FedAvg weights (sample counts) capped at `max_norm_ratio` x their median, so no claim can outweigh the rest.

    A client reports its own sample count; without a cap, one claiming a billion examples would make the mean its
    own update whatever its norm. Honest counts rarely differ by the ratio, so they pass unchanged.
    """
    if len(weights) < config.min_cohort:
        return list(weights)
    cap = config.max_norm_ratio * float(np.median(weights))
    for client, weight in zip(client_ids, weights):
        if weight > cap:
            log.warning("client %s: claimed %s examples, weighted as %.4g (%g x the cohort median)", client, weight,
                        cap, config.max_norm_ratio)
    return [min(float(w), cap) for w in weights]


def weighted_mean(updates: Sequence[Tensors], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """FedAvg's mean: sum of w_i * update_i / sum of w_i, in float64."""
    total = float(sum(weights))
    if not updates or total <= 0:
        raise ValueError("weighted_mean needs at least one update with a positive weight")
    names = list(updates[0])
    return {name: sum(np.asarray(u[name], dtype=np.float64) * (w / total) for u, w in zip(updates, weights))
            for name in names}


def dp_mean(updates: Sequence[Tensors], config: DPConfig, rng: np.random.Generator
            ) -> tuple[dict[str, np.ndarray], DPReport]:
    """Clip each update to `clip_norm`, average with equal weights, add Gaussian noise calibrated to one client."""
    if not updates:
        raise ValueError("dp_mean needs at least one update")
    clipped = 0
    bounded = []
    for update in updates:
        norm = update_norm(update)
        scale = min(1.0, config.clip_norm / norm) if norm > 0 else 1.0
        clipped += scale < 1.0
        bounded.append(_scaled(update, scale))
    n = len(bounded)
    mean = weighted_mean(bounded, [1.0] * n)
    std = config.noise_multiplier * config.clip_norm / n
    noisy = {name: value + rng.normal(0.0, std, size=value.shape) for name, value in mean.items()}
    return noisy, DPReport(config.clip_norm, config.noise_multiplier, std, clipped, n)


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` Gaussian releases of noise multiplier z: min over a of R a/(2 z^2) + ln(1/delta)/(a-1).

    Renyi DP of the Gaussian mechanism with sensitivity 1 and std z is a/(2 z^2) at order a; it adds up over
    rounds, and converts to (epsilon, delta)-DP by the standard bound. Infinite without noise.
    """
    if noise_multiplier <= 0:
        return math.inf
    orders = np.concatenate([np.linspace(1.01, 10, 200), np.linspace(10, 1000, 400)])
    eps = rounds * orders / (2 * noise_multiplier**2) + math.log(1 / delta) / (orders - 1)
    return float(eps.min())
