"""Hessian trace (Hutchinson, Hutch++) and spectral density (stochastic Lanczos quadrature).

Trace: Hutchinson (1989) with a fixed number of Rademacher probes, reported with its standard error
(PyHessian's trace stops on a relative-change rule that can end after two probes); Hutch++ (Meyer et
al. 2021) spends a third of the products on a sketch whose trace is exact.
Density: stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani et al. 2019): per
Rademacher probe, the eigen-decomposition of the Lanczos tridiagonal gives nodes (Ritz values) and
weights (squared first components); the density is their Gaussian-broadened sum. Without
reorthogonalization only the last two Lanczos vectors are kept (PyHessian keeps all of them).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from vitscope.curvature.eigen import Basis, MatVec, work_dtype
from vitscope.curvature.hvp import Batch, HessianOperator, LossFn, ParamSpec

_logger = logging.getLogger(__name__)


def _rademacher(dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    z = torch.randint(0, 2, (dim,), generator=generator, device="cpu")
    return (2 * z - 1).to(dtype=dtype, device=device)


@dataclass
class TraceResult:
    """Trace estimate with its standard error, the products used and the per-probe samples."""

    trace: float
    stderr: float
    n_hvp: int
    method: str
    samples: np.ndarray


def hutchinson_trace(matvec: MatVec, dim: int, n_samples: int, generator: torch.Generator,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TraceResult:
    """``mean_i z_i^T H z_i`` over Rademacher ``z_i``, standard error ``std / sqrt(n)``."""
    samples = np.array([float(torch.dot(z, matvec(z))) for z in
                        (_rademacher(dim, generator, dtype, device) for _ in range(n_samples))])
    se = float(samples.std(ddof=1) / math.sqrt(n_samples)) if n_samples > 1 else float("inf")
    return TraceResult(float(samples.mean()), se, n_samples, "hutchinson", samples)


def hutchpp_trace(matvec: MatVec, dim: int, n_samples: int, generator: torch.Generator,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TraceResult:
    """Hutch++: ``tr(Q^T H Q) + hutchinson((I - QQ^T) H (I - QQ^T))`` with ``n_samples // 3`` sketch vectors.

    The standard error is that of the Hutchinson part (the sketch part is exact).
    """
    m = max(n_samples // 3, 1)
    s = min(m, dim)
    sketch = torch.stack([matvec(_rademacher(dim, generator, dtype, device)) for _ in range(s)], dim=1)  # (P, s)
    Q, _ = torch.linalg.qr(sketch)  # (P, s)
    exact = sum(float(torch.dot(Q[:, i], matvec(Q[:, i].contiguous()))) for i in range(s))
    n_rest = max(n_samples - 2 * s, 2)
    samples = []
    for _ in range(n_rest):
        g = _rademacher(dim, generator, dtype, device)
        g = g - Q @ (Q.T @ g)  # (P,)
        hg = matvec(g)
        samples.append(float(torch.dot(g, hg - Q @ (Q.T @ hg))))
    arr = np.array(samples)
    se = float(arr.std(ddof=1) / math.sqrt(len(arr)))
    return TraceResult(exact + float(arr.mean()), se, 2 * s + n_rest, "hutch++", arr)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Sequence[Batch],
    n_samples: int = 100,
    method: str = "hutchinson",
    params: ParamSpec = None,
    seed: int = 0,
    train_mode: bool = False,
    backend: str = "auto",
    operator: HessianOperator | None = None,
) -> TraceResult:
    """Hessian trace by Hutchinson (``n_samples`` Rademacher probes) or Hutch++ (``n_samples`` products)."""
    if n_samples < 2:
        raise ValueError(f"n_samples={n_samples}: need at least 2 probes for a standard error")
    op = operator or HessianOperator(model, loss_fn, batch, params=params, train_mode=train_mode, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    if method == "hutchinson":
        return hutchinson_trace(op, op.dim, n_samples, gen, work_dtype(op.device), op.device)
    if method in ("hutch++", "hutchpp"):
        return hutchpp_trace(op, op.dim, n_samples, gen, op.dtype, op.device)
    raise ValueError(f"method={method!r} is not one of ('hutchinson', 'hutch++')")


def lanczos_tridiagonal(matvec: MatVec, v0: torch.Tensor, n_iter: int, reorth: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_iter`` Lanczos steps from ``v0``: the tridiagonal's ``(alphas, betas)`` (float64).

    Without ``reorth`` only the last two vectors are kept (memory ``3 * P``); with it every vector is
    kept and each new one is orthogonalized against all of them. Stops early at an invariant subspace.
    """
    v = v0 / torch.linalg.vector_norm(v0)
    v_prev = None
    basis = Basis(len(v), v.dtype, v.device) if reorth else None
    if basis is not None:
        basis.append(v)
    alphas, betas = [], []
    for j in range(n_iter):
        w = matvec(v)
        alpha = float(torch.dot(w, v))
        alphas.append(alpha)
        w = w.sub(v, alpha=alpha)  # (P,), a new tensor
        if v_prev is not None:
            w.sub_(v_prev, alpha=betas[-1])
        if basis is not None:
            w = basis.project_out(w)
        beta = float(torch.linalg.vector_norm(w))
        if j + 1 == n_iter or beta <= 1e-10 * max(abs(a) for a in alphas + [1e-30]):
            break
        betas.append(beta)
        v_prev, v = v, w / beta
        if basis is not None:
            basis.append(v)
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)


