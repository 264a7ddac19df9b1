"""The few-shot ridge probe against scikit-learn's RidgeClassifier on the same features, fed in batches of unequal
size (a short last one), merged across instances as ranks would be."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier

from vitscope.measures.linear_probe import ProbeAccuracy, RidgeFit, probe_features, ridge_classifier


def _data(n, d, classes, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=g, dtype=torch.float64)
    x = centres[labels] + 2.0 * torch.randn(n, d, generator=g, dtype=torch.float64) + offset
    return x, labels


def _fed(fit, x, y, sizes):
    start = 0
    for s in sizes:
        fit.update(x[start:start + s], y[start:start + s])
        start += s
    assert start == len(x)


# D < n and D > n (the few-shot case: 10 shots x 4 classes = 40 examples of 64 features); a large common offset
# (trained ViTs' massive activations) must not change the fit (the intercept absorbs it).
@pytest.mark.parametrize("d,offset", [(12, 0.0), (64, 0.0), (64, 50.0)])
def test_ridge_fit_equals_sklearn(d, offset):
    classes, n_fit = 4, 40
    x, y = _data(n_fit + 100, d, classes, seed=d, offset=offset)
    xf, yf, xt, yt = x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:]
    fit = RidgeFit(classes, ridge=0.5)
    _fed(fit, xf, yf, [16, 16, 5, 3])  # a short last batch
    sol = fit.compute()
    xc = xf - xf.mean(0)
    alpha = 0.5 * float((xc**2).sum()) / d  # the relative ridge: 0.5 x mean eigenvalue of Xc'Xc
    assert sol["alpha"] == pytest.approx(alpha, rel=1e-12)
    ref = RidgeClassifier(alpha=alpha, solver="cholesky").fit(xf.numpy(), yf.numpy())
    # float64 solves of a system of condition <= (lambda_max + alpha) / alpha (< 100 here): ~1e-13 relative, the
    # moments centred batch by batch (no X'X - n m m' cancellation under the offset); the bias adds mean(x) W
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(sol["weight"].numpy().T, ref.coef_, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(sol["bias"].numpy(), ref.intercept_, rtol=0, atol=1e-10 * (1 + offset) * d * scale)
    pred = ridge_classifier(sol["weight"], sol["bias"], xt).numpy()
    np.testing.assert_array_equal(pred, ref.predict(xt.numpy()))
    acc = ProbeAccuracy()
    for start in range(0, len(xt), 33):  # 33, 33, 33, 1
        acc.update(xt[start:start + 33], yt[start:start + 33], sol)
    assert float(acc.compute()) == ref.score(xt.numpy(), yt.numpy())


def test_ridge_fit_merges_across_instances_and_layers():
    """Two 'ranks' each see part of the fit set; merged sums give the single-pass fit for every layer."""
    x, y = _data(30, 8, 3, seed=1)
    x2 = x[:, :5] * 3.0  # a second layer of another width
    one = RidgeFit(3)
    one.update([x, x2], y)
    a, b = RidgeFit(3), RidgeFit(3)
    a.update([x[:13], x2[:13]], y[:13])
    b.update([x[13:], x2[13:]], y[13:])
    merged = a.merge(b).compute()
    for got, want in zip(merged, one.compute()):
        torch.testing.assert_close(got["weight"], want["weight"], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cannot merge"):
        RidgeFit(3, ridge=2.0).merge(a)


def test_ridge_fit_errors():
    x, y = _data(10, 4, 2, seed=0)
    fit = RidgeFit(2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit.update(x, y + 1)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit.update(bad, y)
    const = RidgeFit(2)
    const.update(torch.ones(6, 3, dtype=torch.float64), torch.tensor([0, 1] * 3))
    with pytest.raises(ValueError, match="constant across examples"):
        const.compute()
    with pytest.raises(ValueError, match="num_classes"):
        RidgeFit(1)


def test_probe_features_cls_and_gap():
    z = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 class token + 4 spatial tokens
    f = probe_features(z, num_prefix_tokens=1)
    torch.testing.assert_close(f["cls"], z[:, 0])
    torch.testing.assert_close(f["gap"], z[:, 1:].mean(1))
    assert set(probe_features(z, 0)) == {"gap"}
    m = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(probe_features(m)["gap"], m.mean((2, 3)))
