"""Curvature: HVP, top eigenvalues, trace, spectral density and HDVW's spectrum against dense Hessians
(``torch.autograd.functional.hessian`` over the flattened parameters + ``torch.linalg.eigvalsh``)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import vitscope
from vitscope.capture import explicit_attention
from vitscope.curvature import (
    HessianOperator,
    block_groups,
    eigenvalue_spectrum,
    hessian_trace,
    hessian_vector_product,
    spectral_density,
    top_eigenvalues,
)
from vitscope.curvature.density import _rademacher, gauss_quadrature, lanczos_tridiagonal
from vitscope.curvature.spectrum import scott_bandwidth


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared machine
    yield
    torch.set_num_threads(n)


def _mlp() -> nn.Module:
    """160 parameters, with BatchNorm carrying non-trivial running statistics."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.GELU(), nn.Linear(12, 4)).double()
    m[1].running_mean.uniform_(-0.5, 0.5)
    m[1].running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.2, 0.2)
    return m.train()  # left in train mode on purpose: the Hessian must use eval mode


def _vit() -> nn.Module:
    torch.manual_seed(1)
    m = vitscope.create_model("test_vit_cifar", embed_dim=8, num_heads=2, depth=1, mlp_ratio=1, img_size=8,
                              patch_size=4, num_classes=3).double()
    return m.eval()


def _data(kind: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str] | None = None,
                  loss=None, extra=None) -> torch.Tensor:
    """Reference: full Hessian of the mean cross entropy in eval mode, explicit attention."""
    loss = loss or F.cross_entropy
    named = dict(model.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])

    def f(v):
        ps = {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes)}
        out = loss(functional_call(model, ps, (x,)), y)
        return out + (extra(ps) if extra else 0.0)

    was = model.training
    model.eval()
    try:
        with explicit_attention(model):
            return torch.autograd.functional.hessian(f, flat, vectorize=True)
    finally:
        model.train(was)


def top_by_magnitude(ev: torch.Tensor, k: int) -> torch.Tensor:
    return ev[ev.abs().argsort(descending=True)][:k]


