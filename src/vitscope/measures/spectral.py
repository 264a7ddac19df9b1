"""Fourier relative log amplitude and feature-map variance of feature maps (HDVW: Park & Kim 2022,
Fig. 2, 8 and 9).

Both take maps (B, C, h, w); for ViT tokens drop the prefix tokens and reshape first with
``vitscope.tokens_to_map(x, grid, num_prefix_tokens)``, or give the streaming classes the tokens with
``layout=cap.layout`` (or ``grid=``/``num_prefix_tokens=``) and they do it.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch

from vitscope.measures._streaming import StreamingMeasure, check_layout, layer_option
from vitscope.measures._validate import as_list, check_grid, check_tensor

Tensor = torch.Tensor

__all__ = [
    "fourier_log_amplitude", "fourier_frequencies", "feature_variance", "FourierLogAmplitude", "FeatureVariance",
]

_EPS = 1e-6


def _check_map(fmap: Any, name: str, validate: bool = True) -> Tensor:
    if isinstance(fmap, torch.Tensor) and fmap.ndim == 3:
        raise ValueError(
            f"{name} must be a (B, C, h, w) feature map, got tokens {tuple(fmap.shape)}; convert ViT tokens with "
            "vitscope.tokens_to_map(x, grid, num_prefix_tokens)"
        )
    return check_tensor(fmap, name, 4, "(B, C, h, w) feature map", finite=validate)


def _spatial(fmap: Tensor, grid: Any = None, num_prefix_tokens: int = 0, name: str = "fmap") -> tuple[Tensor, int]:
    """The spatial positions of maps (B, C, h, w) -> ((B, C, h*w), dim -1), of channels-last maps (Swin, ConvNeXt)
    -> ((B, h*w, C) view, dim 1), or of tokens (B, N, D), prefix tokens dropped -> ((B, h*w, D) view, dim 1);
    row-major positions either way (as ``tokens_to_map``), no copy."""
    if fmap.ndim == 4:
        B, C, h, w = fmap.shape
        if not fmap.is_contiguous() and fmap.is_contiguous(memory_format=torch.channels_last):
            return fmap.permute(0, 2, 3, 1).reshape(B, h * w, C), 1  # (B, S, C) view of a channels-last map
        return fmap.flatten(2), -1  # (B, C, S)
    if grid is None:
        raise ValueError(
            f"{name} holds tokens (B, N, D): pass grid= and num_prefix_tokens= (or layout=cap.layout), "
            "or convert with vitscope.tokens_to_map(x, grid, num_prefix_tokens)"
        )
    check_grid(grid, fmap.shape[1], num_prefix_tokens, name)
    return fmap[:, num_prefix_tokens:], 1  # (B, S, D)


def _half_diagonal_size(h: int, w: int) -> int:
    return min(h - h // 2, w - w // 2)


@functools.lru_cache(maxsize=32)
def _diagonal_dft(h: int, w: int, device: torch.device) -> Tensor:
    """(h*w, 2F) float64: columns [cos | -sin] of the DFT at frequencies (k, k), k = 0 .. F-1, over row-major
    positions (r, c): x @ W gives the real and imaginary parts of FFT2(x)[k, k]. The phase
    2 pi k (r/h + c/w) = 2 pi m / (h w) with m = k (r w + c h) mod h w, reduced exactly in integers.
    Cached per size and device: do not modify it."""
    F = _half_diagonal_size(h, w)
    r = torch.arange(h, dtype=torch.int64).repeat_interleave(w)
    c = torch.arange(w, dtype=torch.int64).repeat(h)
    k = torch.arange(F, dtype=torch.int64)
    m = (k[None, :] * (r * w + c * h)[:, None]) % (h * w)  # (S, F)
    phase = (2 * math.pi / (h * w)) * m.to(torch.float64)
    return torch.cat([torch.cos(phase), -torch.sin(phase)], dim=1).to(device)  # (S, 2F)


def _log_amplitude_sums(x: Tensor, hw: tuple[int, int], dim: int) -> dict[str, Tensor]:
    """Sums of log(|FFT2| + eps) at frequencies (k, k) over examples and channels; ``x`` from ``_spatial``.

    Only the F half-diagonal frequencies are needed, so the DFT is one float64 matmul with a (S, 2F) matrix
    (cheaper than a full FFT2 for the small maps of ViTs and as exact: float32 inputs are exact in float64).
    After fftshift, entry (h // 2 + k, w // 2 + k) holds frequency (k, k) of the unshifted transform.
    """
    h, w = hw
    W = _diagonal_dft(h, w, x.device)  # (S, 2F)
    F = W.shape[1] // 2
    x = x.to(torch.float64)
    if dim == -1:  # maps (B, C, S)
        coef = x @ W  # (B, C, 2F)
        logamp = torch.hypot(coef[..., :F], coef[..., F:])  # (B, C, F)
    else:  # tokens (B, S, C)
        coef = W.T @ x  # (B, 2F, C)
        logamp = torch.hypot(coef[:, :F], coef[:, F:]).transpose(1, 2)  # (B, C, F)
    logamp = logamp.add_(_EPS).log_()  # from frequency 0 towards the corner
    count = logamp.shape[0] * logamp.shape[1]
    return {"sum": logamp.sum((0, 1)), "count": float(count)}


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
    frequency plotted by HDVW. Computed in float64 (only the F needed DFT coefficients, equal to
    ``torch.fft.fft2``'s to float64 round-off).

    Args:
        fmap: Feature maps (B, C, h, w).

    Returns:
        (F,) float64 with value 0 at index 0.
    """
    x = _check_map(fmap, "fmap")
    flat, dim = _spatial(x)
    return _relative(_log_amplitude_sums(flat, tuple(x.shape[-2:]), dim))


def fourier_frequencies(h: int, w: int | None = None) -> Tensor:
    """Frequencies of ``fourier_log_amplitude``'s entries, in radians per token along the row axis
    (2 pi k / h; HDVW plots 0 .. pi)."""
    w = h if w is None else w
    k = torch.arange(_half_diagonal_size(h, w), dtype=torch.float64)
    return 2 * math.pi * k / h


def _variance_sums(x: Tensor, dim: int, unbiased: bool, name: str = "fmap", full: Tensor | None = None,
                   ) -> dict[str, Tensor]:
    """Sum over (example, channel) of the variance over positions; ``x`` from ``_spatial``.

    One pass in float64: sum_bc var_bc = (sum x^2 - sum_bc (sum_s x)^2 / S) / (S - 1). The subtraction loses
    about log10(1 + mean^2 / variance) of float64's 16 digits (1e-10 relative error at mean = 1e3 x std);
    float32 inputs square exactly in float64. ``full``: the contiguous tensor ``x`` is a view of when its other
    entries are only the prefix tokens (sum x^2 is then one dot product minus the prefix tokens' part).
    """
    S = x.shape[dim]
    if unbiased and S < 2:
        raise ValueError(f"{name} has a single spatial position (h = w = 1): its unbiased variance is undefined")
    x = x.to(torch.float64)
    sums = x.sum(dim)  # (B, C): per (example, channel) sum over positions
    if x.is_contiguous():
        flat = x.reshape(-1)
        squares = torch.dot(flat, flat)
    elif full is not None and full.is_contiguous() and full.dtype == torch.float64 and dim == 1:
        flat, prefix = full.reshape(-1), full[:, : full.shape[1] - S]  # (B, p, C)
        squares = torch.dot(flat, flat) - prefix.square().sum()
    else:
        squares = x.square().sum()
    total = (squares - sums.square().sum() / S).clamp_min(0) / (S - 1 if unbiased else S)
    count = x.numel() // S
    return {"sum": total, "count": float(count)}


def feature_variance(fmap: Tensor, unbiased: bool = True) -> Tensor:
    """Feature-map variance (HDVW Fig. 9): variance over the h * w spatial positions of each channel,
    averaged over channels and the batch.

    ``unbiased`` (default, as HDVW's ``tensor.var``) divides by h * w - 1, else by h * w. One pass in float64
    (sum of squares minus squared sums): relative error about 1e-16 (1 + mean^2 / variance).

    Returns:
        Scalar float64 tensor.
    """
    state = _variance_sums(*_spatial(_check_map(fmap, "fmap")), unbiased)
    return state["sum"] / state["count"]


class _MapMeasure(StreamingMeasure):
    """Shared ``update(features, layout=None)``: maps or tokens, one tensor or a list (one per layer)."""

    def __init__(self, grid: Any = None, num_prefix_tokens: int | None = None) -> None:
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens
        super().__init__()

    def _options(self) -> dict[str, Any]:
        return {"grid": self.grid, "num_prefix_tokens": self.num_prefix_tokens}

    def _sums(self, x: Tensor, hw: tuple[int, int], dim: int, name: str, full: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def update(self, features: Any, layout: Any = None, *, validate: bool = True) -> None:
        """Add a batch: maps (B, C, h, w) or tokens (B, N, D) (prefix tokens dropped and positions laid out with
        the grid and prefix tokens from the constructor or ``layout`` = ``cap.layout``), one tensor or a list
        (one per layer). Entries that are pairs ``(z_in, z_out)`` (``cap.residuals``) use z_out, the stream
        after the sub-layer. ``validate=False`` skips the finite-value scan (shapes are always checked): for
        callers that already checked the tensors, such as ``vitscope.probe``."""
        feats, single = as_list(features, "features")
        check_layout(layout, len(feats))
        names = ["features"] if single else [f"features[{i}]" for i in range(len(feats))]
        self._accumulate([self.layer_sums(f, layout, i, n, validate) for i, (f, n) in enumerate(zip(feats, names))],
                         single)

    def layer_sums(self, f: Any, layout: Any = None, i: int = 0, name: str = "features",
                   validate: bool = True) -> dict[str, Tensor]:
        """One layer's additive contribution (the per-layer part of ``update``; ``layout`` a LayerInfo or the
        list indexed by ``i``). ``vitscope.probe`` adds them layer by layer as the model runs."""
        if isinstance(f, (tuple, list)):
            f = f[1]
        f = check_tensor(f, name, (3, 4), "(B, N, D) tokens or (B, C, H, W) maps", finite=validate)
        if f.ndim == 3:
            prefix = layer_option(self.num_prefix_tokens, layout, i, "num_prefix_tokens")
            prefix = 0 if prefix is None else prefix
            grid = layer_option(self.grid, layout, i, "grid")
            x, dim = _spatial(f, grid, prefix, name)
            hw = check_grid(grid, f.shape[1], prefix)
            full = f
        else:
            (x, dim), hw, full = _spatial(f), tuple(f.shape[-2:]), None
        return self._sums(x, hw, dim, name, full)


class FourierLogAmplitude(_MapMeasure):
    """Streaming ``fourier_log_amplitude``: sums of half-diagonal log amplitudes and (example, channel)
    counts; ``compute()`` -> (F,) (or a list, one per layer)."""

    def _sums(self, x: Tensor, hw: tuple[int, int], dim: int, name: str, full: Tensor | None) -> dict[str, Tensor]:
        return _log_amplitude_sums(x, hw, dim)

    def _compute_layer(self, state: dict[str, Tensor]) -> Tensor:
        return _relative(state)


class FeatureVariance(_MapMeasure):
    """Streaming ``feature_variance``: sum of per-(example, channel) variances and their count."""

    def __init__(self, grid: Any = None, num_prefix_tokens: int | None = None, unbiased: bool = True) -> None:
        self.unbiased = unbiased
        super().__init__(grid, num_prefix_tokens)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "unbiased": self.unbiased}

    def _sums(self, x: Tensor, hw: tuple[int, int], dim: int, name: str, full: Tensor | None) -> dict[str, Tensor]:
        return _variance_sums(x, dim, self.unbiased, name, full)

    def _compute_layer(self, state: dict[str, Tensor]) -> Tensor:
        return state["sum"] / state["count"]
