"""Few-shot linear probes of every layer of one model (RAGHU Sec. 6, Fig. 12-13; the ViT paper's few-shot
protocol): the ``linear_probe`` measure of ``vitscope.probe`` and of ``vitscope.compare``.

Per layer and read-out (``cls``: the class token, for models that have one; ``gap``: the mean over the spatial
tokens, or over H x W of a CNN map) a closed-form ridge classifier (``vitscope.measures.RidgeFit``) is fitted on
the first ``k`` examples of each class of a fit loader, one probe per ``k`` in ``shots``: one short pass that stops
once every class has its examples, run whole on every rank so every rank fits the same probes. The probes are
then scored on the analysed (held-out) batches as they stream by (``ProbeAccuracy``: counts, summed over ranks).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from vitscope.capture import LayerInfo, capture
from vitscope.measures.linear_probe import ProbeAccuracy, RidgeFit, probe_features

_logger = logging.getLogger(__name__)

Tensor = torch.Tensor

__all__ = ["LayerProbes", "layer_readouts", "capture_readouts", "DEFAULT_SHOTS", "READOUTS"]

DEFAULT_SHOTS = (10, 25)  # RAGHU Sec. 6 / ViT's few-shot protocol: 10 and 25 examples per class
READOUTS = ("cls", "gap")


def layer_readouts(z: Tensor, info: LayerInfo) -> dict[str, Tensor]:
    """The read-outs of one layer's output ``z`` (B, N, D) or (B, C, H, W), each (B, D) float64 (GAP summed in
    float64). The stem's class token is left out: it is the learned token plus its position embedding, the same
    for every example, so no probe can be fitted on it."""
    feats = probe_features(z.to(torch.float64), info.num_prefix_tokens)
    if info.kind == "stem":
        feats.pop("cls", None)
    return feats


def capture_readouts(model: nn.Module, images: Tensor, layers: str, names: Any,
                     keep: Callable[[LayerInfo], bool] = lambda info: True
                     ) -> tuple[list[LayerInfo], list[dict[str, Tensor]]]:
    """One forward of ``model`` under ``vitscope.capture`` (``layers``, ``names`` as the pass that scores the
    probes): the layers ``keep`` accepts and their read-outs, each reduced as the forward produces it."""
    infos: list[LayerInfo] = []
    reads: list[dict[str, Tensor]] = []

    def on_record(rec: Any) -> None:
        if keep(rec.info):
            infos.append(rec.info)
            reads.append(layer_readouts(rec.z_out, rec.info))

    with capture(model, attention=False, residual=True, branches=False, names=names, on_record=on_record,
                 layers=layers):
        model(images)
    return infos, reads


class LayerProbes:
    """The probes of one model: ``fit`` on the fit examples, ``score`` each held-out batch, ``rows`` the table.

    A read-out enters the probes of the layers that have it (a ViT's stem has no class-token probe); one
    ``RidgeFit`` per (read-out, k) over those layers, then one ``ProbeAccuracy`` each."""

    def __init__(self, num_classes: int, shots: Sequence[int] = DEFAULT_SHOTS, ridge: float = 1.0) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"linear_probe needs num_classes >= 2 (the classes of the labels), got {num_classes!r}")
        shots = sorted({int(k) for k in shots})
        if not shots or shots[0] < 1:
            raise ValueError(f"shots must be positive integers, got {list(shots)}")
        if not ridge > 0:
            raise ValueError(f"ridge must be positive, got {ridge!r}")
        self.num_classes, self.shots, self.ridge = num_classes, shots, float(ridge)
        self.layers: dict[str, list[int]] = {}  # read-out -> indices of the layers that have it
        self.solutions: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.accuracy: dict[tuple[str, int], ProbeAccuracy] = {}

    def _layers_of(self, reads: list[dict[str, Tensor]]) -> dict[str, list[int]]:
        found = {key: [i for i, r in enumerate(reads) if key in r] for key in READOUTS}
        found = {k: v for k, v in found.items() if v}
        if self.layers and found != self.layers:
            raise ValueError("linear_probe: the layers or their read-outs changed between batches")
        return found

    def fit(self, reads_of: Callable[[Tensor], list[dict[str, Tensor]]], batches: Iterable[tuple[Tensor, Any]],
            progress: bool = False) -> None:
        """Fit every probe on the first ``k`` examples of each class of ``batches`` ((images, labels) in a fixed
        order); ``reads_of(images)`` gives the read-outs of every layer. Batches holding no example still needed
        are not run through the model; the pass stops once every class has ``max(shots)``."""
        top = max(self.shots)
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        fits: dict[tuple[str, int], RidgeFit] = {}
        for images, labels in tqdm(batches, desc="probe fit", disable=not progress, leave=False):
            if labels is None:
                raise ValueError("linear_probe needs labels: the fit loader must yield (images, labels)")
            labels = labels.cpu()
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"fit labels must lie in [0, {self.num_classes})")
            rank = torch.empty_like(labels)  # within-class rank of each example in loader order
            for c in labels.unique().tolist():
                idx = (labels == c).nonzero().flatten()
                rank[idx] = counts[c] + torch.arange(len(idx))
                counts[c] += len(idx)
            if (rank < top).any():
                reads = reads_of(images)
                self.layers = self._layers_of(reads)
                for key, idx in self.layers.items():
                    for k in self.shots:
                        keep = rank < k
                        if keep.any():
                            dev = reads[idx[0]][key].device
                            fit = fits.setdefault((key, k), RidgeFit(self.num_classes, ridge=self.ridge))
                            fit.update([reads[i][key][keep.to(dev)] for i in idx], labels[keep].to(dev))
            if bool((counts >= top).all()):
                break  # every class has its examples: the rest of the fit loader is not read
        short = [c for c in range(self.num_classes) if counts[c] < top]
        if short:
            _logger.warning("linear_probe: classes %s have fewer than %d fit examples (%s); their probes use what "
                            "there is", short[:10], top, [int(counts[c]) for c in short[:10]])
        if not fits:
            raise ValueError("linear_probe: the fit loader gave no example")
        self.solutions = {key: fit.compute() for key, fit in fits.items()}
        self.accuracy = {key: ProbeAccuracy() for key in self.solutions}

    def score(self, reads: list[dict[str, Tensor]], labels: Tensor | None, validate: bool = True) -> None:
        """Add one held-out batch: ``reads`` the read-outs of every layer, ``labels`` (B,) class indices;
        ``validate=False``: no host read (``ProbeAccuracy.update``), the caller checks values on the device."""
        if labels is None:
            raise ValueError("linear_probe needs labels: the loader must yield (images, labels)")
        if not self.solutions:
            raise RuntimeError("LayerProbes.score before fit")
        self._layers_of(reads)
        for (key, k), acc in self.accuracy.items():
            idx = self.layers[key]
            acc.update([reads[i][key] for i in idx], labels.to(reads[idx[0]][key].device), self.solutions[(key, k)],
                       validate=validate)

    def streaming(self) -> list[ProbeAccuracy]:
        """The held-out counts (what ``sync()`` sums over ranks)."""
        return list(self.accuracy.values())

    def rows(self, names: Sequence[str], model: str, depths: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """One row per layer, read-out and k: model, layer, depth, normalized_depth, readout, shots, accuracy,
        alpha (the absolute ridge of that layer's fit)."""
        depths = list(range(len(names))) if depths is None else list(depths)
        total = max(depths) + 1 if depths else 1
        out = []
        for (key, k), acc in sorted(self.accuracy.items()):
            for i, v, sol in zip(self.layers[key], acc.compute(), self.solutions[(key, k)]):
                out.append({"model": model, "layer": names[i], "depth": depths[i],
                            "normalized_depth": round(depths[i] / max(total - 1, 1), 6), "readout": key, "shots": k,
                            "accuracy": float(v), "alpha": sol["alpha"]})
        return out