# ------------------------------------------------------------------ derived float64 bounds
U64 = 2.0 ** -53  # unit round-off of float64


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): a float64 sum of n terms is within gamma_n of the sum of |terms|."""
    return n * U64 / (1 - n * U64)


def hvp_bound(H: torch.Tensor, v: torch.Tensor) -> float:
    """Bound on ||op(v) - H v||_2. The reference product H v rounds within gamma_P |H| |v| (float64 sums of P
    terms); the HVP sums the same second-derivative terms in another order (its backward's sums are shorter than
    P here: batch x tokens x width <= 240), allowed as much again: 2 gamma_P || |H| |v| ||_2."""
    return 2 * gamma(H.shape[0]) * float(torch.linalg.vector_norm(H.abs() @ v.abs()))


def batched_hvp_bound(m: nn.Module, batches: list, H: torch.Tensor, v: torch.Tensor) -> float:
    """hvp_bound for an operator over several batches: each batch's product within gamma_P || |H_b| |v| || of
    H_b v (H_b the dense Hessian of that batch's mean loss), the weights n_b / N, their products and the sum
    3 u || |H_b| |v| || more each (weighted), and the reference H v within gamma_P || |H| |v| ||."""
    n = sum(len(b[1]) for b in batches)
    side = 0.0
    for xb, yb in batches:
        Hb = dense_hessian(m, xb, yb)
        side += len(yb) / n * (gamma(Hb.shape[0]) + 3 * U64) * float(torch.linalg.vector_norm(Hb.abs() @ v.abs()))
    return side + gamma(H.shape[0]) * float(torch.linalg.vector_norm(H.abs() @ v.abs()))


def eig_bound(ref: torch.Tensor, tol: float, H: torch.Tensor) -> torch.Tensor:
    """Bound on |theta - lambda| for converged Lanczos Ritz values theta of the float64 HVP against the dense
    eigenvalues lambda. The solver's rule puts an eigenvalue of its operator within tol |theta| (residual rule:
    rho = ||Op y - theta y|| <= tol |theta|, Parlett, The Symmetric Eigenvalue Problem, Thm 4.5.1; eigenvalue
    rule: min(rho, rho^2 / gap) <= tol |theta|, Kato-Temple); the operator differs from the dense H by at most
    ||Op - H||_2 <= 2 gamma_P ||H||_F (hvp_bound, since || |H| |v| || <= ||H||_F ||v||), which moves no eigenvalue
    further (Weyl); full reorthogonalization keeps the float64 recurrence within O(m u ||H||), m <= P basis
    vectors (Paige): one more gamma_P ||H||_F. tol |theta| <= tol (|lambda| + the bound): a factor 1 + 2 tol."""
    slack = 3 * gamma(H.shape[0]) * float(torch.linalg.matrix_norm(H))
    return (1 + 2 * tol) * (tol * ref.abs() + slack)


def assert_eigenvalues(got, ref: torch.Tensor, tol: float, H: torch.Tensor) -> None:
    got = torch.as_tensor(got, dtype=torch.float64)
    err, bound = (got - ref).abs(), eig_bound(ref, tol, H)
    assert (err <= bound).all(), (got, ref, err, bound)


def power_bound(ev: torch.Tensor, k: int, tol: float) -> torch.Tensor:
    """Bound on the error of power iteration's first k values (largest magnitude first, deflation), from the
    dense spectrum ev. Its rule stops when successive Rayleigh quotients differ by delta < tol (|old| + 1e-6).
    Without deflation error, the quotient's error sums terms of one sign (|lambda_j| <= |lambda_i| for those not
    deflated) each shrinking by q_j <= q = (lambda_{i+1} / lambda_i)^2 per step, so the error left is at most
    q / (1 - q) delta. The same one-signed sum bounds the vector's angle: sin^2 phi_i <= e_i / (|lambda_i| -
    |lambda_{i+1}|). Deflating by a vector phi_j off its eigenvector moves the others' values by about
    |lambda_i| sin^2 phi_j at first order and as much at second (through the deflated direction): 4 |lambda_i|
    sin^2 phi_j allowed. Float64 round-off (~P u ||H||) is far below every term."""
    mags = ev.abs().sort(descending=True).values
    bounds, sin2 = [], []
    for i in range(k):
        lam, nxt = float(mags[i]), float(mags[i + 1])
        q = (nxt / lam) ** 2
        e = q / (1 - q) * tol * (lam * 1.01 + 1e-6) + 4 * lam * sum(sin2)
        bounds.append(e)
        sin2.append(e / (lam - nxt))
    return torch.tensor(bounds, dtype=torch.float64)


def density_mass_bound(grid: np.ndarray, centres: np.ndarray, weights: np.ndarray, sigma: float) -> float:
    """Bound on |trapezoid(density, grid) - 1| for density = sum_j w_j N(.; c_j, sigma^2), sum_j w_j = 1 (within
    the float64 rounding of the weights' sum, 3 n u): on the infinite grid of step h the trapezoid sum of a
    Gaussian is its integral within 2 sum_k exp(-2 pi^2 k^2 sigma^2 / h^2) (Poisson summation); the finite grid
    leaves out each Gaussian's mass beyond its ends, and counts at most h / 2 of the end values more."""
    h = float(grid[1] - grid[0])
    a, b = float(grid[0]), float(grid[-1])
    c, w = np.asarray(centres, dtype=np.float64).ravel(), np.asarray(weights, dtype=np.float64).ravel()
    r2, sqrt_2pi = sigma * math.sqrt(2), math.sqrt(2 * math.pi)
    tail = np.array([0.5 * math.erfc((ci - a) / r2) + 0.5 * math.erfc((b - ci) / r2) for ci in c])  # mass beyond
    ends = (np.exp(-0.5 * ((a - c) / sigma) ** 2) + np.exp(-0.5 * ((b - c) / sigma) ** 2)) / (sigma * sqrt_2pi)
    aliasing = 2 * sum(math.exp(-2 * math.pi**2 * j**2 * sigma**2 / h**2) for j in range(1, 100))
    # float64: the weights' sum 3 n u, each density value a few u (exp, products, sum of n), the trapezoid's G terms
    return float(w @ (tail + h / 2 * ends)) + aliasing + (3 * len(c) + len(c) + 8 + len(grid)) * U64


@pytest.fixture(scope="module")
def mlp_case():
    m = _mlp()
    x, y = _data("mlp", 10)
    return m, x, y, dense_hessian(m, x, y)


@pytest.fixture(scope="module")
def vit_case():
    m = _vit()
    x, y = _data("vit", 6)
    return m, x, y, dense_hessian(m, x, y)


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


# -------------------------------------------------------------------------- spectrum
def _loader(x, y, bs):
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False)


