"""``fake``: a small, deterministic, learnable data set for tests.

Each class is a distinct low-frequency pattern: a cosine grating with a class-specific frequency,
orientation and phase on a class-specific base colour; every example adds Gaussian pixel noise.
A tiny model separates the classes within a few optimisation steps. Options (spec ``fake:k=v,...``):
``n`` train examples (default 256), ``n_eval`` val/test examples (default ``max(n // 4, classes)``),
``classes`` (10), ``size`` (32), ``noise`` pixel-noise std in [0, 1] units (0.1), ``seed`` (0).
The patterns depend on ``seed`` only; the noise and label order differ per split.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from vitscope.data.arrays import ArrayDataset
from vitscope.data.specs import check_options

FAKE_OPTIONS: dict[str, Any] = {"n": 256, "n_eval": None, "classes": 10, "size": 32, "noise": 0.1, "seed": 0}
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    opts = check_options("fake", options, FAKE_OPTIONS)
    for key in ("n", "classes", "size"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise ValueError(f"fake: option {key} must be a positive integer, got {opts[key]!r}")
    if opts["classes"] < 2:
        raise ValueError("fake: option classes must be >= 2")
    if opts["n_eval"] is None:
        opts["n_eval"] = max(opts["n"] // 4, opts["classes"])
    return opts


def class_patterns(classes: int, size: int, seed: int) -> np.ndarray:
    """The noise-free class means, float (classes, size, size, 3) in [0.1, 0.9]."""
    rng = np.random.default_rng([seed, 0])
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")  # (S, S)
    patterns = np.empty((classes, size, size, 3))
    for c in range(classes):
        fx, fy = rng.integers(0, 3, size=2) + np.array([1, 0])  # low frequencies, never constant
        phase = rng.uniform(0, 2 * np.pi)
        base = rng.uniform(0.3, 0.7, size=3)  # (3,) class colour
        amp = rng.uniform(0.15, 0.25, size=3) * rng.choice([-1.0, 1.0], size=3)
        wave = np.cos(2 * np.pi * (fx * xx + fy * yy) / size + phase)  # (S, S)
        patterns[c] = base + amp * wave[..., None]  # (S, S, 3)
    return patterns


def make_fake(split: str, **options: Any) -> ArrayDataset:
    """The ``fake`` split ``train``/``val``/``test`` as uint8 images with balanced labels."""
    opts = _options(options)
    n = opts["n"] if split == "train" else opts["n_eval"]
    classes, size = opts["classes"], opts["size"]
    patterns = class_patterns(classes, size, opts["seed"])
    rng = np.random.default_rng([opts["seed"], _SPLIT_IDS[split]])
    labels = rng.permutation(np.arange(n) % classes)  # (n,) balanced
    images = patterns[labels] + opts["noise"] * rng.standard_normal((n, size, size, 3))  # (n, S, S, 3)
    images = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    return ArrayDataset(images, labels, [f"class_{c}" for c in range(classes)])


def fake_info(**options: Any) -> dict[str, Any]:
    """num_classes, native size and per-channel mean/std of the ``fake`` train split."""
    opts = _options(options)
    train = make_fake("train", **options).data.astype(np.float64) / 255.0  # (n, S, S, 3)
    return dict(
        num_classes=opts["classes"],
        img_size=opts["size"],
        mean=tuple(float(v) for v in train.mean(axis=(0, 1, 2))),
        std=tuple(float(v) for v in train.std(axis=(0, 1, 2))),
        class_names=tuple(f"class_{c}" for c in range(opts["classes"])),
    )
