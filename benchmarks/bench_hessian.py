"""Top Hessian eigenvalues: vitscope (Lanczos, full reorthogonalization) vs PyHessian (power iteration
with deflation), side by side in one process on the same model, batch and tolerance.

For each model: a tight reference (vitscope Lanczos, tol 1e-5 on the Ritz residual), then top-1 and
top-5 by PyHessian at tol 1e-3 and by vitscope at tol 1e-3 and 1e-2 with both HVP backends ("func":
torch.func forward-over-reverse, recomputed each product; "cached": double backward through one
retained gradient graph, PyHessian's own way).
Prints wall time, Hessian-vector products, worst relative error against the reference, and the
speed ratios. Run: ``python benchmarks/bench_hessian.py [--models vit_tiny_patch4_32,resnet18_cifar] [--batch-size 8]``.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import vitscope
from vitscope.capture import explicit_attention
from vitscope.curvature import HessianOperator, top_eigenvalues


def run_pyhessian(model, x, y, k: int, tol: float, seed: int) -> tuple[torch.Tensor, float, int]:
    """PyHessian's ``hessian(...).eigenvalues`` with its products counted; patched for this run only."""
    import sys

    import pyhessian  # noqa: F401  (its package attribute `hessian` is the class, so use sys.modules)

    ph = sys.modules["pyhessian.hessian"]

    count = {"n": 0}
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):
        count["n"] += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counted
    torch.manual_seed(seed)  # PyHessian draws its start vectors from the global generator
    try:
        with explicit_attention(model):  # SDPA has no double backward
            t0 = time.perf_counter()
            h = ph.hessian(model, F.cross_entropy, data=(x, y), cuda=False)  # includes its backward pass
            values, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=k)
            elapsed = time.perf_counter() - t0
    finally:
        ph.hessian_vector_product = original
        for p in model.parameters():  # PyHessian leaves graph-carrying .grad behind
            p.grad = None
    return torch.tensor(values, dtype=torch.float64), elapsed, count["n"]


def run_vitscope(model, x, y, k: int, tol: float, seed: int, backend: str) -> tuple[torch.Tensor, float, int]:
    t0 = time.perf_counter()
    op = HessianOperator(model, F.cross_entropy, (x, y), backend=backend)
    res = top_eigenvalues(model, F.cross_entropy, (x, y), k=k, tol=tol, seed=seed, operator=op)
    return res.eigenvalues, time.perf_counter() - t0, res.n_hvp


def rel_err(values: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst relative error after sorting both sets by value (near-equal |lambda| of opposite sign may
    come in either order); a missed eigenvalue shows up as a large error."""
    ref = torch.sort(ref[: len(values)]).values
    return float(((torch.sort(values).values - ref).abs() / ref.abs()).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vit_tiny_patch4_32,resnet18_cifar")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--loose-tol", type=float, default=1e-2,
                    help="a second Lanczos tolerance (its residual rule is much stricter than power iteration's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, tol {args.tol}, "
          "CPU float32; times include building the operator (PyHessian: its first backward)")
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        try:
            model = vitscope.create_model(name, num_classes=10).eval()
        except TypeError:  # a model function that fixes num_classes itself: keep its head
            model = vitscope.create_model(name).eval()
        n_params = sum(p.numel() for p in model.parameters())
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args.batch_size,), generator=g)
        ref = top_eigenvalues(model, F.cross_entropy, (x, y), k=5, tol=1e-5, max_iter=200, backend="cached").eigenvalues
        print(f"\n{name} ({n_params / 1e6:.2f}M params); reference top-5 (|lambda| order): "
              + ", ".join(f"{v:.5g}" for v in ref.tolist()))
        print(f"{'k':>2} {'method':<30} {'time s':>8} {'HVPs':>5} {'max rel err':>12} {'speed-up':>9}  values")
        for k in (1, 5):
            rows = [("PyHessian power+deflation", *run_pyhessian(model, x, y, k, args.tol, args.seed))]
            for tol in (args.tol, args.loose_tol):
                for backend in ("func", "cached"):
                    rows.append((f"vitscope lanczos {backend} {tol:g}",
                                 *run_vitscope(model, x, y, k, tol, args.seed, backend)))
            base = rows[0][2]
            for label, vals, t, n in rows:
                print(f"{k:>2} {label:<30} {t:8.2f} {n:5d} {rel_err(vals, ref):12.2e} {base / t:8.2f}x  "
                      + ", ".join(f"{v:.5g}" for v in vals.tolist()), flush=True)


if __name__ == "__main__":
    main()
