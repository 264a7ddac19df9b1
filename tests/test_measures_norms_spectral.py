"""Ratio of norms, Fourier log amplitude and feature-map variance against numpy references (HDVW's own
recipe for the Fourier measure), closed forms, and streaming over unequal batches."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _helpers import fourier_bound, ratio_bound, variance_bound
from vitscope.measures import (
    FeatureVariance,
    FourierLogAmplitude,
    RatioOfNorms,
    feature_variance,
    fourier_frequencies,
    fourier_log_amplitude,
    ratio_of_norms,
)


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ ratio of norms
def ref_ratio(z, fz, p):
    z, fz = np.asarray(z, dtype=np.float64), np.asarray(fz, dtype=np.float64)
    if z.ndim == 4:
        return {"spatial": np.mean([np.linalg.norm(z[b]) / np.linalg.norm(fz[b]) for b in range(len(z))])}
    B, N, _ = z.shape
    r = [[np.linalg.norm(z[b, t]) / np.linalg.norm(fz[b, t]) for t in range(N)] for b in range(B)]
    out = {"spatial": np.mean([r[b][t] for b in range(B) for t in range(p, N)])}
    if p:
        out["cls"] = np.mean([r[b][0] for b in range(B)])
    return out


@pytest.mark.parametrize("shape,p", [((5, 17, 6), 1), ((5, 16, 6), 0), ((4, 3, 5, 5), 0)])
def test_ratio_of_norms_matches_numpy(shape, p):
    z, fz = rnd(*shape, seed=1) * 3, rnd(*shape, seed=2)
    out, ref = ratio_of_norms(z, fz, p), ref_ratio(z, fz, p)
    assert set(out) == set(ref)
    for k in ref:
        assert float(out[k]) == pytest.approx(ref[k], rel=ratio_bound(z), abs=0)


def test_ratio_closed_form_and_streaming():
    z = rnd(9, 17, 8, seed=3)
    out = ratio_of_norms(z, 0.25 * z)
    # scaling by 2^-2 is exact through the squares, their sums and sqrt: every ratio is 4 and so is its mean
    assert float(out["cls"]) == 4.0 and float(out["spatial"]) == 4.0
    fz = rnd(9, 17, 8, seed=4)
    maps, fmaps = rnd(9, 4, 3, 3, seed=5), rnd(9, 4, 3, 3, seed=6)
    m = RatioOfNorms()
    layout = [SimpleNamespace(num_prefix_tokens=1), SimpleNamespace(num_prefix_tokens=0)]
    start = 0
    for s in (2, 6, 1):
        sl = slice(start, start + s)
        m.update([(z[sl], z[sl] + fz[sl]), maps[sl]], [fz[sl], fmaps[sl]], layout=layout)  # cap.residuals pairs
        start += s
    tok, cnn = m.compute()
    ref_tok, ref_cnn = ref_ratio(z, fz, 1), ref_ratio(maps, fmaps, 0)
    assert float(tok["cls"]) == pytest.approx(ref_tok["cls"], rel=ratio_bound(z), abs=0)
    assert float(tok["spatial"]) == pytest.approx(ref_tok["spatial"], rel=ratio_bound(z), abs=0)
    assert set(cnn) == {"spatial"} and float(cnn["spatial"]) == pytest.approx(ref_cnn["spatial"],
                                                                              rel=ratio_bound(maps), abs=0)


def test_ratio_bad_inputs():
    z = rnd(2, 5, 4)
    with pytest.raises(ValueError, match="same shape"):
        ratio_of_norms(z, z[:, :4])
    with pytest.raises(ValueError, match="NaN"):
        ratio_of_norms(z, z * float("nan"))
    with pytest.warns(RuntimeWarning, match="zero"):
        assert math.isinf(float(ratio_of_norms(z, torch.zeros_like(z))["spatial"]))
    with pytest.raises(ValueError, match="undefined"):
        ratio_of_norms(torch.zeros_like(z), torch.zeros_like(z))


# ---------------------------------------------------------------------------------- Fourier measure
def ref_fourier_hdvw(x):
    """HDVW's notebook recipe in numpy (square maps): roll by int(h/2), diag()[int(h/2):], minus [0]."""
    x = np.asarray(x, dtype=np.float64)
    b, c, h, w = x.shape
    f = np.log(np.abs(np.fft.fft2(x)) + 1e-6)
    f = np.roll(f, shift=(int(h / 2), int(w / 2)), axis=(2, 3)).mean(axis=(0, 1))
    d = np.diag(f)[int(h / 2):]
    return d - d[0]


