"""Few-shot linear probes per layer: closed-form ridge regression onto {-1, 1}^C targets (ViT, Dosovitskiy et
al. 2021, Sec. 4 "few-shot linear accuracy"; RAGHU Sec. 6, Fig. 12-13: where class information appears, class
token against global average pooling).

The fit is scikit-learn's ``RidgeClassifier(alpha)`` with an intercept: targets ``+1`` for the true class and
``-1`` otherwise, features and targets centred over the fit examples (the intercept is not penalized), and

    W = (Xc' Xc + alpha I)^-1 Xc' Yc,   b = mean(Y) - mean(X) W,   prediction = argmax(x W + b).

Everything the fit needs is float64 moments of the fit examples (count, means, centred X'X and X'Y per layer),
combined batch by batch and rank by rank (``RidgeFit``), so no feature is kept; the held-out accuracy is a count
(``ProbeAccuracy``). ``alpha`` is relative by default: ``ridge * tr(Xc' Xc) / D`` (``ridge`` times the mean
eigenvalue of the centred scatter), so one setting suits layers whose activations differ in scale by orders of
magnitude; the absolute alpha of every layer is returned. Memory: one D x D float64 matrix per layer and shot
count (ViT-B: 4.7 MB a layer).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from vitscope.measures._streaming import StreamingMeasure
from vitscope.measures._validate import as_list, check_tensor, raise_non_finite

_logger = logging.getLogger(__name__)

Tensor = torch.Tensor

__all__ = ["RidgeFit", "ProbeAccuracy", "probe_features", "ridge_classifier"]


def _labels(labels: Any, n: int, num_classes: int) -> Tensor:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise ValueError("labels must be a 1-D integer tensor, one class index per example")
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but the features hold n={n} examples")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got {int(labels.min())}..{int(labels.max())}")
    return labels


def _targets(labels: Tensor, num_classes: int) -> Tensor:
    """(n, C) float64: +1 at the true class, -1 elsewhere (scikit-learn's RidgeClassifier coding)."""
    y = torch.full((labels.shape[0], num_classes), -1.0, dtype=torch.float64, device=labels.device)
    return y.scatter_(1, labels[:, None], 1.0)


def _matrix(x: Any, name: str) -> Tensor:
    x = check_tensor(x, name, 2, "(n, D) features, one row per example", finite=False)
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        raise_non_finite(name)
    return x  # (n, D)


def probe_features(z: Tensor, num_prefix_tokens: int = 0) -> dict[str, Tensor]:
    """RAGHU's two read-outs of a layer's output: ``cls`` (the first prefix token, ViTs with a class token only)
    and ``gap`` (the mean over spatial tokens, or over H x W of a CNN map), each (B, D)."""
    if z.ndim == 4:  # (B, C, H, W)
        return {"gap": z.mean((-2, -1))}
    if z.ndim != 3:
        raise ValueError(f"expected (B, N, D) tokens or (B, C, H, W) maps, got shape {tuple(z.shape)}")
    out = {"cls": z[:, 0]} if num_prefix_tokens > 0 else {}  # (B, D)
    out["gap"] = z[:, num_prefix_tokens:].mean(1)  # (B, D)
    return out


class RidgeFit(StreamingMeasure):
    """The moments of a per-layer ridge fit: ``update(feats, labels)`` with ``feats`` one (n, D) tensor per layer
    (or one tensor); ``compute()`` returns, per layer, ``{"weight": (D, C), "bias": (C,), "alpha": float}``.

    The states are the count, the means of x and y and the centred scatters Xc'Xc, Xc'Yc, combined batch by
    batch (and instance by instance, ``merge`` / ``sync``) with Chan et al.'s pairwise update, not as raw sums
    X'X - n m m': class tokens vary little around a large mean, and that subtraction would cancel ~8 digits."""

    def __init__(self, num_classes: int, ridge: float = 1.0, relative: bool = True) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not ridge > 0:
            raise ValueError(f"ridge must be positive, got {ridge!r}")
        self.num_classes, self.ridge, self.relative = num_classes, float(ridge), bool(relative)
        super().__init__()

    def _options(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ridge": self.ridge, "relative": self.relative}

    def update(self, feats: Tensor | Sequence[Tensor], labels: Tensor) -> None:
        """Add one batch of fit examples."""
        xs, single = as_list(feats, "feats")
        mats = [_matrix(x, f"feats[{i}]") for i, x in enumerate(xs)]
        n = mats[0].shape[0]
        if any(m.shape[0] != n for m in mats):
            raise ValueError("every layer of a batch must hold the same n examples")
        y = _targets(_labels(labels, n, self.num_classes).to(mats[0].device), self.num_classes)  # (n, C)
        count = torch.tensor(float(n), dtype=torch.float64, device=y.device)
        my = y.mean(0)
        yc = y - my  # (n, C)
        parts = []
        for x in mats:
            mx = x.mean(0)
            xc = x - mx  # (n, D)
            parts.append({"count": count, "mean_x": mx, "mean_y": my, "cxx": xc.T @ xc, "cxy": xc.T @ yc})
        self._accumulate(parts, single)

    @torch.no_grad()
    def _accumulate(self, contributions: Sequence[dict[str, Any]], single: bool) -> None:
        """Combine per-layer moments into the states (Chan, Golub & LeVeque 1979): with d = mean_b - mean_a,
        C = C_a + C_b + d d' n_a n_b / n."""
        if self._synced:
            raise RuntimeError("RidgeFit was already synced across ranks; call reset() before new updates")
        if self._states is None:
            self._states = [{k: v.to(torch.float64).clone() for k, v in c.items()} for c in contributions]
            self._single = single
            return
        if len(contributions) != len(self._states) or single != self._single:
            raise ValueError("RidgeFit.update got other layers than earlier updates; pass the same layers every time")
        for i, (s, c) in enumerate(zip(self._states, contributions)):
            if s["cxx"].shape != c["cxx"].shape:
                raise ValueError(f"RidgeFit: layer {i} has {c['cxx'].shape[0]} features but {s['cxx'].shape[0]} "
                                 "before")
            na, nb = s["count"], c["count"].to(s["count"])
            n = na + nb
            dx, dy = c["mean_x"].to(s["mean_x"]) - s["mean_x"], c["mean_y"].to(s["mean_y"]) - s["mean_y"]
            w = na * nb / n
            s["cxx"] += c["cxx"].to(s["cxx"]) + w * torch.outer(dx, dx)  # (D, D)
            s["cxy"] += c["cxy"].to(s["cxy"]) + w * torch.outer(dx, dy)  # (D, C)
            s["mean_x"] += dx * (nb / n)
            s["mean_y"] += dy * (nb / n)
            s["count"] = n

    def sync(self, group: Any = None) -> RidgeFit:
        """Combine the moments of every rank (gathered, folded in rank order); a no-op without a process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._synced:
            raise RuntimeError("RidgeFit.sync() called twice")
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.state_dict(), group=group)
        self.reset()
        for state in states:
            self.merge(state)
        self._synced = True
        return self

    def _compute_layer(self, s: dict[str, Tensor]) -> dict[str, Any]:
        n = float(s["count"])
        if n < 2:
            raise ValueError(f"RidgeFit: {n:.0f} fit example(s); a ridge probe needs at least 2")
        cxx, cxy = s["cxx"], s["cxy"]  # (D, D), (D, C) centred
        d = cxx.shape[0]
        alpha = self.ridge * float(cxx.diagonal().sum()) / d if self.relative else self.ridge
        if not alpha > 0:
            raise ValueError("RidgeFit: the fit features are constant across examples; the probe is undefined")
        eye = torch.eye(d, dtype=cxx.dtype, device=cxx.device)
        weight = torch.linalg.solve(cxx + alpha * eye, cxy)  # (D, C)
        return {"weight": weight, "bias": s["mean_y"] - s["mean_x"] @ weight, "alpha": alpha}


def ridge_classifier(weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """Predicted classes (n,) of features ``x`` (n, D) under a ``RidgeFit`` solution."""
    return (x.to(weight.dtype) @ weight + bias).argmax(1)


class ProbeAccuracy(StreamingMeasure):
    """Held-out accuracy of fixed per-layer ridge classifiers: ``update(feats, labels, fits)`` with ``fits`` the
    ``RidgeFit.compute()`` list; ``compute()`` is the accuracy of each layer (float64 0-d tensors)."""

    def update(self, feats: Tensor | Sequence[Tensor], labels: Tensor, fits: Sequence[dict[str, Any]],
               validate: bool = True) -> None:
        """Add one held-out batch. ``validate=False`` skips the checks that read values on the host (finite
        features, labels in range; shapes are always checked): for callers that check on the device
        (``vitscope.probe``)."""
        xs, single = as_list(feats, "feats")
        fits = [fits] if isinstance(fits, dict) else list(fits)
        if len(fits) != len(xs):
            raise ValueError(f"got {len(xs)} layers of features but {len(fits)} fitted probes")
        parts = []
        for i, (x, fit) in enumerate(zip(xs, fits)):
            if validate:
                x = _matrix(x, f"feats[{i}]")
                y = _labels(labels, x.shape[0], fit["weight"].shape[1]).to(x.device)
            else:
                x = check_tensor(x, f"feats[{i}]", 2, "(n, D) features, one row per example", finite=False)
                if labels.shape != (x.shape[0],) or labels.is_floating_point():
                    raise ValueError(f"labels must be a 1-D integer tensor of the n={x.shape[0]} examples")
                y = labels.to(x.device)
            parts.append({"correct": (ridge_classifier(fit["weight"], fit["bias"], x) == y).sum().double(),
                          "count": torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)})
        self._accumulate(parts, single)

    def _compute_layer(self, s: dict[str, Tensor]) -> Tensor:
        if s["count"] == 0:
            raise ValueError("ProbeAccuracy: no held-out example was seen")
        return s["correct"] / s["count"]
