"""The few-shot ridge probe against scikit-learn's RidgeClassifier on the same features, fed in batches of unequal
size (a short last one), merged across instances as ranks would be."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier

from _helpers import ridge_trace_bound
from vitscope.measures.linear_probe import ProbeAccuracy, RidgeFit, probe_features, ridge_classifier

U = 2.0**-53  # unit roundoff of float64


def _data(n, d, classes, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=g, dtype=torch.float64)
    x = centres[labels] + 2.0 * torch.randn(n, d, generator=g, dtype=torch.float64) + offset
    return x, labels


def _opnorm(m) -> float:
    return float(np.linalg.norm(m, 2))


def _solve_err(delta, f, w_norm, alpha):
    """(A + Delta) w^ = b + f with ||Delta||_2 <= delta, A = Xc'Xc + alpha I (||A^-1||_2 <= 1 / alpha): ||w^ - w|| <=
    (||f|| + delta ||w||) / (alpha - delta), and ||w|| <= ||w^|| + that."""
    assert 2 * delta < alpha
    return (f + delta * w_norm) / (alpha - 2 * delta)


def _ridge_err(x, y, classes, alpha, sizes, weight, sklearn=False):
    """Per class, a bound on ||w^_c - w_c||_2 (w the exact ridge solution on x (n, D) float64, ``alpha`` exact) of
    RidgeFit fed in batches of ``sizes`` (moments merged by Chan et al.'s update, then torch.linalg.solve: LAPACK's
    getrf/getrs) or of scikit-learn's solver="cholesky" (one centring, then LAPACK's Cholesky solve of the primal
    (Xc'Xc + alpha I) W = Xc'Yc when D <= n, of the dual (Xc Xc' + alpha I) V = Yc, W = Xc' V when D > n).
    Standard error analysis (Higham): Gram entries within gamma sqrt(S_ii S_jj) (||.||_2 <= gamma tr S); a mean's
    error delta <= gamma_(n + 3k) max|x| enters a merge's w d d' to first order (sum w |d_i| <= sqrt(n S_ii)),
    a single centring only as n delta delta' (the centred rows sum to 0); solves backward stable, ||Delta||_2 <=
    gamma_3D || |L||U| ||_2 (Thm 9.4) or gamma_(3D+1) || |R'||R| ||_2 (Thm 10.4), the factors computed here."""
    n, d = x.shape
    k = len(sizes)
    xc = x - x.mean(0)  # (n, D)
    yc = np.where(np.arange(classes)[None, :] == y[:, None], 1.0, -1.0)  # (n, C) +1 / -1 coding
    yc = yc - yc.mean(0)
    S = xc.T @ xc  # (D, D)
    tr = float(np.trace(S))
    A = S + alpha * np.eye(d)
    w_norm = np.linalg.norm(weight, axis=0)  # (C,)
    xy = np.linalg.norm(np.abs(xc).T @ np.abs(yc), axis=0)  # (C,) || |Xc|'|yc_c| ||
    delta = (n + 3 * k) * U * float(np.abs(x).max())
    if not sklearn:
        g = (n + 3 * k + 4) * U  # centring 2 u, product u, batch sums gamma_(n_b), merges 3 u each
        _, L, R = (t.numpy() for t in torch.linalg.lu(torch.from_numpy(A)))  # the same getrf torch's solve runs
        gram = g * tr + 4 * delta * np.sqrt(n * d * tr) + n * d * delta**2
        back = 3 * d * U / (1 - 3 * d * U) * _opnorm(np.abs(L) @ np.abs(R))
        rhs = g * xy + 2 * delta * n * np.sqrt(d) + 2 * (n + 3 * k) * U * np.sqrt(n * tr)  # d_x eps_y + eps_x d_y
        return _solve_err(gram + back, rhs, w_norm, alpha)
    if d <= n:
        R = np.linalg.cholesky(A).T
        gram = (n + 4) * U * tr + n * d * delta**2
        back = (3 * d + 1) * U / (1 - (3 * d + 1) * U) * _opnorm(np.abs(R.T) @ np.abs(R))
        return _solve_err(gram + back, (n + 4) * U * xy, w_norm, alpha)
    # dual: V = (K + alpha I)^-1 Yc exact for the data as rounded by the centring (within u |xc|, delta only to
    # second order): W moves by ||dX|| (||yc|| + 2 ||Xc|| ||w||) / alpha; then W = Xc' V (gamma_n |Xc|'|V|)
    K = xc @ xc.T + alpha * np.eye(n)  # (n, n)
    V = np.linalg.solve(K, yc)  # (n, C)
    R = np.linalg.cholesky(K).T
    back = (d + 3) * U * tr + (3 * n + 1) * U / (1 - (3 * n + 1) * U) * _opnorm(np.abs(R.T) @ np.abs(R))
    f = (n + 4) * U * 2 * np.sqrt(n)  # Yc = y - mean(y): entries within (n + 2) u of 2 at most
    dv = _solve_err(back, f, np.linalg.norm(V, axis=0), alpha)
    data = U * np.sqrt(tr) * (np.linalg.norm(yc, axis=0) + 2 * np.sqrt(_opnorm(S)) * w_norm) / alpha
    return np.sqrt(_opnorm(S)) * dv + n * U / (1 - n * U) * np.linalg.norm(np.abs(xc).T @ np.abs(V), axis=0) + data


def _bias_err(x, weight, dw, k):
    """b = mean(y) - mean(x) W on either side: |mean(x)| ||dW_c|| + the dot product's gamma_D |m|'|W_c| + means
    within gamma_(n + 3k) max|x| (x) and (n + 3k) u (y), and the subtraction's u."""
    n, d = x.shape
    m = np.abs(x.mean(0))
    eps = (n + 3 * k) * U
    return (np.linalg.norm(m) * dw + (d + 1) * U * (m @ np.abs(weight)) + eps * float(np.abs(x).max())
            * np.abs(weight).sum(0) + eps + U * (1 + m @ np.abs(weight)))


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
    sizes = [16, 16, 5, 3]  # a short last batch
    fit = RidgeFit(classes, ridge=0.5)
    _fed(fit, xf, yf, sizes)
    sol = fit.compute()
    xc = xf - xf.mean(0)
    alpha = 0.5 * float((xc**2).sum()) / d  # the relative ridge: 0.5 x mean eigenvalue of Xc'Xc
    # the same trace, Chan-merged vs one two-pass sum (ridge_trace_bound), then x 0.5 / d: 2 u a side
    d_alpha = 0.5 / d * ridge_trace_bound(xf.numpy(), sizes) + 4 * U * alpha
    assert abs(sol["alpha"] - alpha) <= d_alpha
    ref = RidgeClassifier(alpha=alpha, solver="cholesky").fit(xf.numpy(), yf.numpy())
    # scikit-learn's closed form (LAPACK Cholesky; the dual for D = 64 > n = 40) and ours each within _ridge_err of
    # the exact solution for this alpha; ours also moves by ||dA|| ||w|| / alpha for its own alpha (|d_alpha|)
    xn, yn, w = xf.numpy(), yf.numpy(), ref.coef_.T
    dw = (_ridge_err(xn, yn, classes, alpha, sizes, w) + _ridge_err(xn, yn, classes, alpha, [n_fit], w, sklearn=True)
          + d_alpha / alpha * np.linalg.norm(w, axis=0))  # (C,) per class, 2-norm
    np.testing.assert_allclose(sol["weight"].numpy(), w, rtol=0, atol=dw.max())
    db = _bias_err(xn, w, dw, len(sizes)) + _bias_err(xn, w, 0 * dw, 1)
    assert (np.abs(sol["bias"].numpy() - ref.intercept_) <= db).all()
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
    yn = y.numpy()
    for got, want, feats in zip(merged, one.compute(), (x, x2)):
        # both RidgeFit solves of the same data, merged moments vs one batch: each within _ridge_err of the exact
        # solution, plus the alphas' own difference (ridge_trace_bound of each against a two-pass trace)
        xn, w = feats.numpy(), want["weight"].numpy()
        d_alpha = 2 * ridge_trace_bound(xn, [13, 17]) / xn.shape[1] + 4 * U * want["alpha"]  # tr / D: one division
        dw = (_ridge_err(xn, yn, 3, want["alpha"], [13, 17], w) + _ridge_err(xn, yn, 3, want["alpha"], [30], w)
              + d_alpha / want["alpha"] * np.linalg.norm(w, axis=0))
        np.testing.assert_allclose(got["weight"].numpy(), w, rtol=0, atol=dw.max())
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
    # a copy and the same mean: exact
    torch.testing.assert_close(f["cls"], z[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(f["gap"], z[:, 1:].mean(1), rtol=0, atol=0)
    assert set(probe_features(z, 0)) == {"gap"}
    m = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(probe_features(m)["gap"], m.mean((2, 3)), rtol=0, atol=0)