def gauss_quadrature(alphas: torch.Tensor, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes (eigenvalues of the tridiagonal) and weights (squared first eigenvector components)."""
    T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    nodes, vecs = torch.linalg.eigh(T)
    return nodes, vecs[0] ** 2


@dataclass
class DensityResult:
    """Spectral density: ``density`` on ``grid`` (integrates to ~1), and per probe the quadrature.

    ``nodes[i]`` and ``weights[i]`` are probe i's Ritz values and weights (weights sum to 1);
    ``sum_j weights[i][j] * nodes[i][j] ** m`` estimates ``tr(H^m) / P``.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    sigma: float
    n_hvp: int

    def moment(self, m: int) -> float:
        """The probes' average estimate of ``tr(H^m) / P``."""
        return float(np.mean([np.sum(w * t ** m) for t, w in zip(self.nodes, self.weights)]))


def broadened_density(nodes: Sequence[np.ndarray], weights: Sequence[np.ndarray], grid: np.ndarray,
                      sigma: float) -> np.ndarray:
    """``mean_probes sum_j w_j N(grid; node_j, sigma^2)``."""
    out = np.zeros_like(grid, dtype=np.float64)
    for t, w in zip(nodes, weights):
        z = (grid[:, None] - t[None, :]) / sigma  # (G, m)
        out += (np.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))) @ w
    return out / len(nodes)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Sequence[Batch],
    n_iter: int = 100,
    n_v: int = 1,
    reorth: bool = False,
    grid_size: int = 1000,
    sigma: float | None = None,
    params: ParamSpec = None,
    seed: int = 0,
    train_mode: bool = False,
    backend: str = "auto",
    operator: HessianOperator | None = None,
) -> DensityResult:
    """Hessian eigenvalue density by stochastic Lanczos quadrature with ``n_v`` Rademacher probes.

    Args:
        n_iter: Lanczos steps per probe (capped at the number of parameters).
        reorth: full reorthogonalization (keeps all ``n_iter`` vectors); off by default, which keeps
            memory at three vectors and may add spurious copies of converged Ritz values (their weights
            stay consistent, so moments are still right).
        sigma: Gaussian broadening; default 1% of the node range.
    """
    if n_iter < 1 or n_v < 1:
        raise ValueError(f"n_iter={n_iter} and n_v={n_v} must be at least 1")
    op = operator or HessianOperator(model, loss_fn, batch, params=params, train_mode=train_mode, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(n_v):
        a, b = lanczos_tridiagonal(op, _rademacher(op.dim, gen, work_dtype(op.device), op.device), min(n_iter, op.dim),
                                   reorth)
        t, w = gauss_quadrature(a, b)
        nodes.append(t.numpy())
        weights.append(w.numpy())
    lo = min(float(t.min()) for t in nodes)
    hi = max(float(t.max()) for t in nodes)
    span = hi - lo
    if sigma is None:
        sigma = 0.01 * span if span > 0 else max(1e-3 * abs(hi), 1e-6)
    pad = max(0.05 * span, 5 * sigma)
    grid = np.linspace(lo - pad, hi + pad, grid_size)
    return DensityResult(grid, broadened_density(nodes, weights, grid, sigma), nodes, weights, sigma,
                         op.n_products)
