"""Top Hessian eigenvalues: Lanczos with full reorthogonalization, and PyHessian's power iteration.

The solvers are plain linear algebra over a ``matvec`` on flat vectors; ``top_eigenvalues`` wraps
them around a model's Hessian (``HessianOperator``). "Top" means largest magnitude by default, as
power iteration finds them (HDVW's negative eigenvalues come from there); ``which="LA"`` asks for the
largest algebraic ones instead.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitscope.curvature.hvp import Batch, HessianOperator, LossFn, ParamSpec

_logger = logging.getLogger(__name__)

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EigenResult:
    """Top eigenvalues of a Hessian.

    Attributes:
        eigenvalues: ``(k,)`` ordered by the selection rule (largest magnitude first by default).
        eigenvectors: ``(k, P)`` unit vectors over the flattened parameters (``param_names`` order),
            or None unless asked for.
        n_hvp: Hessian-vector products used.
        converged: per eigenvalue, whether it met the tolerance within ``max_iter``.
    """

    eigenvalues: torch.Tensor
    n_hvp: int
    converged: list[bool]
    method: str
    eigenvectors: torch.Tensor | None = None
    param_names: list[str] = field(default_factory=list)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(v.dtype).tiny)


def _orthogonalize(w: torch.Tensor, basis: Sequence[torch.Tensor], passes: int = 2) -> torch.Tensor:
    """Remove from ``w`` its components along the orthonormal ``basis`` (classical Gram-Schmidt)."""
    for _ in range(passes if basis else 0):
        coef = [torch.dot(b, w) for b in basis]
        for b, c in zip(basis, coef):
            w = w - c * b
    return w


class Basis:
    """Orthonormal vectors stored in row blocks ``(chunk, dim)``: projections are matrix-vector products."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str, chunk: int = 8):
        self.dim, self.dtype, self.device, self.chunk = dim, dtype, device, chunk
        self.blocks: list[torch.Tensor] = []
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def _rows(self) -> list[torch.Tensor]:
        out = [b for b in self.blocks[:-1]]
        if self.blocks:
            out.append(self.blocks[-1][: self.n - self.chunk * (len(self.blocks) - 1)])
        return out

    def append(self, v: torch.Tensor) -> None:
        if self.n % self.chunk == 0:
            self.blocks.append(torch.empty(self.chunk, self.dim, dtype=self.dtype, device=self.device))
        self.blocks[-1][self.n % self.chunk] = v
        self.n += 1

    def project_out(self, w: torch.Tensor) -> torch.Tensor:
        """``w - V^T V w`` in place, repeated once when the first pass removed much of ``w`` (Kahan's
        "twice is enough")."""
        if not self.n:
            return w
        for _ in range(2):
            before = torch.linalg.vector_norm(w)
            for rows in self._rows():
                w.addmv_(rows.T, rows @ w, alpha=-1.0)  # (dim,)
            if torch.linalg.vector_norm(w) > 0.7 * before:
                break
        return w

    def combine(self, coef: torch.Tensor) -> torch.Tensor:
        """``V^T coef`` for coefficients ``(n,)``."""
        coef = coef.to(dtype=self.dtype, device=self.device)
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        start = 0
        for rows in self._rows():
            out += rows.T @ coef[start:start + len(rows)]
            start += len(rows)
        return out


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the k wanted Ritz values in the order they are reported."""
    if which == "LM":
        key = theta.abs()
    elif which == "LA":
        key = theta
    elif which == "SA":
        key = -theta
    else:
        raise ValueError(f"which={which!r} is not one of ('LM', 'LA', 'SA')")
    return torch.argsort(key, descending=True)[:k]


def power_iteration(
    matvec: MatVec, dim: int, k: int = 1, tol: float = 1e-3, max_iter: int = 100,
    generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, int, list[bool]]:
    """Power iteration with deflation, as PyHessian does it (Yao et al. 2020).

    Each eigenvalue starts from a Gaussian vector, is kept orthogonal to the eigenvectors found so
    far, and stops when the Rayleigh quotient changes by less than ``tol`` relative
    (``|new - old| / (|old| + 1e-6)``). Unlike PyHessian, the latest Rayleigh quotient is reported.
    Converges to the eigenvalues of largest magnitude.

    Returns:
        eigenvalues ``(k,)``, eigenvectors ``(k, dim)``, products used, converged flags.
    """
    values, vectors, converged, n = [], [], [], 0
    for _ in range(k):
        v = _unit(torch.randn(dim, generator=generator, dtype=dtype, device="cpu").to(device))
        value, done = None, False
        for _ in range(max_iter):
            v = _unit(_orthogonalize(v, vectors, passes=1))
            hv = matvec(v)
            n += 1
            rq = float(torch.dot(hv, v))
            v = _unit(hv)
            if value is not None and abs(value - rq) / (abs(value) + 1e-6) < tol:
                value, done = rq, True
                break
            value = rq
        values.append(value)
        vectors.append(_unit(_orthogonalize(v, vectors, passes=1)))
        converged.append(done)
    return torch.tensor(values, dtype=torch.float64), torch.stack(vectors), n, converged


def lanczos(
    matvec: MatVec, dim: int, k: int = 1, tol: float = 1e-3, max_iter: int = 100, which: str = "LM",
    generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", return_vectors: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, int, list[bool]]:
    """Lanczos with full reorthogonalization for k extreme eigenvalues of a symmetric operator.

    A Ritz value ``theta`` has converged when its residual ``|beta_j * s_j|`` (the Ritz pair's
    ``||H y - theta y||``, which bounds the distance to an eigenvalue) is at most ``tol * |theta|``.
    Keeps up to ``max_iter`` basis vectors of length ``dim``.

    Returns:
        eigenvalues ``(k,)``, eigenvectors ``(k, dim)`` or None, products used, converged flags.
    """
    k = min(k, dim)
    max_iter = min(max(max_iter, k), dim)
    basis = Basis(dim, dtype, device)
    v_prev: torch.Tensor | None = None
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis[j] and basis[j + 1]
    v = _unit(torch.randn(dim, generator=generator, dtype=dtype, device="cpu").to(device))
    idx, theta, s, n = None, None, None, 0
    converged = [False] * k
    scale = 0.0
    for j in range(max_iter):
        basis.append(v)
        w = matvec(v)
        n += 1
        alpha = float(torch.dot(w, v))
        w = w.sub(v, alpha=alpha)  # a new tensor: the operator's output is not modified
        if v_prev is not None:
            w.sub_(v_prev, alpha=betas[-1])
        w = basis.project_out(w)
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if j > 0:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(T)  # (j+1,), (j+1, j+1)
        scale = max(scale, float(theta.abs().max()))
        idx = _select(theta, k, which)
        residual = (beta * s[-1, idx]).abs()
        converged = [bool(r <= tol * abs(t)) for r, t in zip(residual, theta[idx])]
        if len(idx) >= k and all(converged):
            break
        if j + 1 == max_iter:
            break
        if beta <= 1e-10 * max(scale, 1e-30):
            # invariant subspace found: restart with a fresh vector orthogonal to it
            w = basis.project_out(torch.randn(dim, generator=generator, dtype=dtype, device="cpu").to(device))
            norm = float(torch.linalg.vector_norm(w))
            if norm <= 1e-10:
                break
            betas.append(0.0)
            v_prev, v = None, w / norm
            continue
        betas.append(beta)
        v_prev, v = v, w / beta
    if len(idx) < k:
        _logger.warning("Lanczos stopped after %d vectors; returning %d of %d eigenvalues", len(basis), len(idx), k)
    vectors = None
    if return_vectors:
        vectors = torch.stack([_unit(basis.combine(s[:, i])) for i in idx])  # (k, dim)
    return theta[idx].clone(), vectors, n, converged


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Sequence[Batch],
    k: int = 1,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 100,
    params: ParamSpec = None,
    return_vectors: bool = False,
    seed: int = 0,
    which: str = "LM",
    train_mode: bool = False,
    backend: str = "func",
    operator: HessianOperator | None = None,
) -> EigenResult:
    """Top-k Hessian eigenvalues of ``loss_fn(model(x), y)`` over ``params`` on one batch (or a list).

    Args:
        method: ``"lanczos"`` (full reorthogonalization; converged when the Ritz residual is at most
            ``tol * |eigenvalue|``) or ``"power"`` (PyHessian's power iteration with deflation; ``tol`` is
            the relative change of the Rayleigh quotient, ``max_iter`` per eigenvalue).
        which: ``"LM"`` largest magnitude (what power iteration finds), ``"LA"`` largest algebraic
            (Lanczos only).
        backend, train_mode: see ``HessianOperator``.
        operator: a prebuilt ``HessianOperator`` (then model, loss_fn, batch, params are not used).
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    op = operator or HessianOperator(model, loss_fn, batch, params=params, train_mode=train_mode, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    start = op.n_products
    if method == "power":
        if which != "LM":
            raise ValueError("power iteration finds largest-magnitude eigenvalues only; use which='LM'")
        if k > op.dim:
            raise ValueError(f"k={k} exceeds the number of parameters ({op.dim})")
        vals, vecs, _, conv = power_iteration(op, op.dim, k, tol, max_iter, gen, op.dtype, op.device)
    elif method == "lanczos":
        vals, vecs, _, conv = lanczos(op, op.dim, k, tol, max_iter, which, gen, op.dtype, op.device,
                                      return_vectors=return_vectors)
    else:
        raise ValueError(f"method={method!r} is not one of ('lanczos', 'power')")
    if not all(conv):
        _logger.warning("%d of %d eigenvalues did not converge to tol=%g in max_iter=%d (method=%s)",
                        conv.count(False), len(conv), tol, max_iter, method)
    return EigenResult(
        eigenvalues=vals, n_hvp=op.n_products - start, converged=conv, method=method,
        eigenvectors=vecs if return_vectors else None, param_names=list(op.names),
    )