def test_eigenvalue_spectrum_per_batch_and_l2_terms(mlp_case):
    m, _, _, _ = mlp_case
    x, y = _data("mlp", 10, seed=7)
    loader = _loader(x, y, 4)  # batches of 4, 4, 2
    wd = 0.05
    r_sq = eigenvalue_spectrum(m, loader, k=2, weight_decay=wd, l2_style="half_sq", tol=1e-9, max_iter=160)
    r_hd = eigenvalue_spectrum(m, loader, k=2, weight_decay=wd, l2_style="hdvw", tol=1e-9, max_iter=160,
                               backend="cached")
    assert r_sq.batch_sizes == [4, 4, 2]
    for b, (xb, yb) in enumerate(loader):
        H_sq = dense_hessian(m, xb, yb) + wd * torch.eye(160, dtype=torch.float64)  # wd/2 ||p||^2 adds wd * I
        assert_eigenvalues(r_sq.eigenvalues["all"][b], top_by_magnitude(torch.linalg.eigvalsh(H_sq), 2), 1e-9, H_sq)
        H_hd = dense_hessian(m, xb, yb, extra=lambda ps: wd * sum(torch.linalg.vector_norm(p) for p in ps.values()))
        assert_eigenvalues(r_hd.eigenvalues["all"][b], top_by_magnitude(torch.linalg.eigvalsh(H_hd), 2), 1e-9, H_hd)
    vals = r_sq.eigenvalues["all"]
    assert vals.shape == (3, 2)
    assert r_sq.negative_fraction["all"] == float((vals < 0).mean())  # the same count / number: exact
    bw = scott_bandwidth(vals)  # the kernel density's bandwidth: each eigenvalue weighs 1 / n
    mass = np.trapezoid(r_sq.density["all"], r_sq.grid["all"])
    assert abs(mass - 1.0) <= density_mass_bound(r_sq.grid["all"], vals, np.full(vals.size, 1 / vals.size), bw)
    assert m.training  # mode restored


def test_eigenvalue_spectrum_stops_loading_at_max_batches(mlp_case):
    m, _, _, _ = mlp_case
    x, y = _data("mlp", 12, seed=3)
    drawn = []

    def loader():  # a stream that records every batch taken from it
        for b in range(6):
            drawn.append(b)
            yield x[2 * b:2 * b + 2], y[2 * b:2 * b + 2]

    res = eigenvalue_spectrum(m, loader(), k=1, max_batches=2, tol=1e-6, max_iter=60)
    assert res.batch_sizes == [2, 2] and drawn == [0, 1]