def ref_fourier_loops(x):
    """Any h, w: DFT by explicit sums, entry k = frequency (k, k) from the centre."""
    x = np.asarray(x, dtype=np.float64)
    B, C, h, w = x.shape
    F = min(h - h // 2, w - w // 2)
    out = np.zeros(F)
    for k in range(F):
        tot = 0.0
        for b in range(B):
            for c in range(C):
                coef = sum(x[b, c, i, j] * np.exp(-2j * np.pi * (k * i / h + k * j / w))
                           for i in range(h) for j in range(w))
                tot += np.log(abs(coef) + 1e-6)
        out[k] = tot / (B * C)
    return out - out[0]


@pytest.mark.parametrize("size", [8, 7, 4, 5])
def test_fourier_matches_hdvw_recipe(size):
    x = rnd(3, 4, size, size, seed=size)
    assert (np.abs(fourier_log_amplitude(x).numpy() - ref_fourier_hdvw(x)) <= fourier_bound(x)).all()


@pytest.mark.parametrize("hw", [(4, 6), (5, 4), (3, 3)])
def test_fourier_non_square_matches_loops(hw):
    x = rnd(2, 3, *hw, seed=sum(hw))
    out = fourier_log_amplitude(x)
    assert out[0] == 0
    assert (np.abs(out.numpy() - ref_fourier_loops(x)) <= fourier_bound(x)).all()


@pytest.mark.parametrize("n,k0", [(8, 2), (8, 3), (9, 4), (7, 1)])
def test_fourier_sinusoid_peaks_at_its_frequency(n, k0):
    i = torch.arange(n, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * k0 * (i[:, None] + i[None, :]) / n)  # frequency (k0, k0)
    x = wave.expand(2, 3, n, n) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1)
    out = fourier_log_amplitude(x)
    assert int(out.argmax()) == k0
    assert float(fourier_frequencies(n)[k0]) == 2 * math.pi * k0 / n  # the same float64 operations in order


def test_fourier_and_variance_streaming_with_tokens_and_layout():
    tokens = rnd(11, 1 + 16, 5, seed=7)  # ViT tokens: class token + 4x4 grid
    maps = rnd(11, 3, 6, 6, seed=8)
    layout = [SimpleNamespace(grid=(4, 4), num_prefix_tokens=1), SimpleNamespace(grid=(6, 6), num_prefix_tokens=0)]
    four, var, var_b = FourierLogAmplitude(), FeatureVariance(), FeatureVariance(unbiased=False)
    start = 0
    for s in (5, 2, 4):
        sl = slice(start, start + s)
        for m in (four, var, var_b):
            m.update([tokens[sl], maps[sl]], layout=layout)
        start += s
    as_map = tokens[:, 1:].transpose(1, 2).reshape(11, 5, 4, 4)
    for layer, x in enumerate([as_map, maps]):
        assert (np.abs(four.compute()[layer].numpy() - ref_fourier_hdvw(x)) <= fourier_bound(x, 3)).all()
        xs = np.asarray(x, dtype=np.float64).reshape(x.shape[0], x.shape[1], -1)
        for m, ddof in ((var, 1), (var_b, 0)):
            assert float(m.compute()[layer]) == pytest.approx(xs.var(axis=-1, ddof=ddof).mean(),
                                                              rel=variance_bound(x, ddof, 3), abs=0)
    # streamed (3 batches) vs one call, both the one-pass formula: each within variance_bound's vitscope part
    torch.testing.assert_close(var.compute()[1], feature_variance(maps).double(), rtol=2 * variance_bound(maps, 1, 3),
                               atol=0)


