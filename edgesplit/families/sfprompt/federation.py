"""What the federation needs besides the model (numpy only: the Flower apps import it too):
non-IID partitions, client sampling and FedAvg of named arrays.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def dirichlet_partition(
    labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Split sample indices among ``clients`` with label skew (Hsu et al. 2019): for each class,
    the shares of the clients are drawn from Dirichlet(alpha); smaller alpha, more skew. Redrawn
    (same seed stream) until every client holds at least ``min_size`` samples. Deterministic in
    ``seed``; each index is in exactly one part; each part is sorted."""
    labels = np.asarray(labels)
    if clients < 1 or alpha <= 0:
        raise ValueError(f"clients must be >= 1 and alpha > 0, got {clients}, {alpha}")
    if len(labels) < clients * min_size:
        raise ValueError(f"{len(labels)} samples cannot give {clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) partition gave every one of {clients} clients {min_size} samples")


def sample_clients(clients: int, per_round: int, round_no: int, seed: int) -> list[int]:
    """The clients of round ``round_no``: ``per_round`` distinct ids, drawn from a stream seeded by
    (seed, round) so that a resumed run samples what the uninterrupted one would have."""
    rng = np.random.default_rng([seed, round_no])
    return sorted(rng.choice(clients, size=per_round, replace=False).tolist())


def fedavg(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """The weighted mean of named arrays (weights: each client's sample count). Every state must
    have the same names and shapes, and finite values; anything else is refused (ValueError)."""
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"fedavg weights must be finite, >= 0 and not all zero, got {list(weights)}")
    names = set(states[0])
    for s in states:
        check_state(s, states[0])
        if set(s) != names:
            raise ValueError("fedavg: the states name different arrays")
    w = w / w.sum()
    return {k: sum(wi * np.asarray(s[k], np.float64) for wi, s in zip(w, states)).astype(np.float32) for k in names}


def check_state(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Refuse (ValueError) a client's upload with other names, other shapes or non-finite values."""
    if set(state) != set(reference):
        raise ValueError(
            f"names differ: missing {sorted(set(reference) - set(state))}, unknown {sorted(set(state) - set(reference))}"
        )
    for k, v in state.items():
        a = np.asarray(v)
        if a.shape != np.asarray(reference[k]).shape:
            raise ValueError(f"'{k}': shape {list(a.shape)}, expected {list(np.asarray(reference[k]).shape)}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"'{k}': holds NaN or infinity")