@pytest.mark.parametrize("style", ["half_sq", "hdvw"])
def test_l2_term_hessian_closed_form(mlp_case, style):
    """The Hessian of NLL + L2 term, as the spectrum's operator applies it, column by column, equals the plain
    NLL Hessian (dense reference) plus the term's Hessian in closed form: wd * I for wd/2 * sum ||p||^2, and
    wd * (I / ||p|| - p p^T / ||p||^3) per tensor for HDVW's unsquared wd * sum ||p||."""
    from vitscope.curvature import l2_penalty

    m, x, y, H = mlp_case
    wd = 0.05
    op = HessianOperator(m, F.cross_entropy, (x, y), extra=lambda ps: l2_penalty(ps.values(), wd, style))
    eye = torch.eye(op.dim, dtype=torch.float64)
    H_op = torch.stack([op.matvec(eye[i]) for i in range(op.dim)], 1)  # (P, P): column i = H e_i
    if style == "half_sq":
        closed = wd * eye
    else:
        blocks = []
        for p in m.parameters():
            v = p.detach().reshape(-1).double()
            n = v.norm()
            blocks.append(wd * (torch.eye(len(v), dtype=torch.float64) / n - torch.outer(v, v) / n**3))
        closed = torch.block_diag(*blocks)
    H_total = H + closed
    # column i is the HVP of e_i: within 2 gamma_P || |H_total| e_i || (hvp_bound: the L2 term's Hessian product
    # sums no more terms than the NLL's)
    col_err = torch.linalg.vector_norm(H_op - H_total, dim=0)  # (P,)
    assert (col_err <= 2 * gamma(op.dim) * torch.linalg.vector_norm(H_total.abs(), dim=0)).all()
    if style == "half_sq":  # every eigenvalue shifted by wd exactly
        # Weyl: the spectra of eigvalsh's symmetric reading of H_op (its lower triangle: within sqrt(2) of the
        # Frobenius column bound above) and H + wd I differ by at most that; each eigvalsh is backward stable
        # (gamma_P ||.||_F each) and adding wd rounds once more
        frob = float(torch.linalg.matrix_norm(H_total))
        atol = (2 * math.sqrt(2) + 2) * gamma(op.dim) * frob + 2.0**-53 * (frob + wd)
        torch.testing.assert_close(torch.linalg.eigvalsh(H_op), torch.linalg.eigvalsh(H) + wd, rtol=0, atol=atol)


def test_run_hessian_records_the_l2_term(mlp_case):
    """The study's analysis states the L2 term it used, and its eigenvalues are those of NLL Hessian + wd * I."""
    from vitscope.studies.pipeline import run_hessian

    m, _, _, _ = mlp_case
    x, y = _data("mlp", 8, seed=11)
    wd = 0.05
    out = run_hessian(m, _loader(x, y, 4), k=2, max_batches=2, max_iter=160, progress=False, weight_decay=wd,
                      tol=1e-9)
    assert out["loss"]["weight_decay"] == wd and out["loss"]["l2_style"] == "half_sq"
    assert out["loss"]["l2_term"] == "weight_decay / 2 * sum ||p||^2: Hessian + weight_decay * I"
    assert out["n_converged"] == out["n_eigenvalues"] == 4
    for b in range(2):
        xb, yb = x[4 * b: 4 * b + 4], y[4 * b: 4 * b + 4]
        H = dense_hessian(m, xb, yb) + wd * torch.eye(160, dtype=torch.float64)
        assert_eigenvalues(out["eigenvalues"][b], top_by_magnitude(torch.linalg.eigvalsh(H), 2), 1e-9, H)


def test_eigenvalue_spectrum_soft_target_transform(mlp_case):
    m, _, _, _ = mlp_case
    x, y = _data("mlp", 6, seed=9)

    def mix(xb, yb):  # deterministic mixup: soft targets
        t = F.one_hot(yb, 4).double()
        return 0.7 * xb + 0.3 * xb.flip(0), 0.7 * t + 0.3 * t.flip(0)

    res = eigenvalue_spectrum(m, _loader(x, y, 6), k=2, transform=mix, tol=1e-9, max_iter=160)
    xm, tm = mix(x, y)
    H = dense_hessian(m, xm, tm, loss=lambda o, t: torch.sum(-t * F.log_softmax(o, -1), -1).mean())
    assert_eigenvalues(res.eigenvalues["all"][0], top_by_magnitude(torch.linalg.eigvalsh(H), 2), 1e-9, H)


