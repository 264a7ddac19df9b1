"""One pass over an evaluation loader computing every robustness measure of the suite.

Measures: ``calibration`` (HDVW), ``occlusion`` (CB), ``fgsm`` (CB) and ``pgd``, ``frequency`` (HDVW),
``corruptions`` (ImageNet-C / CIFAR-C style). The loader must yield [0, 1] pixel-space images; the
model's normalization is applied inside (``mean``/``std``, default from its pretrained_cfg).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitscope.distributed import all_gather_objects, all_reduce_sum
from vitscope.distributed import current as dist_current
from vitscope.measures.calibration import Calibration
from vitscope.measures.evaluation import eval_batches, eval_mode
from vitscope.robustness._checks import pixel_batch
from vitscope.robustness.attacks import _check_eps, fgsm, pgd, pixel_model
from vitscope.robustness.corruptions import CORRUPTIONS, _canonical, corrupt, corruption_params
from vitscope.robustness.frequency import frequency_noise
from vitscope.robustness.occlusion import occlude_center
from vitscope.runtime import model_device

_logger = logging.getLogger(__name__)

__all__ = ["SUITE", "DEFAULT_EPS", "DEFAULT_FREQS", "RobustnessResult", "evaluate_robustness", "evaluate_cifar_c",
           "default_freq_eps"]

SUITE: tuple[str, ...] = ("calibration", "occlusion", "fgsm", "pgd", "frequency", "corruptions")
DEFAULT_EPS: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
DEFAULT_FREQS: tuple[float, ...] = tuple(i / 10 for i in range(11))


def default_freq_eps(shape: Sequence[int], rms: float = 0.05) -> float:
    """L2 norm of band noise with per-value RMS ``rms`` on images of ``shape`` (..., C, H, W)."""
    c, h, w = shape[-3:]
    return rms * math.sqrt(c * h * w)


def check_suite(suite: Iterable[str], allow_empty: bool = False) -> list[str]:
    """The suite as a list of known measure names, in the given order, without duplicates."""
    names = list(dict.fromkeys(s.strip() for s in suite if s.strip()))
    bad = [s for s in names if s not in SUITE]
    if bad or not (names or allow_empty):
        raise ValueError(f"unknown robustness measure(s) {bad or names}; valid: {', '.join(SUITE)}")
    return names


class RobustnessResult(dict):
    """``evaluate_robustness``'s JSON-ready dict, with a notebook's views of it."""

    def to_pandas(self) -> Any:
        """Tidy ``pandas.DataFrame`` of what the report plots (its CSVs): one row per figure (``reliability``,
        ``robustness_eps``, ``robustness_frequency``, ``robustness_corruptions``) and point (bin, attack and eps,
        frequency, corruption and severity), with the clean accuracy as a row of its own."""
        from vitscope.notebook import frame, report_rows

        clean = [{"figure": "clean", "accuracy": self["clean"]["accuracy"], "n": self["n"]}]
        return frame(clean + report_rows("model", robustness=dict(self)).to_dict("records"))

    def plot(self, key: str | None = None, title: str = "model") -> Any:
        """The report's figure ``key`` (default: the first it draws) as a matplotlib ``Figure``."""
        from vitscope.notebook import report_figure

        return report_figure(title, key, robustness=dict(self))


