"""Top Hessian eigenvalues: vitscope (Lanczos, full reorthogonalization) vs PyHessian (power iteration
with deflation), side by side in one process on the same model, batch and tolerance.

For each model: a tight reference (vitscope Lanczos, Ritz residual tol 1e-5, random start), then top-1
and top-5 by PyHessian at tol 1e-3 and by vitscope at the same tol: its defaults (``backend="auto"``,
i.e. double backward through one retained gradient graph as PyHessian does; gradient start; stopping on
the eigenvalue error bound), and variants that switch one choice back (random start; Ritz-residual
rule; torch.func forward-over-reverse products). Each configuration runs ``--repeats`` times with seeds
seed, seed+1, ... (start vectors differ), interleaved; the table shows median time and products and the
worst relative error over the repeats. Run:
``python benchmarks/bench_hessian.py [--models vit_tiny_patch4_32,resnet18_cifar] [--batch-size 4] [--repeats 3]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import vitscope
from vitscope.capture import explicit_attention
from vitscope.curvature import HessianOperator, top_eigenvalues

VITSCOPE_RUNS = {  # label -> top_eigenvalues options (tol and k come from the command line)
    "vitscope default": {},
    "vitscope random start": {"start": "random"},
    "vitscope residual rule": {"criterion": "residual"},
    "vitscope func backend": {"backend": "func"},
    "vitscope random+residual": {"start": "random", "criterion": "residual"},
}


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


def run_vitscope(model, x, y, k: int, tol: float, seed: int, **options) -> tuple[torch.Tensor, float, int]:
    t0 = time.perf_counter()
    op = HessianOperator(model, F.cross_entropy, (x, y), backend=options.pop("backend", "auto"))
    res = top_eigenvalues(model, F.cross_entropy, (x, y), k=k, tol=tol, seed=seed, operator=op, **options)
    return res.eigenvalues, time.perf_counter() - t0, res.n_hvp


def rel_err(values: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst relative error after sorting both sets by value (near-equal |lambda| of opposite sign may
    come in either order); a missed eigenvalue shows up as a large error."""
    ref = torch.sort(ref[: len(values)]).values
    return float(((torch.sort(values).values - ref).abs() / ref.abs()).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vit_tiny_patch4_32,resnet18_cifar")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--ks", default="1,5", help="comma list of k")
    ap.add_argument("--repeats", type=int, default=3, help="seeds per configuration for k=1 (k>1: one run)")
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
        ref = top_eigenvalues(model, F.cross_entropy, (x, y), k=5, tol=1e-5, max_iter=200, criterion="residual",
                              start="random").eigenvalues
        print(f"\n{name} ({n_params / 1e6:.2f}M params); reference top-5 (|lambda| order): "
              + ", ".join(f"{v:.5g}" for v in ref.tolist()))
        print(f"{'k':>2} {'method':<28} {'median s':>9} {'HVPs':>5} {'max rel err':>12} {'speed-up':>9}  "
              f"values (first seed)  [load {os.getloadavg()[0]:.1f}]")
        for k in (int(v) for v in args.ks.split(",")):
            results: dict[str, list] = {"PyHessian power+deflation": [], **{label: [] for label in VITSCOPE_RUNS}}
            for r in range(args.repeats if k == 1 else 1):  # interleaved: every configuration per seed
                results["PyHessian power+deflation"].append(run_pyhessian(model, x, y, k, args.tol, args.seed + r))
                for label, opts in VITSCOPE_RUNS.items():
                    results[label].append(run_vitscope(model, x, y, k, args.tol, args.seed + r, **dict(opts)))
            base = statistics.median(t for _, t, _ in results["PyHessian power+deflation"])
            for label, rs in results.items():
                t = statistics.median(t for _, t, _ in rs)
                n = statistics.median(n for _, _, n in rs)
                err = max(rel_err(v, ref) for v, _, _ in rs)
                print(f"{k:>2} {label:<28} {t:9.2f} {n:5.0f} {err:12.2e} {base / t:8.2f}x  "
                      + ", ".join(f"{v:.5g}" for v in rs[0][0].tolist()), flush=True)


if __name__ == "__main__":
    main()