def test_eigenvalue_spectrum_with_timm_mixup_runs():
    from timm.data import Mixup

    m = vitscope.create_model("test_vit_cifar", num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    res = eigenvalue_spectrum(m, _loader(x, y, 4), k=1, transform=Mixup(mixup_alpha=1.0, num_classes=10),
                              max_iter=10)
    assert res.eigenvalues["all"].shape == (2, 1) and np.isfinite(res.eigenvalues["all"]).all()
    assert res.config["transform"] == "Mixup"


def test_block_groups_match_dense_sub_blocks(vit_case):
    m, x, y, H = vit_case
    groups = block_groups(m)
    assert {"attention", "mlp", "norm"} <= set(groups)
    assert "blocks.0.attn.qkv.weight" in groups["attention"] and "blocks.0.norm1.weight" in groups["norm"]
    assert "blocks.0.mlp.fc1.weight" in groups["mlp"] and "patch_embed.proj.weight" in groups["conv"]
    res = eigenvalue_spectrum(m, _loader(x, y, 6), k=2, groups="block", tol=1e-9, max_iter=400, backend="cached")
    names = [n for n, _ in m.named_parameters()]
    offsets = np.cumsum([0] + [p.numel() for p in m.parameters()])
    for g in ("attention", "mlp"):
        idx = torch.cat([torch.arange(offsets[names.index(n)], offsets[names.index(n) + 1]) for n in groups[g]])
        H_g = H[idx][:, idx]
        assert_eigenvalues(res.eigenvalues[g][0], top_by_magnitude(torch.linalg.eigvalsh(H_g), 2), 1e-9, H_g)


# ---------------------------------------------------------------------------- errors
def test_no_trainable_parameters_is_a_clear_error():
    m = _mlp().requires_grad_(False)
    x, y = _data("mlp", 4)
    with pytest.raises(ValueError, match="no trainable parameters"):
        top_eigenvalues(m, F.cross_entropy, (x, y))


def test_non_finite_loss_names_the_batch(mlp_case):
    m = mlp_case[0]
    x, y = _data("mlp", 12)
    x[9, 0] = float("nan")  # in the third batch of 4
    for backend in ("func", "autograd"):
        with pytest.raises(ValueError, match="non-finite loss .* on batch 2"):
            eigenvalue_spectrum(m, _loader(x, y, 4), k=1, max_iter=5, backend=backend)


def test_empty_loader_is_a_clear_error(mlp_case):
    m = mlp_case[0]
    empty = _loader(torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="no batches"):
        eigenvalue_spectrum(m, empty, k=1)
    with pytest.raises(ValueError, match="must yield \\(images, labels\\) pairs"):  # the loss needs labels
        eigenvalue_spectrum(m, [torch.zeros(4, 6, dtype=torch.float64)], k=1)
    with pytest.raises(ValueError, match="max_batches must be a positive integer or None, got 0"):
        eigenvalue_spectrum(m, _loader(torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.long), 4),
                            k=1, max_batches=0)
    with pytest.raises(ValueError, match="empty"):
        top_eigenvalues(m, F.cross_entropy, [])


