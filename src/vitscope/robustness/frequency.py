"""Fourier-band noise and accuracy against noise frequency (HDVW, Park & Kim 2022, Fig. 2c).

HDVW add random noise restricted to a frequency band and plot the accuracy drop against the band's
frequency: MSAs (low-pass) are robust to high-frequency noise, convs (high-pass) are not.

Conventions (ours; HDVW's code for this figure is not public):
- Normalized frequency ``r = |f| / |f_max|`` with ``f = (fy, fx)`` in cycles per pixel
  (``torch.fft.fftfreq``). With ``scale="diagonal"`` (default) ``|f_max| = |(0.5, 0.5)|``, the corner on
  the half-diagonal, so ``r`` spans [0, 1] and 1 matches the last point of HDVW's Fourier
  log-amplitude plot (the half-diagonal, labelled pi). With ``scale="axis"``, ``|f_max| = 0.5`` (Nyquist on
  an axis) and corners reach sqrt(2).
- The band is the annulus ``|r - freq| <= width / 2`` (at ``freq = 0``, a disc including the DC term).
- Noise: white Gaussian per channel, 2-D FFT, zeroed outside the band, inverse FFT (real by symmetry),
  then scaled so each image's perturbation has L2 norm ``eps`` over all C x H x W pixel values in [0, 1]
  units (per-pixel RMS = ``eps / sqrt(C H W)``). The noisy image is clamped to [0, 1].
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from vitscope.measures.evaluation import eval_batches, eval_mode
from vitscope.robustness._checks import check_images, pixel_batch
from vitscope.robustness.attacks import pixel_model
from vitscope.runtime import model_device

_logger = logging.getLogger(__name__)

__all__ = ["frequency_radius", "band_mask", "band_noise", "frequency_noise", "frequency_sweep"]


def frequency_radius(height: int, width: int, scale: str = "diagonal") -> torch.Tensor:
    """Normalized radial frequency (H, W) of each 2-D FFT bin, in ``torch.fft.fft2`` order (unshifted)."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)  # (H,) cycles/pixel in [-0.5, 0.5)
    fx = torch.fft.fftfreq(width, dtype=torch.float64)  # (W,)
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)  # (H, W)
    if scale == "diagonal":
        return r / math.sqrt(0.5)  # |(0.5, 0.5)| = sqrt(0.5)
    if scale == "axis":
        return r / 0.5
    raise ValueError(f"scale must be 'diagonal' or 'axis', got {scale!r}")


def band_mask(height: int, width: int, freq: float, band_width: float = 0.2, scale: str = "diagonal") -> torch.Tensor:
    """Boolean (H, W) mask of the FFT bins with ``|r - freq| <= band_width / 2``.

    Raises:
        ValueError: no FFT bin of an H x W image falls in the band (widen it).
    """
    if band_width <= 0:
        raise ValueError(f"width must be positive, got {band_width}")
    r = frequency_radius(height, width, scale)
    mask = (r - float(freq)).abs() <= band_width / 2 + 1e-12  # (H, W)
    if not mask.any():
        raise ValueError(
            f"no Fourier frequency of a {height}x{width} image lies in the band {freq} +/- {band_width / 2} "
            f"(normalized, scale={scale!r}); use a wider band or a frequency in [0, 1]"
        )
    return mask


def band_noise(
    shape: Sequence[int],
    freq: float,
    width: float = 0.2,
    *,
    eps: float,
    seed: int = 0,
    scale: str = "diagonal",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Noise of ``shape`` (B, C, H, W) whose 2-D spectrum lies in the annulus, L2 norm ``eps`` per image."""
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {tuple(shape)}")
    if eps < 0:
        raise ValueError(f"eps (L2 norm per image) must be non-negative, got {eps}")
    b, c, h, w = (int(s) for s in shape)
    mask = band_mask(h, w, freq, width, scale)  # (H, W)
    gen = torch.Generator().manual_seed(seed)
    white = torch.randn((b, c, h, w), generator=gen, dtype=torch.float64)
    noise = torch.fft.ifft2(torch.fft.fft2(white) * mask).real  # (B, C, H, W); mask is point-symmetric
    norms = noise.flatten(1).norm(dim=1).clamp(min=1e-300)  # (B,)
    noise = noise * (eps / norms)[:, None, None, None]
    return noise.to(device=device, dtype=dtype)


def frequency_noise(
    images: torch.Tensor,
    freq: float,
    width: float = 0.2,
    *,
    eps: float,
    seed: int = 0,
    scale: str = "diagonal",
) -> torch.Tensor:
    """``clamp(images + band_noise, 0, 1)`` for images (B, C, H, W) in [0, 1]; see the module notes."""
    images = check_images(images)
    noise = band_noise(
        images.shape, freq, width, eps=eps, seed=seed, scale=scale, dtype=images.dtype, device=images.device
    )
    return (images + noise).clamp(0.0, 1.0)


@torch.no_grad()
def frequency_sweep(
    model: nn.Module,
    loader: Iterable,
    freqs: Sequence[float] = tuple(i / 10 for i in range(11)),
    eps: float | None = None,
    width: float = 0.2,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    seed: int = 0,
    scale: str = "diagonal",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Accuracy on band-noised images against the band's frequency (HDVW Fig. 2c).

    The same white noise (seed ``seed + batch index``) is band-passed for every frequency, so the
    curve compares frequencies on common random numbers. ``error_increase`` = clean accuracy minus
    noisy accuracy (the increase in top-1 error). ``eps`` (L2 norm per image) defaults to an RMS of
    0.05 per pixel value, ``0.05 * sqrt(C H W)`` (2.77 at 3 x 32 x 32).
    """
    dev = model_device(model, device)
    net = pixel_model(model, mean, std).to(dev)
    correct = torch.zeros(len(freqs), dtype=torch.int64)
    clean, n = 0, 0
    with eval_mode(net):
        for i, x, y in eval_batches(loader, dev, max_batches, desc="frequency noise", progress=progress,
                                    prepare=pixel_batch):
            if eps is None:
                eps = 0.05 * math.sqrt(x[0].numel())
            clean += int((net(x).argmax(1) == y).sum())
            for j, f in enumerate(freqs):
                x_noisy = frequency_noise(x, f, width, eps=eps, seed=seed + i, scale=scale)
                correct[j] += int((net(x_noisy).argmax(1) == y).sum())
            n += x.shape[0]
    if n == 0:
        raise ValueError("the loader yielded no examples")
    acc = (correct.double() / n).tolist()
    return {
        "freqs": [float(f) for f in freqs],
        "accuracy": acc,
        "clean_accuracy": clean / n,
        "error_increase": [clean / n - a for a in acc],
        "eps": float(eps),  # type: ignore[arg-type]
        "width": float(width),
        "scale": scale,
        "n": n,
    }
