"""``elpv``: the ELPV solar-cell electroluminescence data set (Buerhop-Lutz et al. 2018; Deitsch et al.
2019), shipped inside the ``elpv-dataset`` package (data: CC BY-NC-SA 4.0; code: Apache-2.0).

2,624 grayscale 300x300 cell images, each with a defect probability in {0, 1/3, 2/3, 1} and the
module type (mono/poly). vitscope adds:

- labels: ``defect`` (probability >= 0.5; 2 classes, default) or ``levels`` (the 4 probabilities).
- a fixed stratified split (strata = level x type, seed ``split_seed=0``): per stratum
  ``round(0.15 n)`` val, ``round(0.15 n)`` test, the rest train: 1,836 / 394 / 394 images
  (functional/defective 1261/575, 271/123, 271/123; levels 0, 1/3, 2/3, 1: 1056/205/74/501,
  226/45/16/107, 226/45/16/107; mono/poly 752/1084, 161/233, 161/233). The split does not depend
  on ``labels``; option ``types=mono|poly`` keeps one module type.
- images resized (bilinear, antialiased) to ``img_size`` (default 64) and cached as uint8 in
  ``${VITSCOPE_CACHE:-~/.cache/vitscope}/elpv/`` (decoding the PNGs once takes ~15 s), repeated to
  3 channels; mean/std come from the train split at that size.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitscope.data.arrays import ArrayDataset
from vitscope.data.specs import check_options
from vitscope.io.atomic import atomic_write

_logger = logging.getLogger(__name__)

ELPV_NATIVE_SIZE = 300
ELPV_DEFAULT_SIZE = 64
ELPV_NUM_IMAGES = 2624
ELPV_OPTIONS: dict[str, Any] = {
    "labels": "defect", "types": "all", "val_fraction": 0.15, "test_fraction": 0.15, "split_seed": 0,
}
LABEL_SETS = {
    "defect": ("functional", "defective"),
    "levels": ("p=0", "p=1/3", "p=2/3", "p=1"),
}
_MEMO: dict[tuple[str, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    opts = check_options("elpv", options, ELPV_OPTIONS)
    if opts["labels"] not in LABEL_SETS:
        raise ValueError(f"elpv: labels must be one of {list(LABEL_SETS)}, got {opts['labels']!r}")
    if opts["types"] not in ("all", "mono", "poly"):
        raise ValueError(f"elpv: types must be 'all', 'mono' or 'poly', got {opts['types']!r}")
    fv, ft = opts["val_fraction"], opts["test_fraction"]
    if not (0 <= fv < 1 and 0 <= ft < 1 and fv + ft < 1):
        raise ValueError(f"elpv: val_fraction and test_fraction must be in [0, 1) with sum < 1, got {fv}, {ft}")
    return opts


def cache_dir() -> Path:
    """``$VITSCOPE_CACHE`` or ``~/.cache/vitscope``."""
    return Path(os.environ.get("VITSCOPE_CACHE") or "~/.cache/vitscope").expanduser()


def _package() -> tuple[Any, str]:
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError as e:
        raise ImportError(
            'the elpv data set comes from the elpv-dataset package: pip install "vitscope[elpv]"'
        ) from e
    try:
        version = importlib.metadata.version("elpv-dataset")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return load_dataset, version


def cache_path(img_size: int) -> Path:
    """Where the resized uint8 arrays for ``img_size`` are cached."""
    _, version = _package()
    return cache_dir() / "elpv" / f"elpv-{version}-{img_size}px.npz"


def _resize(images: np.ndarray, img_size: int, chunk: int = 256) -> np.ndarray:
    """uint8 (N, H, W) -> uint8 (N, S, S), bilinear with antialiasing."""
    if images.shape[1:] == (img_size, img_size):
        return images
    out = np.empty((len(images), img_size, img_size), dtype=np.uint8)
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i:i + chunk]).float()[:, None]  # (b, 1, H, W)
        y = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = y[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()  # (b, S, S)
    return out


def _write_atomic(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    atomic_write(path, write)


def _read_cache(path: Path, img_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            images, probs, types = z["images"], z["probs"], z["types"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        _logger.warning("ignoring unreadable ELPV cache %s (%s); rebuilding it", path, e)
        return None
    if images.shape != (ELPV_NUM_IMAGES, img_size, img_size) or images.dtype != np.uint8 or len(probs) != len(
        images
    ) or len(types) != len(images):
        _logger.warning("ignoring ELPV cache %s with unexpected shape %s; rebuilding it", path, images.shape)
        return None
    return images, probs, types


def load_elpv_arrays(img_size: int = ELPV_DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 2,624 images resized to ``img_size``: uint8 (N, S, S), probs float (N,), types str (N,).

    Read from the cache when present; otherwise decoded from the package's PNGs once and cached
    (written atomically: temporary file in the same folder, then ``os.replace``).
    """
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"elpv: img_size must be a positive integer, got {img_size!r}")
    path = cache_path(img_size)
    key = (str(path), path.stat().st_mtime if path.exists() else -1.0)
    if key in _MEMO:
        return _MEMO[key]
    arrays = _read_cache(path, img_size) if path.exists() else None
    if arrays is None:
        load_dataset, _ = _package()
        t0 = time.perf_counter()
        _logger.info("decoding the %d ELPV images once (about 15 s); caching at %s", ELPV_NUM_IMAGES, path)
        images, probs, types = load_dataset()  # uint8 (N, 300, 300), float (N,), str (N,)
        images = _resize(np.asarray(images, dtype=np.uint8), img_size)  # (N, S, S)
        arrays = (images, np.asarray(probs, dtype=np.float64), np.asarray(types, dtype="U4"))
        _write_atomic(path, images=arrays[0], probs=arrays[1], types=arrays[2])
        _logger.info("ELPV decoded and cached in %.1f s", time.perf_counter() - t0)
        key = (str(path), path.stat().st_mtime)
    while len(_MEMO) >= 2:  # keep at most two sizes in memory (300 px is 236 MB)
        del _MEMO[next(iter(_MEMO))]
    _MEMO[key] = arrays
    return arrays


