"""Layer-by-layer minibatch CKA of a 12-block ViT: vitscope vs torch-cka vs ckatorch.

Features of every block output are computed once (random-init ViT, random images, fixed seed) and fed to
every method; each method is timed and its peak resident-memory increase measured (RSS sampled every
millisecond above the level after ``malloc_trim``); every matrix is compared with a float64 numpy
reference of the formula in METHODS.md (per-batch unbiased HSIC_1 summed over batches).

    python benchmarks/bench_cka.py            # vit_tiny_patch16_224 at 64 px (17 x 192 features), 2,000
                                              # examples, batches of 100
    python benchmarks/bench_cka.py --model vit_tiny_patch4_32 --img-size 0   # CIFAR ViT (65 x 192 features)
    python benchmarks/bench_cka.py --quick    # 500 examples: a fast sanity run

Peers: torch-cka's ``CKA.compare`` over a DataLoader; ckatorch's ``CKA`` class over a DataLoader (its
documented use) and ckatorch's functional ``cka_batch`` on the stacked equal-size batches (its fastest
correct use). The peers run hooks on modules, so the precomputed features are replayed through Identity
modules; replay costs one indexing copy per layer and batch.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import vitscope
from vitscope.measures import MinibatchCKA


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS increase (bytes) over the block, sampled every millisecond."""

    def __enter__(self) -> PeakRSS:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = _rss()
        self._stop = False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.delta = self.peak - self.base


def compute_features(model_name: str, img_size: int | None, n: int, batch: int, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    kwargs = {"img_size": img_size} if img_size else {}  # 0 / None: the model's own size
    model = vitscope.create_model(model_name, **kwargs).eval()
    size = model.patch_embed.img_size
    feats: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: feats[k].append(o.flatten(1).clone()))
             for k, blk in enumerate(model.blocks)]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, n, batch):
            model(torch.randn(min(batch, n - start), 3, *size, generator=g))
    for h in hooks:
        h.remove()
    return [torch.cat(f) for f in feats]  # L x (n, N*D) float32


def reference(feats: list[torch.Tensor], batch: int) -> np.ndarray:
    """The formula, term by term, in float64 numpy (the Grams via torch float64 matmul, which is faster)."""
    L, n = len(feats), feats[0].shape[0]
    xy = np.zeros((L, L))
    for start in range(0, n, batch):
        Ks = []
        for f in feats:
            x = f[start:start + batch].double()
            K = (x @ x.T).numpy()
            np.fill_diagonal(K, 0.0)
            Ks.append(K)
        m = Ks[0].shape[0]
        if m <= 3:
            continue
        for i in range(L):
            for j in range(L):
                K, Lm = Ks[i], Ks[j]
                term = (K * Lm).sum() + K.sum() * Lm.sum() / ((m - 1) * (m - 2))
                term -= 2.0 / (m - 2) * (K.sum(0) @ Lm.sum(1))
                xy[i, j] += term / (m * (m - 3))
    d = np.sqrt(np.diag(xy))
    return xy / np.outer(d, d)


def run_vitscope(feats: list[torch.Tensor], batch: int) -> torch.Tensor:
    m = MinibatchCKA(len(feats))
    n = feats[0].shape[0]
    for start in range(0, n, batch):
        m.update([f[start:start + batch] for f in feats])
    return m.compute()


class Replay(nn.Module):
    """Replays precomputed features through Identity modules so hook-based peers can see them."""

    def __init__(self, feats: list[torch.Tensor], unsqueeze: bool = False):
        super().__init__()
        self.feats, self.unsqueeze = feats, unsqueeze
        self.layers = nn.ModuleList(nn.Identity() for _ in feats)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        for f, m in zip(self.feats, self.layers):
            out = f[idx]
            m(out.unsqueeze(0) if self.unsqueeze else out)  # ckatorch wants (num_batches, n, features)
        return idx


