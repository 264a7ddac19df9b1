"""Curvature: Hessian-vector products and top eigenvalues (Lanczos, power iteration) against dense Hessians
(``torch.autograd.functional.hessian`` over the flattened parameters + ``torch.linalg.eigvalsh``)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _hessian_refs import (
    assert_eigenvalues,
    batched_hvp_bound,
    gamma,
    hvp_bound,
    power_bound,
    top_by_magnitude,
)
from vitscope.curvature import (
    HessianOperator,
    hessian_vector_product,
    top_eigenvalues,
)


# ----------------------------------------------------------------------------------- HVP
@pytest.mark.parametrize("backend,cache", [("func", False), ("autograd", False), ("autograd", True), ("cached", False)])
def test_hvp_matches_dense_mlp_eval_mode(mlp_case, backend, cache):
    m, x, y, H = mlp_case
    op = HessianOperator(m, F.cross_entropy, (x, y), backend=backend, cache_graph=cache)
    assert op.dim == H.shape[0] == 160
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        v = torch.randn(op.dim, generator=g, dtype=torch.float64)
        assert float(torch.linalg.vector_norm(op(v) - H @ v)) <= hvp_bound(H, v)
    assert op.n_products == 2
    assert m.training and m[1].training  # mode restored


def test_hvp_param_subset_and_dict_api(mlp_case):
    m, x, y, H = mlp_case
    names = ["0.weight", "3.bias"]
    idx = torch.cat([torch.arange(0, 72), torch.arange(156, 160)])  # positions in the flat vector
    v = {"0.weight": torch.randn(12, 6, dtype=torch.float64), "3.bias": torch.randn(4, dtype=torch.float64)}
    hv = hessian_vector_product(m, F.cross_entropy, (x, y), v, params=names)
    flat_v = torch.cat([v["0.weight"].reshape(-1), v["3.bias"]])
    ref = H[idx][:, idx] @ flat_v
    # hvp_bound on the sub-block, its gamma taken at the full P = 160 (the backward's sums are no longer)
    bound = 2 * gamma(H.shape[0]) * float(torch.linalg.vector_norm(H[idx][:, idx].abs() @ flat_v.abs()))
    got = torch.cat([hv["0.weight"].reshape(-1), hv["3.bias"]])
    assert float(torch.linalg.vector_norm(got - ref)) <= bound
    # parameter objects select the same block: the same operator, the same product bit for bit
    op = HessianOperator(m, F.cross_entropy, (x, y), params=[m[0].weight, m[3].bias])
    assert torch.equal(op(flat_v), got)


def test_hvp_batches_of_unequal_size_weighted(mlp_case):
    m, x, y, H = mlp_case  # H is the Hessian of the mean loss over all 10 examples
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    v = torch.randn(160, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    bound = batched_hvp_bound(m, batches, H, v)
    for backend in ("func", "autograd"):
        op = HessianOperator(m, F.cross_entropy, batches, backend=backend)
        assert float(torch.linalg.vector_norm(op(v) - H @ v)) <= bound


def test_hvp_fused_attention_on_uses_explicit_path_and_restores(vit_case):
    m, x, y, H = vit_case
    attn = [mod for mod in m.modules() if hasattr(mod, "fused_attn")]
    assert attn
    for mod in attn:
        mod.fused_attn = True
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for backend in ("func", "autograd"):
        op = HessianOperator(m, F.cross_entropy, (x, y), backend=backend)
        assert float(torch.linalg.vector_norm(op(v) - H @ v)) <= hvp_bound(H, v)
    assert all(mod.fused_attn is True for mod in attn)


# ------------------------------------------------------------------------- eigenvalues
@pytest.mark.parametrize("case", ["mlp_case", "vit_case"])
def test_lanczos_top_k_matches_dense(case, request):
    m, x, y, H = request.getfixturevalue(case)
    ev = torch.linalg.eigvalsh(H)
    res = top_eigenvalues(m, F.cross_entropy, (x, y), k=4, method="lanczos", tol=1e-9, max_iter=H.shape[0],
                          return_vectors=True)
    ref = top_by_magnitude(ev, 4)
    assert_eigenvalues(res.eigenvalues, ref, 1e-9, H)
    assert all(res.converged) and 4 <= res.n_hvp <= H.shape[0]
    for lam, vec in zip(res.eigenvalues, res.eigenvectors):  # H v = lambda v
        # the residual rule: ||Op y - theta y|| <= tol |theta|; against the dense H add ||(Op - H) y|| and the
        # product's own rounding (hvp_bound twice) and the recurrence's (gamma_P ||H||_F, see eig_bound)
        resid = float(torch.linalg.vector_norm(H @ vec - lam * vec))
        slack = 2 * hvp_bound(H, vec) + gamma(H.shape[0]) * float(torch.linalg.matrix_norm(H))
        assert resid <= 1e-9 * abs(float(lam)) * (1 + 2e-9) + slack, (resid, lam)
    la = top_eigenvalues(m, F.cross_entropy, (x, y), k=2, which="LA", tol=1e-9, max_iter=H.shape[0])
    assert_eigenvalues(la.eigenvalues, ev.flip(0)[:2], 1e-9, H)


@pytest.mark.parametrize("case", ["mlp_case", "vit_case"])
def test_power_iteration_top_k_matches_dense(case, request):
    m, x, y, H = request.getfixturevalue(case)
    k = 3 if case == "mlp_case" else 2
    ev = torch.linalg.eigvalsh(H)
    ref = top_by_magnitude(ev, k)
    res = top_eigenvalues(m, F.cross_entropy, (x, y), k=k, method="power", tol=1e-10, max_iter=600,
                          return_vectors=True, backend="cached")
    err = (res.eigenvalues - ref).abs()
    assert (err <= power_bound(ev, k, 1e-10)).all(), (err, power_bound(ev, k, 1e-10))
    assert res.converged == [True] * k
    # each vector had one classical Gram-Schmidt pass against the earlier (already nearly orthogonal) ones and a
    # normalisation: k inner products of P float64 terms and the norm's, each within gamma_P
    gram = res.eigenvectors @ res.eigenvectors.T
    torch.testing.assert_close(gram, torch.eye(k, dtype=gram.dtype), atol=(k + 2) * gamma(H.shape[0]), rtol=0)


def _sym_with_spectrum(eigenvalues: np.ndarray, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return torch.from_numpy(q @ np.diag(eigenvalues) @ q.T)


@pytest.mark.parametrize("k,tol", [(1, 1e-3), (1, 1e-6), (3, 1e-4), (5, 1e-3)])
def test_lanczos_eigenvalue_rule_meets_its_tolerance(k, tol):
    """The eigenvalue rule stops once the eigenvalues (not the vectors) are within tol: checked against the
    exact spectrum, on spectra with both signs (largest magnitude first), never later than the residual rule."""
    from vitscope.curvature.eigen import lanczos

    rng = np.random.default_rng(k)
    spectrum = np.concatenate([[10.0, -9.0, 8.5, -8.0, 7.9], rng.uniform(-6.0, 6.0, 295)])
    A = _sym_with_spectrum(spectrum, seed=k)
    want = torch.from_numpy(spectrum[np.argsort(-np.abs(spectrum))][:k])
    found = {}
    for criterion in ("eigenvalue", "residual"):
        gen = torch.Generator().manual_seed(3)
        vals, _, n, conv = lanczos(lambda v: A @ v, 300, k, tol, 300, "LM", gen, torch.float64, criterion=criterion)
        assert all(conv)
        assert ((vals - want).abs() <= tol * want.abs()).all(), (criterion, vals, want)
        found[criterion] = n
    assert found["eigenvalue"] <= found["residual"]


class _DiagonalFloat32Operator:
    """A float32 operator with a known spectrum, shaped like ``HessianOperator`` for ``top_eigenvalues``."""

    def __init__(self, diag: torch.Tensor, gradient: torch.Tensor):
        self.diag, self._gradient = diag, gradient
        self.dim, self.dtype, self.device = len(diag), torch.float32, torch.device("cpu")
        self.n_products, self.names = 0, ["d"]
        self.first: torch.Tensor | None = None  # the first vector applied: the solver's normalised start

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.n_products += 1
        if self.first is None:
            self.first = v.clone()
        return (self.diag * v.to(torch.float32)).to(v.dtype)

    def gradient(self) -> torch.Tensor:
        return self._gradient


def test_lanczos_inner_products_do_not_lose_float32_precision():
    """With a million float32 parameters, inner products summed in float32 push the top Ritz value above
    the largest eigenvalue (6e-6 here); the solver keeps its vectors in float64 so it stays below."""
    g = torch.Generator().manual_seed(0)
    P = 1_000_000
    diag = torch.rand(P, generator=g) * 1.8 - 0.9
    diag[:6] = torch.tensor([1.0, 0.99, 0.98, 0.5, -0.95, 0.2])
    grad = torch.randn(P, generator=g) * 1e-3
    grad[:6] += 1.0  # a start concentrated on the top eigenvectors, as a loss gradient is
    op = _DiagonalFloat32Operator(diag, grad)
    res = top_eigenvalues(None, None, None, k=1, which="LA", tol=0.0, max_iter=40, operator=op)
    assert res.n_hvp == 40
    # above: the Ritz value is a Rayleigh quotient of the float32 product d * fl32(v), each entry within 2 u32 of the
    # exact d v (the conversion and the product), so within 2 u32 max|d| of one of D's (<= 1), plus the float64
    # recurrence's rounding (~1e-16 x the 40 steps, far below). Below: Lanczos's 40-dimensional Krylov space holds
    # p(D) v0 for every p of degree 39 with p(1) = 1, so 1 - theta <= (1 - d_min) sum_(j>0) c_j^2 p(d_j)^2 / c_0^2
    # (Saad, Numerical Methods for Large Eigenvalue Problems, Thm 6.4's argument; c = v0, the operator's 2 u32 at
    # first order); p: roots at 0.99, 0.98, -0.95, times Chebyshev T_36 on the rest's range scaled to 1 at 1
    u32, d = 2.0**-24, diag.double()
    c2 = op.first.double() ** 2
    rest = torch.ones(P, dtype=torch.bool)
    rest[[0, 1, 2, 4]] = False
    lo, hi = float(d[rest].min()), float(d[rest].max())
    cheb = torch.special.chebyshev_polynomial_t((2 * d - hi - lo) / (hi - lo), 36)
    p = cheb / math.cosh(36 * math.acosh((2 - hi - lo) / (hi - lo)))  # (P,), p(d_0) = 1
    for r in (1, 2, 4):
        p = p * (d - d[r]) / (1 - d[r])
    below = (1 - float(d.min())) * float((c2[1:] * p[1:] ** 2).sum() / c2[0]) + 2 * u32
    theta = float(res.eigenvalues[0])
    assert 1.0 - below <= theta <= 1.0 + 2 * u32 * float(d.abs().max()) + 1e-14, (theta, below)


def test_ritz_error_bounds_closed_form():
    """Two Ritz values: rho alone when the gap is within rho, rho^2 / (gap - rho) beyond it."""
    from vitscope.curvature.eigen import ritz_error_bounds

    theta = torch.tensor([10.0, 4.0], dtype=torch.float64)
    rho = torch.tensor([1.0, 7.0], dtype=torch.float64)
    # gap 6 - 1 = 5, 1^2 / 5: one rounding, as in 1.0 / 5.0; the rest is exact: equal bit for bit
    want = torch.tensor([1.0 / 5.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(ritz_error_bounds(theta, rho), want, rtol=0, atol=0)
    one = ritz_error_bounds(torch.tensor([3.0]), torch.tensor([0.5]))
    torch.testing.assert_close(one, torch.tensor([0.5]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["func", "autograd", "cached"])
def test_operator_gradient_matches_autograd(mlp_case, backend):
    """The flat gradient behind the gradient start, weighted over batches of unequal size like the Hessian."""
    m, x, y, _ = mlp_case
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    op = HessianOperator(m, F.cross_entropy, batches, backend=backend)
    m.eval()
    try:
        ref = torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters()))
        per_example = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]), list(m.parameters()))]) for i in range(len(y))])  # (N, P)
    finally:
        m.train()
    # both sides sum the same per-example float64 backward terms (1/N vs (n_b/N)/n_b times (p - onehot): 3 u apart)
    # over the batch in another grouping; as in hvp_bound, each within gamma_P of the sum of |terms| (the backward's
    # sums, width x batch <= 120, are shorter than P = 160), allowed twice: 2 gamma_P mean_i |g_i| per entry
    bound = 2 * gamma(op.dim) * per_example.abs().mean(0)  # (P,)
    assert ((op.gradient() - torch.cat([g.reshape(-1) for g in ref])).abs() <= bound).all()
    if backend == "cached":
        assert len(op._graphs) == 2  # built once, reused by the products
    assert m.training  # mode restored


def test_gradient_start_falls_back_to_random_for_a_zero_gradient():
    from vitscope.curvature.eigen import gradient_start

    class ZeroGradient:
        dim, dtype, device = 7, torch.float64, torch.device("cpu")

        def gradient(self):
            return torch.zeros(7, dtype=torch.float64)

    gen = torch.Generator().manual_seed(0)
    v = gradient_start(ZeroGradient(), gen)
    # v / ||v||: the norm of n = 7 float64 terms within (n/2 + 1) u, the division 1 u, the test's norm (n/2 + 1) u
    assert v.shape == (7,) and abs(float(v.norm()) - 1.0) <= gamma(7 + 3)


def test_auto_backend_caches_one_batch_and_streams_several(mlp_case):
    m, x, y, H = mlp_case
    one = HessianOperator(m, F.cross_entropy, (x, y))
    several = HessianOperator(m, F.cross_entropy, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert (one.backend, one.cache_graph) == ("autograd", True)
    assert (several.backend, several.cache_graph) == ("func", False)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bounds = (hvp_bound(H, v), batched_hvp_bound(m, [(x[:4], y[:4]), (x[4:], y[4:])], H, v))
    for op, bound in zip((one, several), bounds):
        for _ in range(2):  # the second cached product runs no forward pass
            assert float(torch.linalg.vector_norm(op(v) - H @ v)) <= bound
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(m, F.cross_entropy, (x, y), backend="fast")


@pytest.mark.parametrize("start", ["gradient", "random"])
def test_lanczos_starts_agree_with_dense(vit_case, start):
    m, x, y, H = vit_case
    ref = top_by_magnitude(torch.linalg.eigvalsh(H), 2)
    res = top_eigenvalues(m, F.cross_entropy, (x, y), k=2, tol=1e-8, max_iter=H.shape[0], start=start)
    assert_eigenvalues(res.eigenvalues, ref, 1e-8, H)
    with pytest.raises(ValueError, match="start"):
        top_eigenvalues(m, F.cross_entropy, (x, y), start="ones")


def test_default_tolerance_reports_unconverged_honestly(mlp_case):
    m, x, y, _ = mlp_case
    res = top_eigenvalues(m, F.cross_entropy, (x, y), k=3, method="power", tol=1e-12, max_iter=3)
    assert res.n_hvp == 9 and res.converged == [False, False, False]
