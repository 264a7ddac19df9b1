"""Top Hessian eigenvalues: Lanczos with full reorthogonalization, and PyHessian's power iteration.

The solvers are plain linear algebra over a ``matvec`` on flat vectors; ``top_eigenvalues`` wraps
them around a model's Hessian (``HessianOperator``). "Top" means largest magnitude by default, as
power iteration finds them (HDVW's negative eigenvalues come from there); ``which="LA"`` asks for the
largest algebraic ones instead.
"""
from __future__ import annotations

import logging
import math
import re
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
    notes: list[str] = field(default_factory=list)  # e.g. a switch to power iteration for memory


_WARNED: set[str] = set()
_MIN_EXTRA_VECTORS = 16  # a Lanczos basis capped by memory keeps at least k + 16 vectors, else power iteration


class MemoryBudgetError(MemoryError, ValueError):
    """The eigensolver's vectors would not fit in the memory budget (a ValueError too: the CLI prints one line)."""


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2 ** 10, "m": 1e6, "mb": 1e6, "mib": 2 ** 20,
          "g": 1e9, "gb": 1e9, "gib": 2 ** 30, "t": 1e12, "tb": 1e12, "tib": 2 ** 40}


def parse_memory(value: int | float | str) -> int:
    """Bytes from ``8GB``, ``512MiB``, ``1.5g`` or a plain number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory budget {value!r} is not a size like 8GB, 512MiB or 1e9 (bytes)")
        number, unit = float(m.group(1)), m.group(2).lower()
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"memory budget {value!r} must be a positive size like 8GB")
    return int(number * _UNITS[unit])


def available_memory(device: torch.device | str) -> int:
    """Free bytes on ``device``: CUDA's ``mem_get_info``, else the host's MemAvailable (``/proc/meminfo``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def solver_memory(method: str, dim: int, k: int, max_iter: int, dtype: torch.dtype = torch.float64,
                  chunk: int = 8) -> int:
    """Bytes the eigensolver's own vectors take (the model and its graph come on top).

    Lanczos keeps ``min(max(max_iter, k), dim)`` basis vectors (allocated in blocks of ``chunk``) plus
    about 3 work vectors; power iteration keeps the ``k`` eigenvectors plus about 3 work vectors.
    """
    item = torch.empty(0, dtype=dtype).element_size()
    if method == "lanczos":
        n = min(max(max_iter, k), dim)
        n = -(-n // chunk) * chunk
    else:
        n = k
    return (n + 3) * dim * item


def work_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype the solvers keep their vectors and inner products in: float64 (float32 where the
    device has no float64, i.e. MPS).

    Inner products over millions of float32 entries lose up to ~1e-4 relative; in the Lanczos
    recurrence that moved the ResNet-18 benchmark's top Ritz value 1e-3 above the true eigenvalue.
    The Hessian-vector products themselves stay in the model's dtype.
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


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

    def append(self, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Store ``scale * v`` as the next row and return that row (a view: use it as the vector)."""
        if self.n % self.chunk == 0:
            self.blocks.append(torch.empty(self.chunk, self.dim, dtype=self.dtype, device=self.device))
        row = self.blocks[-1][self.n % self.chunk]
        torch.mul(v, scale, out=row)
        self.n += 1
        return row

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


def ritz_error_bounds(theta: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Error bounds of Ritz values ``theta`` ``(m,)`` with Ritz residual norms ``residual`` ``(m,)``.

    For each Ritz pair, an eigenvalue lies within ``rho = ||H y - theta y||`` of ``theta``, and within
    ``rho^2 / delta`` when no other eigenvalue is within ``delta`` of ``theta`` (Kato-Temple; Parlett,
    *The Symmetric Eigenvalue Problem*, sec. 11-7). ``delta`` is estimated from the other Ritz values,
    shrunk by ``rho``: the distance to the nearest one minus ``rho``; the bound is therefore an
    estimate, sharp once the spectrum next to ``theta`` is resolved. Returns ``min(rho, rho^2 / delta)``.
    """
    if len(theta) < 2:
        return residual.clone()
    dist = (theta[:, None] - theta[None, :]).abs()  # (m, m)
    dist.fill_diagonal_(float("inf"))
    delta = dist.min(dim=1).values - residual  # (m,)
    quadratic = residual.square() / delta.clamp_min(torch.finfo(delta.dtype).tiny)
    return torch.where(delta > residual, torch.minimum(residual, quadratic), residual)


def lanczos(
    matvec: MatVec, dim: int, k: int = 1, tol: float = 1e-3, max_iter: int = 100, which: str = "LM",
    generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", return_vectors: bool = False, criterion: str = "eigenvalue",
    v0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, int, list[bool]]:
    """Lanczos with full reorthogonalization for k extreme eigenvalues of a symmetric operator.

    Stopping rule (``criterion``), with ``rho = |beta_j * s_j|`` the Ritz pair's residual
    ``||H y - theta y||``:

    - ``"eigenvalue"``: the eigenvalue error bound ``min(rho, rho^2 / gap)`` (``ritz_error_bounds``) is
      at most ``tol * |theta|``: ``tol`` is the relative accuracy of the eigenvalues.
    - ``"residual"``: ``rho <= tol * |theta|``, stricter; it also bounds the eigenvector's angle
      (``sin <= rho / gap``), so use it when the eigenvectors matter.

    ``matvec`` must return a new tensor (the recurrence updates it in place). Starts from ``v0`` when
    given (any non-zero vector; a random one otherwise). Keeps up to ``max_iter`` basis vectors of
    length ``dim`` in ``dtype`` (``work_dtype``: float64 in ``top_eigenvalues``).

    Returns:
        eigenvalues ``(k,)``, eigenvectors ``(k, dim)`` or None, products used, converged flags.
    """
    if criterion not in ("eigenvalue", "residual"):
        raise ValueError(f"criterion={criterion!r} is not one of ('eigenvalue', 'residual')")
    k = min(k, dim)
    max_iter = min(max(max_iter, k), dim)
    basis = Basis(dim, dtype, device)
    v_prev: torch.Tensor | None = None
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis[j] and basis[j + 1]
    if v0 is not None and v0.shape != (dim,):
        raise ValueError(f"start vector has shape {tuple(v0.shape)}, expected ({dim},)")
    if v0 is None or not bool(torch.isfinite(v0).all()) or float(torch.linalg.vector_norm(v0)) == 0.0:
        v0 = torch.randn(dim, generator=generator, dtype=dtype, device="cpu")
    v0 = v0.to(device=device, dtype=dtype)
    v = basis.append(v0, 1.0 / float(torch.linalg.vector_norm(v0)))  # (dim,), a view into the basis
    idx, theta, s, n = None, None, None, 0
    converged = [False] * k
    scale = 0.0
    for j in range(max_iter):
        w = matvec(v).to(dtype)
        if w.untyped_storage().data_ptr() == v.untyped_storage().data_ptr():
            w = w.clone()  # the recurrence below works in place on w, never on the basis
        n += 1
        alpha = float(torch.dot(w, v))
        w.sub_(v, alpha=alpha)
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
        residual = (beta * s[-1, :]).abs()  # (j+1,)
        error = ritz_error_bounds(theta, residual) if criterion == "eigenvalue" else residual
        converged = [bool(e <= tol * abs(t)) for e, t in zip(error[idx], theta[idx])]
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
            v_prev, v = None, basis.append(w, 1.0 / norm)
            continue
        betas.append(beta)
        v_prev, v = v, basis.append(w, 1.0 / beta)
    if len(idx) < k:
        _logger.warning("Lanczos stopped after %d vectors; returning %d of %d eigenvalues", len(basis), len(idx), k)
    vectors = None
    if return_vectors:
        vectors = torch.stack([_unit(basis.combine(s[:, i])) for i in idx])  # (k, dim)
    return theta[idx].clone(), vectors, n, converged


def gradient_start(op: HessianOperator, generator: torch.Generator) -> torch.Tensor:
    """A Lanczos start vector: the unit gradient plus an independent unit Gaussian vector.

    The loss gradient lies mostly in the span of the top Hessian eigenvectors (Gur-Ari et al. 2018,
    "Gradient descent happens in a tiny subspace"), so it starts Lanczos far closer to them than a
    random vector does (whose overlap is about ``1 / sqrt(P)``); the random half keeps every
    eigenvector in the Krylov space, so no eigenvalue is out of reach. Falls back to the random vector
    when the gradient is zero or not finite.
    """
    dtype = work_dtype(op.device)
    r = _unit(torch.randn(op.dim, generator=generator, dtype=op.dtype, device="cpu").to(op.device, dtype))
    g = op.gradient().to(dtype)
    norm = float(torch.linalg.vector_norm(g))
    if not (math.isfinite(norm) and norm > 0.0):
        return r
    return g / norm + r


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
    backend: str = "auto",
    operator: HessianOperator | None = None,
    criterion: str | None = None,
    start: str = "gradient",
    memory_budget: int | float | str | None = None,
) -> EigenResult:
    """Top-k Hessian eigenvalues of ``loss_fn(model(x), y)`` over ``params`` on one batch (or a list).

    Args:
        method: ``"lanczos"`` (full reorthogonalization) or ``"power"`` (PyHessian's power iteration with
            deflation from random vectors; ``tol`` is the relative change of the Rayleigh quotient,
            ``max_iter`` per eigenvalue).
        tol: Lanczos: relative accuracy of each eigenvalue under ``criterion``.
        criterion: Lanczos stopping rule (see ``lanczos``): ``"eigenvalue"`` (error bound on the
            eigenvalue) or ``"residual"`` (Ritz residual, also bounds the eigenvectors). Default:
            ``"residual"`` when ``return_vectors`` is set, else ``"eigenvalue"``.
        start: Lanczos start vector: ``"gradient"`` (the loss gradient plus a random vector, see
            ``gradient_start``; free with the cached backend) or ``"random"``.
        which: ``"LM"`` largest magnitude (what power iteration finds), ``"LA"`` largest algebraic
            (Lanczos only).
        backend, train_mode: see ``HessianOperator`` (``"auto"``: one retained graph for one batch).
        operator: a prebuilt ``HessianOperator`` (then model, loss_fn, batch, params are not used).
        memory_budget: most bytes the solver's vectors may take (``8GB``, ``512MiB`` or a number of
            bytes; default half of the device's free memory, ``available_memory``, leaving the rest to the
            model's graph). Estimated before anything is allocated (``solver_memory``: Lanczos keeps up to
            ``max_iter`` vectors of P float64 values). Over the budget, Lanczos is capped at the vectors that
            fit (``max_iter`` lowered; unconverged values are flagged as usual) when that leaves at least
            k + 16, else it switches to power iteration (k vectors); either is a logged warning and a line in
            ``notes``. When even power iteration does not fit, a ``MemoryBudgetError`` (a ``MemoryError`` and
            ``ValueError``) names the sizes.
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if start not in ("gradient", "random"):
        raise ValueError(f"start={start!r} is not one of ('gradient', 'random')")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method={method!r} is not one of ('lanczos', 'power')")
    op = operator or HessianOperator(model, loss_fn, batch, params=params, train_mode=train_mode, backend=backend)
    if k > op.dim:
        raise ValueError(f"k={k} exceeds the number of parameters ({op.dim}): a {op.dim} x {op.dim} Hessian has "
                         f"{op.dim} eigenvalues; use k <= {op.dim}")
    budget = parse_memory(memory_budget) if memory_budget is not None else available_memory(op.device) // 2
    notes: list[str] = []
    dtype = work_dtype(op.device)
    need = solver_memory(method, op.dim, k, max_iter, dtype)
    if need > budget and method == "lanczos":
        item = torch.empty(0, dtype=dtype).element_size()
        fit = (budget // (op.dim * item) - 3) // 8 * 8  # basis vectors that fit, in whole blocks of 8
        power_need = solver_memory("power", op.dim, k, max_iter, dtype)
        note = None
        if fit >= k + _MIN_EXTRA_VECTORS:
            note = (f"Lanczos would keep up to {_size(need)} of basis vectors (max_iter={max_iter} x {op.dim} "
                    f"parameters), over the memory budget of {_size(budget)}: capped at {fit} vectors "
                    "(max_iter); raise memory_budget (--memory-budget) to allow more")
            max_iter, need = fit, solver_memory("lanczos", op.dim, k, fit, dtype)
        elif power_need <= budget and which == "LM":
            note = (f"Lanczos would keep up to {_size(need)} of basis vectors (max_iter={max_iter} x {op.dim} "
                    f"parameters) and fewer than {k + _MIN_EXTRA_VECTORS} fit in the memory budget of "
                    f"{_size(budget)}: switched to power iteration ({_size(power_need)}); raise memory_budget "
                    "(--memory-budget) to keep Lanczos")
            method, need = "power", power_need
        if note is not None:
            if note not in _WARNED:  # once per process, not once per batch of a spectrum
                _WARNED.add(note)
                _logger.warning(note)
            notes.append(note)
    if need > budget:
        raise MemoryBudgetError(f"the {method} eigensolver needs about {_size(need)} for {op.dim} parameters "
                                f"(k={k}, max_iter={max_iter}), over the memory budget of {_size(budget)}; raise "
                                "memory_budget (--memory-budget), lower k / max_iter, or restrict the parameters")
    gen = torch.Generator().manual_seed(seed)
    start_count = op.n_products
    if method == "power":
        if which != "LM":
            raise ValueError("power iteration finds largest-magnitude eigenvalues only; use which='LM'")
        vals, vecs, _, conv = power_iteration(op, op.dim, k, tol, max_iter, gen, work_dtype(op.device), op.device)
    elif method == "lanczos":
        criterion = criterion or ("residual" if return_vectors else "eigenvalue")
        v0 = gradient_start(op, gen) if start == "gradient" else None
        vals, vecs, _, conv = lanczos(op, op.dim, k, tol, max_iter, which, gen, work_dtype(op.device), op.device,
                                      return_vectors=return_vectors, criterion=criterion, v0=v0)
    if not all(conv):
        _logger.warning("%d of %d eigenvalues did not converge to tol=%g in max_iter=%d (method=%s)",
                        conv.count(False), len(conv), tol, max_iter, method)
    return EigenResult(
        eigenvalues=vals, n_hvp=op.n_products - start_count, converged=conv, method=method,
        eigenvectors=vecs.to(op.dtype) if return_vectors else None, param_names=list(op.names), notes=notes,
    )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