def run_torch_cka(feats: list[torch.Tensor], batch: int) -> torch.Tensor:
    from torch_cka import CKA

    loader = DataLoader(TensorDataset(torch.arange(feats[0].shape[0])), batch_size=batch)
    names = [f"layers.{i}" for i in range(len(feats))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = CKA(Replay(feats), Replay(feats), "x", "y", model1_layers=names, model2_layers=names)
        cka.compare(loader, loader)
    return cka.export()["CKA"]


def run_ckatorch_class(feats: list[torch.Tensor], batch: int) -> torch.Tensor:
    from ckatorch import CKA

    loader = DataLoader(TensorDataset(torch.arange(feats[0].shape[0])), batch_size=batch)
    names = [f"layers.{i}" for i in range(len(feats))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = CKA(Replay(feats, True), Replay(feats, True), names, first_name="x", second_name="y")
        return cka(loader, epochs=1)


def run_ckatorch_functional(feats: list[torch.Tensor], batch: int) -> torch.Tensor:
    from ckatorch.core import cka_batch

    n = feats[0].shape[0]
    stacked = [f.view(n // batch, batch, -1) for f in feats]  # (num_batches, batch, features)
    L = len(feats)
    out = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            out[i, j] = cka_batch(stacked[i], stacked[j])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=64, help="0 keeps the model's own size")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="500 examples")
    p.add_argument("--skip", nargs="*", default=[], help="methods to skip: torch-cka ckatorch-class ckatorch-fn")
    args = p.parse_args()
    n = 500 if args.quick else args.examples
    if n % args.batch_size:
        p.error("--examples must be a multiple of --batch-size (ckatorch's functional form needs equal batches)")

    t0 = time.perf_counter()
    feats = compute_features(args.model, args.img_size, n, args.batch_size, seed=0)
    print(f"{args.model}: {len(feats)} block outputs of {feats[0].shape[1]} features, {n} examples, "
          f"batches of {args.batch_size}; features in {time.perf_counter() - t0:.1f} s; torch threads "
          f"{torch.get_num_threads()}")
    t0 = time.perf_counter()
    ref = reference(feats, args.batch_size)
    print(f"numpy reference in {time.perf_counter() - t0:.1f} s")

    methods = {"vitscope": run_vitscope, "torch-cka": run_torch_cka, "ckatorch-class": run_ckatorch_class,
               "ckatorch-fn": run_ckatorch_functional}
    results, outputs = {}, {}
    for name, fn in methods.items():
        if name in args.skip:
            continue
        with PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(feats, args.batch_size)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        err = float(np.abs(out.double().numpy() - ref).max())
        results[name], outputs[name] = (seconds, cpu, mem.delta / 2**20, err), out
        print(f"{name:15s} wall {seconds:8.2f} s  cpu {cpu:8.2f} s  peak +{mem.delta / 2**20:8.1f} MiB  "
              f"max |CKA - ref| = {err:.2e}")

    if "ckatorch-class" in outputs:  # its __call__ assigns (not adds) each batch's CKA: only the last survives
        last = run_vitscope([f[n - args.batch_size:] for f in feats], args.batch_size)
        gap = float((outputs["ckatorch-class"].double() - last).abs().max())
        print(f"ckatorch-class vs the CKA of the last batch alone: max diff {gap:.1e}")
    ours_t, ours_c, ours_m, ours_err = results["vitscope"]
    print(f"vitscope agrees with the reference to {ours_err:.1e} ({'OK' if ours_err < 1e-6 else 'FAIL'} at 1e-6)")
    for name, (t, c, mem_mib, _) in results.items():
        if name != "vitscope":
            print(f"speed-up over {name}: wall {t / ours_t:.1f}x, cpu {c / ours_c:.1f}x; peak memory "
                  f"{name}/vitscope: {mem_mib / max(ours_m, 1e-9):.1f}x")


if __name__ == "__main__":
    main()
