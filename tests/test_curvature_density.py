"""Curvature: Hessian trace (Hutchinson, Hutch++), Lanczos quadrature and the spectral density against dense
Hessians and closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _hessian_refs import U64, density_mass_bound, gamma
from vitscope.curvature import (
    hessian_trace,
    spectral_density,
)
from vitscope.curvature.density import _rademacher, gauss_quadrature, lanczos_tridiagonal


# ------------------------------------------------------------------------------- trace
@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_three_standard_errors(vit_case, method):
    m, x, y, H = vit_case
    res = hessian_trace(m, F.cross_entropy, (x, y), n_samples=60, method=method, seed=0,
                        backend="func" if method == "hutchinson" else "cached")
    true = float(torch.trace(H))
    assert res.n_hvp <= 62
    assert 0 < res.stderr < float("inf")
    assert abs(res.trace - true) <= 3 * res.stderr, (res.trace, true, res.stderr)


def test_hutchpp_exact_when_sketch_spans_everything(mlp_case):
    m, x, y, H = mlp_case
    names = ["3.weight", "3.bias"]  # 52 parameters; 3 * 52 products: the sketch spans the space
    idx = torch.arange(108, 160)
    res = hessian_trace(m, F.cross_entropy, (x, y), n_samples=3 * 52, method="hutch++", params=names)
    H_s, s, P = H[idx][:, idx], 52, H.shape[0]
    fro, two = float(torch.linalg.matrix_norm(H_s)), float(torch.linalg.matrix_norm(H_s, 2))
    # sum_i q_i^T Op q_i over Householder QR's Q (52 x 52): each column within eps_q = gamma_(52 s) of an exact
    # orthonormal one (Higham Lemma 19.3, its constant taken as 1), which moves tr(Q^T H Q) = tr(H) by
    # s (2 eps_q + eps_q^2) ||H||_2; each product within 2 gamma_P || |H| |q| || <= 2 gamma_P ||H||_F (hvp_bound, P
    # = 160 the backward's width) and its dot within gamma_s ||H q||; Python's sum of s terms and the reference's
    # torch.trace gamma_s s ||H||_2 each.
    # The 52 remaining probes (I - QQ^T) g are rounding (||g|| = sqrt(s), within 2 sqrt(s) eps_q + gamma_s of 0):
    # each sample within 2 ||H||_2 of its square, and their mean and the final add 2 u more
    eps_q = gamma(52 * s)
    g_rest = math.sqrt(s) * (2 * math.sqrt(s) * eps_q + gamma(s))
    bound = s * ((2 * eps_q + eps_q**2) * two + 2 * gamma(P) * fro + 3 * gamma(s) * two)
    bound += 2 * two * g_rest**2 * (1 + gamma(s)) + 2 * U64 * abs(res.trace)
    assert abs(res.trace - float(torch.trace(H_s))) <= bound, (res.trace, float(torch.trace(H_s)), bound)


# ------------------------------------------------------------------------------ density
def test_lanczos_quadrature_matches_moments_exactly():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    lam = torch.linspace(-2, 5, 40, dtype=torch.float64)
    A = Q @ torch.diag(lam) @ Q.T
    v0 = torch.randn(40, generator=g, dtype=torch.float64)
    u = v0 / v0.norm()
    # the reference u^T A^p u in numpy's long double: p - 1 products and 2 dots of n = 40 terms, within
    # (p + 1) n gamma_n(e) ||A||^p (|| |A| ||_2 <= sqrt(n) ||A||_2); e = 2^-64 on x86, 2^-53 where long double is
    # double (the bound still holds there)
    n, k, norm_a = 40, 8, float(torch.linalg.matrix_norm(A, 2))
    e_ld = float(np.finfo(np.longdouble).eps) / 2
    A_ld, u_ld = A.numpy().astype(np.longdouble), u.numpy().astype(np.longdouble)

    def moment_bound(p: int) -> float:
        """Finite-precision Lanczos (Paige 1976): A V = V T + beta v e_k^T + F, each column of F within
        (n + 7) u ||A|| (the matvec's n-term sums, the recurrence's few roundings), ||F||_2 within sqrt(k) of that;
        u^T A^p u - e_1^T T^p e_1 telescopes into p terms u^T A^i F T^(p-1-i) e_1 (the beta term vanishes for
        p <= 2k - 1), each <= ||F||_2 ||A||^(p-1); as much again for the basis's loss of orthogonality. The
        quadrature: eigh's nodes within k u ||T|| (moving t^p by p k u ||A||^p), the weights' sum 3 k u, the
        powers p u, the sum k u. Then the long-double reference."""
        lanczos_part = 2 * p * math.sqrt(k) * (n + 7) * U64
        quadrature = (p * k + 3 * k + p + k) * U64
        reference = (p + 1) * n * n * e_ld / (1 - n * e_ld)
        return (lanczos_part + quadrature + reference) * norm_a ** p

    for reorth in (False, True):
        nodes, weights = gauss_quadrature(*lanczos_tridiagonal(lambda v: A @ v, v0, 8, reorth=reorth))
        # squares of the first row of eigh's eigenvector matrix of the 8 x 8 tridiagonal: orthonormal within
        # LAPACK's p(n) u (taken as n u, Demmel 5.2), the 8 squares and their sum 2 n u more
        assert weights.sum().item() == pytest.approx(1.0, rel=0, abs=3 * 8 * 2.0**-53)
        for p in range(2 * 8):  # Gauss quadrature with 8 nodes is exact up to degree 15
            ref = float(u_ld @ np.linalg.matrix_power(A_ld, p) @ u_ld)
            got = float((weights * nodes ** p).sum())
            assert abs(got - ref) <= moment_bound(p), (reorth, p, got, ref, moment_bound(p))


def test_spectral_density_against_dense_spectrum(vit_case):
    m, x, y, H = vit_case
    ev = torch.linalg.eigvalsh(H).numpy()
    res = spectral_density(m, F.cross_entropy, (x, y), n_iter=30, n_v=12, seed=0, backend="cached")
    for p in (1, 2):  # per-probe moments estimate tr(H^p)/P: check within 3 standard errors
        per_probe = np.array([np.sum(w * t ** p) for t, w in zip(res.nodes, res.weights)])
        ref = float(np.mean(ev ** p))
        se = per_probe.std(ddof=1) / math.sqrt(len(per_probe))
        assert abs(per_probe.mean() - ref) <= 3 * se, (p, per_probe.mean(), ref, se)
        assert res.moment(p) == float(per_probe.mean())  # the same numpy operations on the same arrays: exact
    # the extremes converge: Lanczos nodes reach the dense extreme eigenvalues
    # Ritz values lie inside the operator's spectrum, within eig_bound's slack of H's (the operator's and the
    # recurrence's rounding); from below, the extreme one is within Kaniel-Paige-Saad's bound (Saad, Numerical
    # Methods for Large Eigenvalue Problems, Thm 6.4) of lambda_1 after k = 30 steps: (lambda_1 - lambda_n)
    # (tan phi_0 / T_(k-1)(1 + 2 gamma))^2, gamma = (lambda_1 - lambda_2) / (lambda_2 - lambda_n), phi_0 the angle
    # of the probe (the same Rademacher draws, seed 0) to the eigenvector; the best probe counts (the max over
    # probes); without reorthogonalization Lanczos only adds copies of converged values (Paige), not delay
    slack = 3 * gamma(H.shape[0]) * float(torch.linalg.matrix_norm(H))
    ev_t, vecs = torch.linalg.eigh(H)
    gen = torch.Generator().manual_seed(0)
    probes = torch.stack([_rademacher(H.shape[0], gen, torch.float64, "cpu") for _ in range(12)])  # (n_v, P)

    def kps(lam, nxt, far, vec):  # Chebyshev T_29 at 1 + 2 gamma; tan^2 of each probe's angle to vec
        cheb = math.cosh(29 * math.acosh(1 + 2 * (lam - nxt) / (nxt - far)))
        cos2 = (probes @ vec) ** 2 / (probes**2).sum(1)  # (n_v,)
        return abs(lam - far) * float(((1 - cos2) / cos2).min()) / cheb**2

    top, bottom = float(ev_t[-1]), float(ev_t[0])
    hi, lo = max(t.max() for t in res.nodes), min(t.min() for t in res.nodes)
    assert top - kps(top, float(ev_t[-2]), bottom, vecs[:, -1]) - slack <= hi <= top + slack, (hi, top)
    assert bottom - slack <= lo <= bottom + kps(-bottom, -float(ev_t[1]), -top, vecs[:, 0]) + slack, (lo, bottom)
    centres, w = np.concatenate(res.nodes), np.concatenate(res.weights) / len(res.nodes)
    assert abs(np.trapezoid(res.density, res.grid) - 1.0) <= density_mass_bound(res.grid, centres, w, res.sigma)
    assert res.n_hvp == 12 * 30


def test_spectral_density_full_reorth_recovers_eigenvalues(mlp_case):
    m, x, y, H = mlp_case
    idx = torch.arange(108, 160)  # '3.weight', '3.bias'
    ev = torch.linalg.eigvalsh(H[idx][:, idx]).numpy()
    res = spectral_density(m, F.cross_entropy, (x, y), n_iter=200, n_v=1, reorth=True, params=["3.weight", "3.bias"])
    nodes, weights = res.nodes[0], res.weights[0]
    assert len(nodes) <= 52
    heavy = nodes[weights > 1e-8]  # every node with weight is a true eigenvalue
    # each Ritz value within its residual beta_last |s_k| of an eigenvalue of the operator: the recurrence stops at
    # beta <= 1e-10 max |alpha| (an invariant subspace: the block has rank <= 10 x 3 < 52) or after all 52 steps
    # (beta then rounding); the operator within 2 gamma_P ||H||_F of H (hvp_bound, Weyl), full reorthogonalization's
    # recurrence gamma_P ||H||_F (eig_bound), eigh of T and eigvalsh of H gamma_P ||H||_F each
    fro = float(torch.linalg.matrix_norm(H[idx][:, idx]))
    bound = 1e-10 * np.abs(ev).max() + 5 * gamma(H.shape[0]) * fro
    assert np.abs(heavy[:, None] - ev[None, :]).min(1).max() <= bound