class _Cube(torch.autograd.Function):
    """x^3 with a differentiable backward but no forward-mode rule: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


class _CubeNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.fc1, self.fc2 = nn.Linear(5, 6).double(), nn.Linear(6, 3).double()

    def forward(self, x):
        return self.fc2(_Cube.apply(self.fc1(x)))


def test_func_backend_falls_back_to_double_backward():
    m = _CubeNet()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    H = dense_hessian(m, x, y)
    op = HessianOperator(m, F.cross_entropy, (x, y), backend="func")
    v = torch.randn(op.dim, dtype=torch.float64)
    assert float(torch.linalg.vector_norm(op(v) - H @ v)) <= hvp_bound(H, v)  # backward sums: 7 x 6 < P = 57
    assert op.backend == "autograd"


# ------------------------------------------------------------------------------ memory budget
def test_memory_budget_switches_lanczos_to_power_iteration(mlp_case, caplog):
    from vitscope.curvature.eigen import solver_memory

    m, x, y, H = mlp_case  # 160 parameters, float64 work vectors
    lanczos_need = solver_memory("lanczos", 160, 2, 100)
    power_need = solver_memory("power", 160, 2, 100)
    assert lanczos_need == (104 + 3) * 160 * 8 and power_need == (2 + 3) * 160 * 8  # blocks of 8 basis rows
    with caplog.at_level("WARNING"):
        res = top_eigenvalues(m, F.cross_entropy, (x, y), k=2, tol=1e-10, max_iter=600, memory_budget=power_need)
    assert res.method == "power" and len(res.notes) == 1 and "switched to power iteration" in res.notes[0]
    assert "fewer than 18 fit" in res.notes[0]  # k + 16 vectors: below that, Lanczos is not worth capping
    assert "fit in the memory budget" in caplog.text
    ev = torch.linalg.eigvalsh(H)
    assert ((res.eigenvalues - top_by_magnitude(ev, 2)).abs() <= power_bound(ev, 2, 1e-10)).all()
    kept = top_eigenvalues(m, F.cross_entropy, (x, y), k=2, max_iter=100, memory_budget=lanczos_need)
    assert kept.method == "lanczos" and kept.notes == []
    capped = top_eigenvalues(m, F.cross_entropy, (x, y), k=2, tol=1e-9, max_iter=100,
                             memory_budget=solver_memory("lanczos", 160, 2, 40))  # room for 40 basis vectors
    assert capped.method == "lanczos" and "capped at 40 vectors" in capped.notes[0] and capped.n_hvp <= 40
    assert all(capped.converged)
    assert_eigenvalues(capped.eigenvalues, top_by_magnitude(ev, 2), 1e-9, H)
    with pytest.raises(MemoryError, match="over the memory budget of 6.2 KiB"):
        top_eigenvalues(m, F.cross_entropy, (x, y), k=2, memory_budget=power_need - 1)
    loader = _loader(x, y, 5)
    spec = eigenvalue_spectrum(m, loader, k=1, max_iter=50, memory_budget="5KiB")  # power needs (1+3)*160*8 = 5 KiB
    assert "switched to power iteration" in spec.config["notes"][0]
    assert spec.config["method"] == "lanczos"  # what was asked; the note says what ran


def test_parse_memory():
    from vitscope.curvature.eigen import parse_memory

    assert parse_memory("8GB") == 8 * 10 ** 9 and parse_memory("512MiB") == 512 * 2 ** 20
    assert parse_memory("1.5g") == 1_500_000_000 and parse_memory(4096) == 4096 and parse_memory("1e6") == 10 ** 6
    for bad in ("lots", "-1GB", "0", "8 GBs"):
        with pytest.raises(ValueError, match="memory budget"):
            parse_memory(bad)


def test_k_above_parameter_count_is_refused(mlp_case):
    m, x, y, _ = mlp_case
    with pytest.raises(ValueError, match="k=161 exceeds the number of parameters \\(160\\)"):
        top_eigenvalues(m, F.cross_entropy, (x, y), k=161)
    with pytest.raises(ValueError, match="k=161 exceeds the 160 parameters of group 'all'"):
        eigenvalue_spectrum(m, _loader(x, y, 5), k=161)  # before any batch is drawn


def test_hessian_cli_memory_budget(tmp_path, capsys):
    """``vitscope hessian --memory-budget``: a budget that fits power iteration only switches (noted in
    hessian.json); one that fits nothing is a one-line error (exit 2) and writes nothing; a bad size too."""
    import json

    from vitscope.cli import main
    from vitscope.curvature.eigen import solver_memory

    torch.manual_seed(0)
    dim = sum(p.numel() for p in vitscope.create_model("test_vit_cifar", num_classes=10).parameters())
    common = ["hessian", "--model", "test_vit_cifar", "--data", "fake", "--k", "1", "--batches", "1",
              "--batch-size", "4", "--max-iter", "20", "--no-progress"]
    power = solver_memory("power", dim, 1, 20)
    assert main(common + ["--memory-budget", str(power), "--out", str(tmp_path / "ok")]) == 0
    data = json.loads((tmp_path / "ok" / "hessian.json").read_text())
    assert "switched to power iteration" in data["config"]["notes"][0]
    capsys.readouterr()
    assert main(common + ["--memory-budget", str(power - 1), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "over the memory budget" in err[0] and not (tmp_path / "no").exists()
    with pytest.raises(SystemExit):
        main(common + ["--memory-budget", "lots", "--out", str(tmp_path / "bad")])
    assert "is not a size like 8GB" in capsys.readouterr().err