def elpv_levels(probs: np.ndarray) -> np.ndarray:
    """Defect probability {0, 1/3, 2/3, 1} -> level index {0, 1, 2, 3}."""
    return np.rint(np.asarray(probs) * 3).astype(np.int64)


def elpv_labels(probs: np.ndarray, labels: str = "defect") -> np.ndarray:
    """``defect``: 1 where probability >= 0.5; ``levels``: the level index 0..3."""
    if labels == "defect":
        return (np.asarray(probs) >= 0.5).astype(np.int64)
    if labels == "levels":
        return elpv_levels(probs)
    raise ValueError(f"elpv: labels must be one of {list(LABEL_SETS)}, got {labels!r}")


def elpv_split_indices(
    probs: np.ndarray, types: np.ndarray, val_fraction: float = 0.15, test_fraction: float = 0.15,
    split_seed: int = 0,
) -> dict[str, np.ndarray]:
    """Stratified (level x type) split: sorted, disjoint index arrays for train/val/test."""
    strata = elpv_levels(probs) * 2 + (np.asarray(types) == "poly")  # (N,) 8 strata
    rng = np.random.default_rng(split_seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for s in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == s))
        n_val, n_test = round(val_fraction * len(idx)), round(test_fraction * len(idx))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def _split(split: str, img_size: int, opts: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    images, probs, types = load_elpv_arrays(img_size)
    idx = elpv_split_indices(probs, types, opts["val_fraction"], opts["test_fraction"], opts["split_seed"])[split]
    if opts["types"] != "all":
        idx = idx[types[idx] == opts["types"]]
    if len(idx) == 0:
        raise ValueError(f"elpv: split {split!r} is empty with options {opts}")
    return images[idx], elpv_labels(probs[idx], opts["labels"])


def make_elpv(split: str, img_size: int | None = None, **options: Any) -> ArrayDataset:
    """The ``elpv`` split as an in-memory data set of grayscale uint8 images at ``img_size``."""
    opts = _options(options)
    images, labels = _split(split, img_size or ELPV_DEFAULT_SIZE, opts)
    return ArrayDataset(images, labels, LABEL_SETS[opts["labels"]])


def elpv_info(img_size: int | None = None, **options: Any) -> dict[str, Any]:
    """num_classes, size and mean/std (train split, same value on the 3 channels)."""
    opts = _options(options)
    size = img_size or ELPV_DEFAULT_SIZE
    train, _ = _split("train", size, opts)
    mean, std = _pixel_stats(train)
    return dict(
        num_classes=len(LABEL_SETS[opts["labels"]]),
        img_size=size,
        mean=(mean,) * 3,
        std=(std,) * 3,
        class_names=LABEL_SETS[opts["labels"]],
    )


def _pixel_stats(images: np.ndarray, chunk: int = 256) -> tuple[float, float]:
    """Mean and (population) std of uint8 pixels / 255, from exact integer sums in chunks."""
    total, total_sq = 0, 0
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].astype(np.int64)  # (b, S, S)
        total += int(x.sum())
        total_sq += int((x * x).sum())
    n = images.size
    var = (total_sq * n - total * total) / (n * n)  # exact integers up to the final division
    return total / n / 255.0, float(np.sqrt(var)) / 255.0
