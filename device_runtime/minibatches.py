"""Mini-batches for the personalization loop: shuffled epochs over the user's examples, a replay share mixed in.

Data here is a dict of named arrays whose axis 0 indexes examples (the bundle's inputs plus its labels). Replay
examples (from the base model's own data) keep a fixed share of every batch, which limits how much of the base
distribution the adapter forgets while it learns the user's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Optional

import numpy as np

from .errors import BatchError, LoopConfigError

__all__ = ["iterate_batches", "mixed_batches", "num_examples", "replay_count", "split_holdout", "take"]


def num_examples(arrays: Mapping[str, np.ndarray], what: str = "data") -> int:
    """The shared length of axis 0; every array must have one and they must agree."""
    if not arrays:
        raise BatchError(f"{what} has no arrays; pass one array per bundle input plus the labels")
    scalars = sorted(name for name, a in arrays.items() if np.ndim(a) == 0)
    if scalars:
        raise BatchError(f"{what} arrays {scalars} are scalars; axis 0 must index the examples")
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise BatchError(f"{what} arrays must all have the same number of examples (axis 0), got {sizes}")
    (n,) = set(sizes.values())
    if n == 0:
        raise BatchError(f"{what} has no examples; collect some before training")
    return n


def take(arrays: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `index` (a copy), from every array."""
    return {name: a[index] for name, a in arrays.items()}


def split_holdout(
    arrays: Mapping[str, np.ndarray], fraction: float, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A random `fraction` of the examples held out (at least one), and the rest (at least one) to train on."""
    n = num_examples(arrays, "train data")
    held = max(1, int(round(n * fraction)))
    if held >= n:
        raise BatchError(f"holding out {fraction:g} of {n} examples leaves none to train on; collect more examples "
                         "or lower holdout_fraction")
    order = rng.permutation(n)
    return take(arrays, np.sort(order[held:])), take(arrays, np.sort(order[:held]))


def iterate_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, rng: Optional[np.random.Generator] = None
) -> Iterator[dict[str, np.ndarray]]:
    """Endless mini-batches over shuffled epochs (rng given) or one ordered pass (rng None)."""
    n = num_examples(arrays)
    while True:
        order = rng.permutation(n) if rng is not None else np.arange(n)
        for start in range(0, n, batch_size):
            yield take(arrays, order[start : start + batch_size])
        if rng is None:
            return


def replay_count(batch_size: int, replay_share: float) -> int:
    """Replay examples per batch: the share of the batch, rounded, at least one and leaving one user example."""
    if replay_share <= 0:
        return 0
    count = max(1, int(round(batch_size * replay_share)))
    if count >= batch_size:
        raise LoopConfigError(f"replay_share {replay_share:g} of batch_size {batch_size} leaves no room for the "
                              "user's examples; lower replay_share or raise batch_size")
    return count


def mixed_batches(
    user: Mapping[str, np.ndarray],
    batch_size: int,
    rng: np.random.Generator,
    replay: Optional[Mapping[str, np.ndarray]] = None,
    replay_share: float = 0.0,
    replay_rng: Optional[np.random.Generator] = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches: `batch_size - k` user examples plus `k = replay_count(...)` replay examples each.

    The two streams shuffle independently, each over its own epochs. Without replay this is exactly
    `iterate_batches(user, batch_size, rng)`, so adding the option changed no existing run.
    """
    k = replay_count(batch_size, replay_share) if replay is not None else 0
    users = iterate_batches(user, batch_size - k, rng)
    if k == 0:
        yield from users
        return
    replays = iterate_batches(replay, k, replay_rng if replay_rng is not None else rng)
    for own in users:
        extra = next(replays)
        yield {name: np.concatenate([own[name], extra[name]]) for name in own}
