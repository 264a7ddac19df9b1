"""Fourier-band noise: spectrum inside the requested annulus (numpy reference), requested L2 norm; sweep."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from vitscope.robustness import band_noise, frequency_noise, frequency_sweep

U = 2.0**-53


def _annulus(h: int, w: int, freq: float, width: float, scale: str) -> np.ndarray:
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    r = np.hypot(fy, fx) / (np.hypot(0.5, 0.5) if scale == "diagonal" else 0.5)
    # the library's own tie margin (1e-12) and both sides' roundings of r (hypot, division, subtraction: <= 3 u r
    # each, r <= 1.5): a superset of the library's bins, so bins on the band's edge count as inside (was 1e-9)
    return np.abs(r - freq) <= width / 2 + 1e-12 + 8 * U


@pytest.mark.parametrize("scale", ["diagonal", "axis"])
@pytest.mark.parametrize("freq", [0.0, 0.35, 0.8, 1.0])
def test_band_noise_spectrum_and_norm(freq: float, scale: str) -> None:
    h, w, eps = 24, 32, 1.7  # non-square, so swapped axes would show
    noise = band_noise((3, 3, h, w), freq, 0.2, eps=eps, seed=5, scale=scale, dtype=torch.float64)
    assert noise.shape == (3, 3, h, w) and noise.dtype == torch.float64
    # L2 over C, H, W: the library's norm of N = C H W squares (N u, halved by sqrt, + u), the quotient and the
    # products (2 u), this norm again ((N / 2 + 1) u): within (N + 6) u relative
    n = 3 * h * w
    assert np.abs(noise.flatten(1).norm(dim=1).numpy() - eps).max() <= (n + 6) * U * eps
    spec = np.abs(np.fft.fft2(noise.numpy()))  # (B, C, H, W)
    inside = _annulus(h, w, freq, 0.2, scale)
    # nothing outside the band: exactly 0 there, so only FFT roundings reach it (Higham Thm 24.2: log2 S eta ||y||_2,
    # eta <= 11 u as in test_measures_norms_spectral, for the library's inverse FFT and numpy's FFT; the .real of
    # the band's point-symmetric spectrum stays in the band; the scaling to eps rounds each value by u); per
    # channel ||noise||_2 <= eps and ||y||_2 = sqrt(S) ||noise||_2: was < 1e-10 of the largest coefficient
    s = h * w
    assert spec[..., ~inside].max() <= math.sqrt(s) * eps * (22 * math.log2(s) + 1) * U
    # ... so all the energy is inside: per image sum |F|^2 = S ||noise||^2 = S eps^2 (Parseval), within the norm's
    # (n + 6) u (twice, squared), numpy's FFT (22 log2 S u) and the squares' sum (n u)
    energy = (spec**2 * inside).sum(axis=(1, 2, 3))
    assert inside.any() and np.abs(energy - s * eps**2).max() <= (3 * n + 12 + 22 * math.log2(s)) * U * s * eps**2


def test_frequency_noise_adds_band_noise_and_clamps() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 0.4 + 0.3
    small = frequency_noise(x, 0.5, 0.2, eps=0.5, seed=1)  # RMS ~0.018: no clipping
    expected = x + band_noise(x.shape, 0.5, 0.2, eps=0.5, seed=1)
    assert torch.equal(small, expected)  # the same float32 noise added: nothing clamps at RMS 0.018 in [0.3, 0.7]
    # the float32 sum rounds each value by u32 |small_i| (the difference small - x is then exact by Sterbenz:
    # |noise| << x), the noise's cast to float32 by u32 / 2 of it: ||small - x - noise64|| <= u32 (||small|| +
    # ||noise|| / 2); band_noise's float64 norm within (N / 2 + 3) u of 0.5, this float64 norm within (N / 2 + 1) u
    d = (small - x).double().flatten(1)
    u32, n = 2.0**-24, d.shape[1]
    bound = u32 * (small.double().flatten(1).norm(dim=1) + 0.25) + (n + 4) * U * 0.5
    assert ((d.norm(dim=1) - 0.5).abs() <= bound).all()
    assert torch.equal(frequency_noise(x, 0.5, eps=0.5, seed=1), small)  # seeded
    assert not torch.equal(frequency_noise(x, 0.5, eps=0.5, seed=2), small)
    big = frequency_noise(x, 0.9, eps=40.0, seed=1)
    assert big.min() >= 0 and big.max() <= 1 and big.dtype == x.dtype


def test_frequency_sweep_counts_over_unequal_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    )
    x = torch.rand(23, 3, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)  # batches 10, 10, 3
    freqs = [0.0, 0.5, 1.0]
    out = frequency_sweep(model, loader, freqs, eps=3.0, mean=(0, 0, 0), std=(1, 1, 1), seed=7, progress=False)
    assert out["n"] == 23 and out["clean_accuracy"] == 1.0
    # Reference: the same noise drawn batch by batch (seed + batch index), predictions by hand.
    correct = np.zeros(len(freqs))
    for i, s in enumerate(range(0, 23, 10)):
        xb, yb = x[s : s + 10], y[s : s + 10]
        for j, f in enumerate(freqs):
            xn = (xb + band_noise(xb.shape, f, 0.2, eps=3.0, seed=7 + i)).clamp(0, 1)
            with torch.no_grad():
                correct[j] += (model(xn).argmax(dim=1) == yb).sum().item()
    # hit counts / 23 both sides, then 23 / 23 = 1 minus them: the same float64 operations, exact
    np.testing.assert_array_equal(out["accuracy"], correct / 23)
    np.testing.assert_array_equal(out["error_increase"], 1.0 - correct / 23)


def test_frequency_bad_input() -> None:
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="no Fourier frequency"):
        frequency_noise(x, 0.05, 0.02, eps=1.0)  # between DC and the first bin
    with pytest.raises(ValueError, match="scale must be"):
        frequency_noise(x, 0.5, eps=1.0, scale="radius")
    with pytest.raises(ValueError, match=r"\[0, 1\] pixel space"):
        frequency_noise(x * 2 - 1, 0.5, eps=1.0)
