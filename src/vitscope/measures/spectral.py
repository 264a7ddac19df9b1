"""Fourier relative log amplitude and feature-map variance of feature maps (HDVW: Park & Kim 2022,
Fig. 2, 8 and 9).

Both take maps (B, C, h, w); for ViT tokens drop the prefix tokens and reshape first with
``vitscope.tokens_to_map(x, grid, num_prefix_tokens)``, or give the streaming classes the tokens with
``layout=cap.layout`` (or ``grid=``/``num_prefix_tokens=``) and they do it.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from vitscope.measures._streaming import StreamingMeasure, check_layout, layer_option
from vitscope.measures._validate import as_list, check_tensor, to_map

Tensor = torch.Tensor

__all__ = [
    "fourier_log_amplitude", "fourier_frequencies", "feature_variance", "FourierLogAmplitude", "FeatureVariance",
]

_EPS = 1e-6


def _check_map(fmap: Any, name: str) -> Tensor:
    if isinstance(fmap, torch.Tensor) and fmap.ndim == 3:
        raise ValueError(
            f"{name} must be a (B, C, h, w) feature map, got tokens {tuple(fmap.shape)}; convert ViT tokens with "
            "vitscope.tokens_to_map(x, grid, num_prefix_tokens)"
        )
    return check_tensor(fmap, name, 4, "(B, C, h, w) feature map")


def _half_diagonal_size(h: int, w: int) -> int:
    return min(h - h // 2, w - w // 2)


def _log_amplitude_sums(fmap: Any, name: str = "fmap") -> dict[str, Tensor]:
    x = _check_map(fmap, name).double()  # (B, C, h, w)
    B, C, h, w = x.shape
    k = torch.arange(_half_diagonal_size(h, w), device=x.device)
    # After fftshift, entry (h // 2 + k, w // 2 + k) holds frequency (k, k) of the unshifted transform, so the
    # half-diagonal is read directly, and the log amplitude is taken only there.
    diag = torch.fft.fft2(x)[..., k, k]  # (B, C, F): from frequency 0 towards the corner
    diag = torch.log(diag.abs() + _EPS)
    return {"sum": diag.sum((0, 1)), "count": torch.tensor(float(B * C), dtype=torch.float64, device=x.device)}


def _relative(state: dict[str, Tensor]) -> Tensor:
    mean = state["sum"] / state["count"]  # (F,)
    return mean - mean[0]


def fourier_log_amplitude(fmap: Tensor) -> Tensor:
    """Relative log amplitude of the Fourier transformed feature map along the half-diagonal (HDVW).

    ``log(|FFT2(x)| + 1e-6)`` per example and channel, zero frequency shifted to the centre (index
    (h // 2, w // 2) for odd and even sizes, as ``fftshift``), averaged over batch and channels; entries
    (h // 2 + k, w // 2 + k) for k = 0 .. F-1, F = min(h - h//2, w - w//2), minus the k = 0 entry (the
    author's corrected definition LogAmp(f) - LogAmp(0)). Index k is frequency k / h cycles per token
    along each axis for square maps (see ``fourier_frequencies``); the last entry is the highest
    frequency plotted by HDVW. Computed in float64.

    Args:
        fmap: Feature maps (B, C, h, w).

    Returns:
        (F,) float64 with value 0 at index 0.
    """
    return _relative(_log_amplitude_sums(fmap))


def fourier_frequencies(h: int, w: int | None = None) -> Tensor:
    """Frequencies of ``fourier_log_amplitude``'s entries, in radians per token along the row axis
    (2 pi k / h; HDVW plots 0 .. pi)."""
    w = h if w is None else w
    k = torch.arange(_half_diagonal_size(h, w), dtype=torch.float64)
    return 2 * math.pi * k / h


def _variance_sums(fmap: Any, unbiased: bool, name: str = "fmap") -> dict[str, Tensor]:
    x = _check_map(fmap, name)  # (B, C, h, w)
    B, C, h, w = x.shape
    if unbiased and h * w < 2:
        raise ValueError(f"{name} has a single spatial position (h = w = 1): its unbiased variance is undefined")
    var = x.double().flatten(2).var(dim=-1, correction=1 if unbiased else 0)  # (B, C)
    return {"sum": var.sum(), "count": torch.tensor(float(B * C), dtype=torch.float64, device=x.device)}


def feature_variance(fmap: Tensor, unbiased: bool = True) -> Tensor:
    """Feature-map variance (HDVW Fig. 9): variance over the h * w spatial positions of each channel,
    averaged over channels and the batch.

    ``unbiased`` (default, as HDVW's ``tensor.var``) divides by h * w - 1, else by h * w.

    Returns:
        Scalar float64 tensor.
    """
    state = _variance_sums(fmap, unbiased)
    return state["sum"] / state["count"]


class _MapMeasure(StreamingMeasure):
    """Shared ``update(features, layout=None)``: maps or tokens, one tensor or a list (one per layer)."""

    def __init__(self, grid: Any = None, num_prefix_tokens: int | None = None) -> None:
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens
        super().__init__()

    def _options(self) -> dict[str, Any]:
        return {"grid": self.grid, "num_prefix_tokens": self.num_prefix_tokens}

    def _sums(self, fmap: Tensor, name: str) -> dict[str, Tensor]:
        raise NotImplementedError

    def update(self, features: Any, layout: Any = None) -> None:
        """Add a batch: maps (B, C, h, w) or tokens (B, N, D) (reshaped with the grid and prefix tokens
        from the constructor or ``layout`` = ``cap.layout``), one tensor or a list (one per layer). Entries
        that are pairs ``(z_in, z_out)`` (``cap.residuals``) use z_out, the stream after the sub-layer."""
        feats, single = as_list(features, "features")
        check_layout(layout, len(feats))
        contribs = []
        for i, f in enumerate(feats):
            if isinstance(f, (tuple, list)):
                f = f[1]
            name = "features" if single else f"features[{i}]"
            if isinstance(f, torch.Tensor) and f.ndim == 3:
                prefix = layer_option(self.num_prefix_tokens, layout, i, "num_prefix_tokens")
                f = to_map(f, layer_option(self.grid, layout, i, "grid"), 0 if prefix is None else prefix, name)
            contribs.append(self._sums(f, name))
        self._accumulate(contribs, single)


class FourierLogAmplitude(_MapMeasure):
    """Streaming ``fourier_log_amplitude``: sums of half-diagonal log amplitudes and (example, channel)
    counts; ``compute()`` -> (F,) (or a list, one per layer)."""

    def _sums(self, fmap: Tensor, name: str) -> dict[str, Tensor]:
        return _log_amplitude_sums(fmap, name)

    def _compute_layer(self, state: dict[str, Tensor]) -> Tensor:
        return _relative(state)


class FeatureVariance(_MapMeasure):
    """Streaming ``feature_variance``: sum of per-(example, channel) variances and their count."""

    def __init__(self, grid: Any = None, num_prefix_tokens: int | None = None, unbiased: bool = True) -> None:
        self.unbiased = unbiased
        super().__init__(grid, num_prefix_tokens)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "unbiased": self.unbiased}

    def _sums(self, fmap: Tensor, name: str) -> dict[str, Tensor]:
        return _variance_sums(fmap, self.unbiased, name)

    def _compute_layer(self, state: dict[str, Tensor]) -> Tensor:
        return state["sum"] / state["count"]