def test_variance_closed_form_and_bad_inputs():
    x = torch.zeros(2, 3, 2, 2)
    x[..., 0, 0] = 4.0  # values (4, 0, 0, 0): mean 1, unbiased var = (9 + 3) / 3 = 4, biased 3
    # small whole numbers throughout (16 - 4^2 / 4 = 12, / 3 or / 4, the mean of six equal values): exact
    assert float(feature_variance(x)) == 4.0
    assert float(feature_variance(x, unbiased=False)) == 3.0
    with pytest.raises(ValueError, match="tokens_to_map"):
        feature_variance(rnd(2, 17, 4))
    with pytest.raises(ValueError, match="tokens_to_map"):
        fourier_log_amplitude(rnd(2, 17, 4))
    with pytest.raises(ValueError, match="NaN"):
        fourier_log_amplitude(x * float("nan"))
    with pytest.raises(ValueError, match="grid"):
        FourierLogAmplitude().update(rnd(2, 17, 4))
    with pytest.raises(ValueError, match="grid"):
        FourierLogAmplitude(grid=(3, 3), num_prefix_tokens=1).update(rnd(2, 17, 4))


@pytest.mark.parametrize("hw", [(16, 16), (14, 9), (6, 11), (1, 5)])
def test_fourier_half_diagonal_dft_equals_full_fft(hw):
    """Only the F half-diagonal DFT coefficients are computed (a matmul): they equal numpy's full FFT2 at
    (k, k), for maps and for ViT tokens (class token dropped) given with a grid, over unequal batches."""
    h, w = hw
    x = rnd(7, 5, h, w, seed=h * w).double() * 3 + 1
    F = min(h - h // 2, w - w // 2)
    k = np.arange(F)
    logamp = np.log(np.abs(np.fft.fft2(x.numpy()))[..., k, k] + 1e-6).mean((0, 1))
    bound = fourier_bound(x)
    assert (np.abs(fourier_log_amplitude(x).numpy() - (logamp - logamp[0])) <= bound).all()
    tokens = torch.cat([rnd(7, 1, 5, seed=1).double(), x.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + h*w, C)
    m = FourierLogAmplitude(grid=(h, w), num_prefix_tokens=1)
    m.update(tokens[:3])
    m.update(tokens[3:])
    assert (np.abs(m.compute().numpy() - (logamp - logamp[0])) <= fourier_bound(x, 2)).all()


def test_validate_false_skips_only_the_value_scans():
    """``validate=False`` (used by vitscope.probe, which scans each captured tensor once) gives the same
    values, still checks shapes, and no longer scans for NaN."""
    z, fz = rnd(4, 17, 6, seed=9), rnd(4, 17, 6, seed=10)
    layout = [SimpleNamespace(grid=(4, 4), num_prefix_tokens=1)]
    for cls in (FourierLogAmplitude, FeatureVariance):
        checked, trusted = cls(), cls()
        checked.update([z], layout)
        trusted.update([z], layout, validate=False)
        torch.testing.assert_close(trusted.compute(), checked.compute(), rtol=0, atol=0)
        with pytest.raises(ValueError, match="NaN"):
            cls().update([z * float("nan")], layout)
        cls().update([z * float("nan")], layout, validate=False)  # the caller vouched for the values
        with pytest.raises(ValueError, match="grid"):
            cls().update([z[:, :16]], layout, validate=False)
    checked, trusted = RatioOfNorms(), RatioOfNorms()
    checked.update(z, fz)
    trusted.update(z, fz, validate=False)
    assert checked.compute() == trusted.compute()
    with pytest.raises(ValueError, match="same shape"):
        RatioOfNorms().update(z, fz[:, :5], validate=False)


def test_variance_one_pass_with_a_large_mean():
    """The one-pass float64 variance (sum of squares minus squared sums) keeps ~1e-10 relative accuracy when the
    mean is 1000 standard deviations, for maps and for float64 tokens read in place (as vitscope.probe does). The
    worst-case bound (``_variance_bound``: (N + 2) u times the cancellation factor 1 + mean^2 / var ~ 1e6) is
    8e-8 here; the error observed is ~3e-10 (sums' roundings do not all add up)."""
    maps = rnd(6, 4, 5, 5, seed=11).double() + 1000.0
    ref = maps.numpy().reshape(6, 4, -1).var(axis=-1, ddof=1).mean()
    assert float(feature_variance(maps)) == pytest.approx(ref, rel=variance_bound(maps, 1), abs=0)
    tokens = torch.cat([rnd(6, 1, 4, seed=12).double() * 50, maps.flatten(2).transpose(1, 2)], dim=1)  # (B, 26, C)
    m = FeatureVariance(grid=(5, 5), num_prefix_tokens=1)
    m.update(tokens[:2])
    m.update(tokens[2:], validate=False)
    p2 = float(tokens[:, :1].square().sum())
    assert float(m.compute()) == pytest.approx(ref, rel=variance_bound(maps, 1, 2, p2), abs=0)


@pytest.mark.parametrize("hw", [(6, 6), (5, 7)])
def test_channels_last_maps_read_in_memory_order(hw):
    """Swin and ConvNeXt records are channels-first views of channels-last maps: Fourier, variance and ratio of
    norms read them in memory order without a copy, with the numpy references' values (the same derived bounds as
    the contiguous tests above)."""
    x = rnd(3, 4, *hw, seed=7)
    cl = x.contiguous(memory_format=torch.channels_last)  # (B, C, h, w) view of (B, h, w, C) memory
    assert not cl.is_contiguous() and torch.equal(cl, x)
    bound = fourier_bound(x)
    assert (np.abs(fourier_log_amplitude(cl).numpy() - ref_fourier_loops(x)) <= bound).all()
    ref_var = np.asarray(x, dtype=np.float64).reshape(3, 4, -1).var(-1, ddof=1).mean()
    assert float(feature_variance(cl)) == pytest.approx(ref_var, rel=variance_bound(x, 1), abs=0)
    streamed = FourierLogAmplitude()
    streamed.update(cl)
    assert (np.abs(streamed.compute().numpy() - ref_fourier_loops(x)) <= bound).all()
    f = rnd(3, 4, *hw, seed=8).contiguous(memory_format=torch.channels_last)
    assert float(ratio_of_norms(cl, f)["spatial"]) == pytest.approx(ref_ratio(x, f, 0)["spatial"],
                                                                     rel=ratio_bound(x), abs=0)
    from vitscope.measures.cka import linear_gram
    from vitscope.probing._checks import _not_finite

    flat = np.asarray(x, dtype=np.float64).reshape(3, -1)
    flat -= flat.mean(0)
    # float32 Gram of the centred features: each entry a sum of C h w <= 140 float32 products, |error| <= 140 2^-24
    # of the sum of |products| (<= the product of the norms)
    bound = 140 * 2.0**-24 * np.linalg.norm(flat, axis=1)[:, None] * np.linalg.norm(flat, axis=1)[None, :]
    assert (np.abs(linear_gram(cl, float32=True).numpy() - flat @ flat.T) <= bound).all()
    bad = cl.clone()
    bad[1, 2, 0, 0] = float("nan")
    assert not bool(_not_finite(cl)) and bool(_not_finite(bad)) and not bad.is_contiguous()
