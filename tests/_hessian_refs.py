"""Shared by the curvature tests: tiny models and data, dense Hessians and the error bounds the tests derive
(HVPs, eigenvalues, power iteration, the spectral density)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import vitscope
from vitscope.capture import explicit_attention


def tiny_mlp() -> nn.Module:
    """160 parameters, with BatchNorm carrying non-trivial running statistics."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.GELU(), nn.Linear(12, 4)).double()
    m[1].running_mean.uniform_(-0.5, 0.5)
    m[1].running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.2, 0.2)
    return m.train()  # left in train mode on purpose: the Hessian must use eval mode


def tiny_vit() -> nn.Module:
    torch.manual_seed(1)
    m = vitscope.create_model("test_vit_cifar", embed_dim=8, num_heads=2, depth=1, mlp_ratio=1, img_size=8,
                              patch_size=4, num_classes=3).double()
    return m.eval()


def tiny_data(kind: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
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


def make_mlp_case():
    """The small MLP, 10 examples and its dense Hessian."""
    m = tiny_mlp()
    x, y = tiny_data("mlp", 10)
    return m, x, y, dense_hessian(m, x, y)


def make_vit_case():
    """The tiny ViT, 6 examples and its dense Hessian."""
    m = tiny_vit()
    x, y = tiny_data("vit", 6)
    return m, x, y, dense_hessian(m, x, y)
