"""Grouping the classes into N balanced subsets, one per sub-model.

``confusion`` (the default): classes the full model confuses go to the same subset. The teacher's
mean softmax on the training images of class i gives row i of a soft confusion matrix S; the
affinity of two classes is S[i, j] + S[j, i]. A sub-model then learns the hard distinctions inside
its subset (cat vs dog) on its own capacity, and the fusion head only has to tell subsets apart,
which are by construction the pairs the full model already separates well. Subsets are balanced
(sizes differ by at most one): each is grown greedily from the class with the most affinity to the
unassigned ones, adding the unassigned class most attached to its members; then swaps between
subsets that raise the within-subset affinity are applied until none does. Ties are broken by a
seeded permutation of the classes, so the result is deterministic for a seed.

``contiguous``: classes 0..K-1 cut in order; the baseline, and what an untrained model uses.
"""

from __future__ import annotations

import numpy as np


def group_sizes(num_classes: int, n: int) -> list[int]:
    return [num_classes // n + (1 if i < num_classes % n else 0) for i in range(n)]


def contiguous_partition(num_classes: int, n: int) -> list[list[int]]:
    out, start = [], 0
    for size in group_sizes(num_classes, n):
        out.append(list(range(start, start + size)))
        start += size
    return out


def soft_confusion(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Row i: the teacher's mean softmax over the images of class i."""
    s = np.zeros((num_classes, num_classes))
    for c in range(num_classes):
        rows = probs[labels == c]
        if len(rows):
            s[c] = rows.mean(0)
    return s


def _within(groups: list[list[int]], a: np.ndarray) -> float:
    return float(sum(a[np.ix_(g, g)].sum() for g in groups))


def confusion_partition(confusion: np.ndarray, n: int, seed: int = 0) -> list[list[int]]:
    """Balanced groups maximising the affinity (confusion both ways) inside each group."""
    k = confusion.shape[0]
    if not 1 <= n <= k:
        raise ValueError(f"cannot split {k} classes into {n} non-empty groups")
    a = confusion + confusion.T
    np.fill_diagonal(a, 0.0)
    order = list(np.random.default_rng(seed).permutation(k))  # tie-break order
    rank = {c: i for i, c in enumerate(order)}
    free = set(range(k))
    groups: list[list[int]] = []
    for size in sorted(group_sizes(k, n), reverse=True):
        first = max(free, key=lambda c: (a[c, sorted(free)].sum(), -rank[c]))
        group = [first]
        free.discard(first)
        while len(group) < size:
            nxt = max(free, key=lambda c: (a[c, group].sum(), -rank[c]))
            group.append(nxt)
            free.discard(nxt)
        groups.append(group)
    improved = True
    while improved:  # each accepted swap raises the objective, so this ends
        improved = False
        best = _within(groups, a)
        for gi in range(n):
            for gj in range(gi + 1, n):
                for x in list(groups[gi]):
                    for y in list(groups[gj]):
                        groups[gi][groups[gi].index(x)], groups[gj][groups[gj].index(y)] = y, x
                        score = _within(groups, a)
                        if score > best + 1e-12:
                            best, improved = score, True
                            break
                        groups[gi][groups[gi].index(y)], groups[gj][groups[gj].index(x)] = x, y
                    if improved:
                        break
    return [sorted(g) for g in sorted(groups, key=min)]