@torch.no_grad()
def evaluate_robustness(
    model: nn.Module,
    loader: Iterable,
    suite: Sequence[str] = SUITE,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    n_bins: int = 10,
    occlusion_fraction: float = 0.5,
    eps: Sequence[float] = DEFAULT_EPS,
    pgd_steps: int = 10,
    pgd_alpha: float | None = None,
    pgd_random_start: bool = True,
    freqs: Sequence[float] = DEFAULT_FREQS,
    freq_eps: float | None = None,
    freq_width: float = 0.2,
    freq_scale: str = "diagonal",
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    corruption_table: str | None = None,
    seed: int = 0,
    progress: bool | None = None,
    shard: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``loader`` under each measure of ``suite``; returns a JSON-ready dict.

    Keys: ``clean`` (accuracy, n) and one entry per measure:
    ``calibration`` (see ``Calibration.compute``), ``occlusion`` (fraction, accuracy),
    ``fgsm``/``pgd`` (eps list, accuracy list; pgd also steps, alpha, random_start),
    ``frequency`` (freqs, accuracy, error_increase, eps, width, scale),
    ``corruptions`` (accuracy[name] per severity, mean_accuracy, table).

    Random parts (PGD start, band noise, noisy corruptions) use seed ``seed + batch index``.
    PGD's step defaults to ``2.5 * eps / steps``; ``freq_eps`` (L2 norm per image) to an RMS of 0.05
    per pixel value, ``0.05 * sqrt(C H W)``.

    ``shard=True``: under torch.distributed, each rank takes the global batches r, r + W, ... (seeds stay
    ``seed + global batch index``); the counts and calibration states of all ranks are summed, so every rank
    returns the one-process result, with ``world_size`` and ``examples_per_rank``.
    """
    names = check_suite(suite, allow_empty=True)  # empty: clean accuracy only
    eps = [float(e) for e in eps]
    corr_names = [_canonical(c) for c in corruptions] if "corruptions" in names else []
    for c in corr_names:  # fail before the first batch on a bad severity or table
        for s in severities:
            corruption_params(c, s, corruption_table or "cifar")
    for e in eps:
        _check_eps(e)
    dev = model_device(model, device)
    net = pixel_model(model, mean, std).to(dev)
    cal = Calibration(n_bins=n_bins) if "calibration" in names else None
    counts: dict[str, Any] = {
        "clean": 0,
        "occlusion": 0,
        "fgsm": [0] * len(eps),
        "pgd": [0] * len(eps),
        "frequency": [0] * len(freqs),
        "corruptions": {c: [0] * len(severities) for c in corr_names},
    }
    n = 0
    table_used = corruption_table

    def hits(x: torch.Tensor, y: torch.Tensor) -> int:
        return int((net(x).argmax(dim=1) == y).sum())

    with eval_mode(net):
        for i, x, y in eval_batches(loader, dev, max_batches, desc="robustness", progress=progress, shard=shard,
                                    prepare=pixel_batch):
            logits = net(x)  # (B, num_classes)
            counts["clean"] += int((logits.argmax(dim=1) == y).sum())
            if cal is not None:
                cal.update(logits, y)
            if "occlusion" in names:
                counts["occlusion"] += hits(occlude_center(x, occlusion_fraction), y)
            for j, e in enumerate(eps):
                if "fgsm" in names:
                    counts["fgsm"][j] += hits(fgsm(net, x, y, e), y)
                if "pgd" in names:
                    adv = pgd(net, x, y, e, pgd_alpha, pgd_steps, random_start=pgd_random_start, seed=seed + i)
                    counts["pgd"][j] += hits(adv, y)
            if "frequency" in names:
                if freq_eps is None:
                    freq_eps = default_freq_eps(x.shape)
                for j, f in enumerate(freqs):
                    xn = frequency_noise(x, f, freq_width, eps=freq_eps, seed=seed + i, scale=freq_scale)
                    counts["frequency"][j] += hits(xn, y)
            if corr_names and table_used is None:
                table_used = "cifar" if max(x.shape[-2:]) <= 64 else "imagenet"
            for c in corr_names:
                for j, s in enumerate(severities):
                    xc = corrupt(x, c, s, seed=seed + i, table=table_used)
                    counts["corruptions"][c][j] += hits(xc, y)
            n += x.shape[0]
    info = dist_current()
    per_rank = [n]
    if shard and info.distributed:
        n, per_rank, cal, freq_eps, table_used = _merge_ranks(counts, n, cal, freq_eps, table_used)
    if n == 0:
        raise ValueError("the loader yielded no examples")

    clean = counts["clean"] / n
    out = RobustnessResult({"n": n, "clean": {"accuracy": clean, "n": n}})
    if shard:
        out.update(world_size=info.world_size, examples_per_rank=per_rank)
    for name in names:
        if name == "calibration":
            out[name] = cal.compute()
        elif name == "occlusion":
            out[name] = {"fraction": occlusion_fraction, "accuracy": counts["occlusion"] / n}
        elif name in ("fgsm", "pgd"):
            res: dict[str, Any] = {"eps": eps, "accuracy": [c / n for c in counts[name]]}
            if name == "pgd":
                res.update(
                    steps=pgd_steps,
                    alpha=[2.5 * e / pgd_steps if pgd_alpha is None else float(pgd_alpha) for e in eps],
                    random_start=pgd_random_start,
                )
            out[name] = res
        elif name == "frequency":
            acc = [c / n for c in counts["frequency"]]
            out[name] = {
                "freqs": [float(f) for f in freqs],
                "accuracy": acc,
                "error_increase": [clean - a for a in acc],
                "eps": freq_eps,
                "width": freq_width,
                "scale": freq_scale,
            }
        elif name == "corruptions":
            acc_c = {c: [v / n for v in counts["corruptions"][c]] for c in corr_names}
            flat = [a for accs in acc_c.values() for a in accs]
            out[name] = {
                "severities": [int(s) for s in severities],
                "table": table_used,
                "accuracy": acc_c,
                "mean_accuracy": sum(flat) / len(flat) if flat else None,
                "error_increase": {c: [clean - a for a in accs] for c, accs in acc_c.items()},
            }
    return out


def _merge_ranks(counts: dict[str, Any], n: int, cal: Calibration | None, freq_eps: float | None,
                 table: str | None) -> tuple[int, list[int], Calibration | None, float | None, str | None]:
    """Sum the hit counts in place over the ranks and the calibration state (``Calibration.sync``); gather n,
    band-noise eps and table."""
    flat = [counts["clean"], counts["occlusion"], *counts["fgsm"], *counts["pgd"], *counts["frequency"],
            *(v for c in counts["corruptions"].values() for v in c)]
    total = all_reduce_sum(torch.tensor(flat, dtype=torch.int64)).tolist()
    counts["clean"], counts["occlusion"] = total[0], total[1]
    pos = 2
    for key in ("fgsm", "pgd", "frequency"):
        counts[key] = total[pos:pos + len(counts[key])]
        pos += len(counts[key])
    for c in counts["corruptions"]:
        m = len(counts["corruptions"][c])
        counts["corruptions"][c] = total[pos:pos + m]
        pos += m
    parts = all_gather_objects((n, freq_eps, table))
    if cal is not None:
        cal.sync()
    per_rank = [p[0] for p in parts]
    return sum(per_rank), per_rank, cal, parts[0][1], parts[0][2]


@torch.no_grad()
def evaluate_cifar_c(
    model: nn.Module,
    path: str,
    names: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    *,
    clean_accuracy: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    max_batches: int | None = None,
    img_size: int | None = None,
    progress: bool | None = None,
    shard: bool = False,
) -> dict[str, Any]:
    """Accuracy on the released CIFAR-10-C / CIFAR-100-C files in ``path`` (``load_cifar_c``).

    ``img_size`` resizes the 32 x 32 images (bilinear, antialiased, like torchvision's Resize on
    tensors) for models that take another input size.

    ``names`` defaults to every CIFAR-C corruption whose ``.npy`` is present. Returns the same layout
    as ``evaluate_robustness(...)["corruptions"]`` (error_increase only when ``clean_accuracy`` is given).
    ``shard=True``: under torch.distributed each rank takes every W-th batch of each file and the hits are summed.
    """
    import os

    from torch.utils.data import DataLoader

    from vitscope.robustness.corruptions import CIFAR_C_NAMES, load_cifar_c

    if names is None:
        names = [n for n in CIFAR_C_NAMES if os.path.isfile(os.path.join(path, f"{n}.npy"))]
        if not names:
            raise FileNotFoundError(
                f"no CIFAR-C .npy files ({', '.join(CIFAR_C_NAMES[:3])}, ...) in {path}; pass the unpacked "
                "CIFAR-10-C or CIFAR-100-C folder"
            )
    dev = model_device(model, device)
    net = pixel_model(model, mean, std).to(dev)
    counts = torch.zeros(len(names), len(severities), 2, dtype=torch.int64)  # (corruption, severity, [hits, n])
    with eval_mode(net):
        for i, name in enumerate(names):
            for j, s in enumerate(severities):
                loader = DataLoader(load_cifar_c(path, name, s), batch_size=batch_size)
                for _, x, y in eval_batches(loader, dev, max_batches, desc=f"{name} s{s}", progress=progress,
                                            shard=shard, prepare=pixel_batch):
                    if img_size is not None and tuple(x.shape[-2:]) != (img_size, img_size):
                        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True)
                        x = x.clamp(0.0, 1.0)
                    counts[i, j, 0] += int((net(x).argmax(dim=1) == y).sum())
                    counts[i, j, 1] += x.shape[0]
    if shard:
        all_reduce_sum(counts)
    acc = {name: [int(h) / max(int(m), 1) for h, m in counts[i].tolist()] for i, name in enumerate(names)}
    flat = [a for v in acc.values() for a in v]
    return {
        "severities": [int(s) for s in severities],
        "table": f"files:{path}",
        "accuracy": acc,
        "mean_accuracy": sum(flat) / len(flat),
        "error_increase": {k: [clean_accuracy - a for a in v] for k, v in acc.items()}
        if clean_accuracy is not None
        else {k: [None] * len(v) for k, v in acc.items()},
    }
