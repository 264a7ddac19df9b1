"""Per-class subsampling for ConViT's sample-efficiency protocol (d'Ascoli et al. 2021, Sec. 4.2).

Keep a seeded fraction of every class, and scale the number of epochs by ``1 / fraction`` so the
number of optimisation steps stays the same as with the full data.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def subsample_per_class(labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded ``fraction`` of each class (at least one example per class).

    Each class ``c`` with ``n_c`` examples keeps ``max(1, floor(fraction * n_c))`` of them (ConViT's
    ``int(n_c * sampling_ratio)``): the first ones of a per-class permutation drawn by
    ``numpy.random.default_rng(seed)``, so for one seed a smaller fraction is a subset of a larger one.
    ConViT itself keeps the first files in sorted name order instead of a random draw.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = rng.permutation(idx)  # drawn for every class whatever the fraction: nested subsets
        k = max(1, math.floor(fraction * len(idx) + 1e-9))  # 1e-9: 0.3 * 10 is 2.9999999999999996
        keep.append(perm[:k])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def first_per_class(labels: Sequence[int] | np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``k`` examples of each class (all of a class with fewer): the first ``k`` of a per-class
    permutation drawn by ``numpy.random.default_rng(seed)``, as ``subsample_per_class``, so for one seed a smaller
    ``k`` is a subset of a larger one (few-shot probes with 10 and 25 examples per class, RAGHU Sec. 6)."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def steps_constant_epochs(base_epochs: int | float, fraction: float) -> int:
    """Epochs on a ``fraction`` of the data with the same number of steps as ``base_epochs`` on all of it.

    ``ceil(base_epochs / fraction)`` (rounding guards against float noise: 300 / 0.1 -> 3000).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if base_epochs <= 0:
        raise ValueError(f"base_epochs must be positive, got {base_epochs}")
    return int(math.ceil(round(base_epochs / fraction, 6)))
