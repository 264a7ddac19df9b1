"""Cross-model minibatch CKA of a ViT and a ResNet, end to end on the same images: vitscope.compare vs torch-cka's
``CKA(model1, model2).compare(loader1, loader2)`` and ckatorch's ``CKA(first_model, second_model)``.

Both models are random-init timm models (no download): ``vit_tiny_patch16_224`` at 64 px (12 blocks, 17 x 192
features) and ``resnet18`` at 48 px (8 blocks); the ViT sees the images at 64 px and the ResNet the same images
resized to 48 px, through two loaders over one tensor set (torch-cka's ``dataloader2``). Every method runs the
two forwards itself, so each time includes them; the forwards alone (no hook) are timed too and subtracted to
give the time each method spends on CKA. Agreement: every matrix against a float64 numpy computation of the
METHODS.md formula on the block outputs, taken with plain forward hooks.

    python benchmarks/bench_compare.py              # 1,000 images, batches of 100, 3 repeats (~1 min quiet)
    python benchmarks/bench_compare.py --quick      # 300 images

It prints each method's agreement with the reference, the median times, the ratios torch-cka / vitscope (end to
end and on the CKA part) for the default float64 Grams and the opt-in float32 ones, and the Amdahl bound: both
tools run the same forwards, so the end-to-end ratio cannot exceed torch-cka's time over the forwards' time.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vitscope

CNN = "resnet18"  # --cnn


def build(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64).eval()
    cnn = timm.create_model(CNN).eval()
    return vit, cnn


def block_names(vit: torch.nn.Module, cnn: torch.nn.Module) -> tuple[list[str], list[str]]:
    return ([f"blocks.{i}" for i in range(len(vit.blocks))],
            [f"layer{s}.{b}" for s in range(1, 5) for b in range(len(getattr(cnn, f"layer{s}")))])


def loaders(n: int, batch: int, seed: int) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(n, 3, 64, 64, generator=g)
    x48 = F.interpolate(x64, size=48, mode="bilinear", align_corners=False)
    y = torch.zeros(n, dtype=torch.long)
    return (DataLoader(TensorDataset(x64, y), batch_size=batch),
            DataLoader(TensorDataset(x48, y), batch_size=batch))


def features(model: torch.nn.Module, names: list[str], loader: DataLoader) -> list[list[np.ndarray]]:
    """Per batch, per layer: (n, D) float64 block outputs by plain forward hooks."""
    out: list[list[np.ndarray]] = []
    cur: list[np.ndarray] = []
    hs = [model.get_submodule(n).register_forward_hook(lambda _m, _i, o: cur.append(o.double().flatten(1).numpy()))
          for n in names]
    with torch.no_grad():
        for x, _ in loader:
            cur = []
            model(x)
            out.append(cur)
    for h in hs:
        h.remove()
    return out


def reference(fa: list[list[np.ndarray]], fb: list[list[np.ndarray]], gram_dtype: type = np.float64) -> np.ndarray:
    """METHODS.md: per batch unbiased HSIC_1 (term by term), summed, then normalized, on features centred in
    float64 (HSIC_1 ignores a common offset; term by term on uncentred Grams it would cancel digits).
    ``gram_dtype=np.float32`` forms the Grams of the uncentred features in float32 (as torch-cka does), the rest
    in float64: what float32 Grams of uncentred features alone cost."""
    if gram_dtype == np.float64:
        fa = [[f - f.mean(0) for f in b] for b in fa]
        fb = [[f - f.mean(0) for f in b] for b in fb]
    def hsic(K: np.ndarray, L: np.ndarray) -> float:
        n = K.shape[0]
        t = (K * L).sum() + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (K.sum(0) @ L.sum(1))
        return t / (n * (n - 3))

    La, Lb = len(fa[0]), len(fb[0])
    xy, xx, yy = np.zeros((La, Lb)), np.zeros(La), np.zeros(Lb)
    for ba, bb in zip(fa, fb):
        Ks = [(f.astype(gram_dtype) @ f.astype(gram_dtype).T).astype(np.float64) for f in ba]
        Ls = [(f.astype(gram_dtype) @ f.astype(gram_dtype).T).astype(np.float64) for f in bb]
        for K in Ks + Ls:
            np.fill_diagonal(K, 0.0)
        for i in range(La):
            xx[i] += hsic(Ks[i], Ks[i])
            for j in range(Lb):
                xy[i, j] += hsic(Ks[i], Ls[j])
        for j in range(Lb):
            yy[j] += hsic(Ls[j], Ls[j])
    return xy / np.sqrt(np.outer(xx, yy))


def run_forwards(vit, cnn, la, lb) -> None:
    with torch.no_grad():
        for (xa, _), (xb, _) in zip(la, lb):
            vit(xa)
            cnn(xb)


def run_vitscope(vit, cnn, la, lb) -> torch.Tensor:
    return vitscope.compare(vit, cnn, (la, lb), progress=False).cka


def run_vitscope32(vit, cnn, la, lb) -> torch.Tensor:
    """The opt-in float32 Grams (centred features, float64 HSIC; error bound in docs/compare.md)."""
    return vitscope.compare(vit, cnn, (la, lb), progress=False, gram_dtype="float32").cka


def run_torch_cka(vit, cnn, la, lb) -> torch.Tensor:
    from torch_cka import CKA

    na, nb = block_names(vit, cnn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = CKA(vit, cnn, "vit", "resnet", model1_layers=na, model2_layers=nb)
        with torch.no_grad():
            cka.compare(la, lb)
    return cka.export()["CKA"]


def run_ckatorch(vit, cnn, la, lb) -> torch.Tensor:
    """ckatorch's two-model class: one loader for both models (no second loader), so the ResNet gets 64 px here
    (its hooks then fail on the ResNet's 4-D outputs: cka_batch takes (batches, n, features))."""
    from ckatorch import CKA

    na, nb = block_names(vit, cnn)
    images = DataLoader(TensorDataset(la.dataset.tensors[0]), batch_size=la.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = CKA(vit, cnn, na, nb, first_name="vit", second_name="resnet")
        return cka(images, epochs=1)


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="300 examples")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each method, interleaved; medians reported")
    p.add_argument("--skip", nargs="*", default=[], help="methods to skip: torch-cka ckatorch")
    p.add_argument("--cnn", default="resnet18", help="timm ResNet for model B, e.g. resnet50 (16 blocks)")
    args = p.parse_args()
    global CNN
    CNN = args.cnn
    n = 300 if args.quick else args.examples
    if n % args.batch_size:
        p.error("--examples must be a multiple of --batch-size (torch-cka weights every batch equally)")
    la, lb = loaders(n, args.batch_size, seed=0)
    vit, cnn = build(seed=0)
    na, nb = block_names(vit, cnn)
    print(f"vit_tiny_patch16_224 @64 px ({len(na)} blocks) vs {CNN} @48 px ({len(nb)} blocks), {n} images in "
          f"batches of {args.batch_size}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved repeats (medians)")
    t0 = time.perf_counter()
    fa, fb = features(vit, na, la), features(cnn, nb, lb)
    ref = reference(fa, fb)
    print(f"numpy float64 reference in {time.perf_counter() - t0:.1f} s")
    ref32 = reference(fa, fb, np.float32)
    print(f"the same with float32 Grams of the uncentred features: max |CKA - ref| = {np.abs(ref32 - ref).max():.1e}")
    del fa, fb

    methods = {"forwards only": run_forwards, "vitscope": run_vitscope, "vitscope float32": run_vitscope32,
               "torch-cka": run_torch_cka}
    methods = {k: v for k, v in methods.items() if k not in args.skip}
    times: dict[str, list[tuple[float, float]]] = {}
    for rep in range(args.repeats):
        for name, fn in (methods.items() if rep % 2 == 0 else reversed(methods.items())):  # alternate the order
            a, b = build(seed=0)  # fresh models: the peers leave their hooks installed
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(a, b, la, lb)
            times.setdefault(name, []).append((time.perf_counter() - t0, time.process_time() - c0))
            if rep == 0 and out is not None:
                err = float(np.abs(out.double().numpy() - ref).max())
                print(f"{name:16s} max |CKA - ref| = {err:.1e}")
    if "ckatorch" not in args.skip:
        try:
            run_ckatorch(*build(seed=0), la, lb)
            print("ckatorch         ran (not timed: see benchmarks/README.md)")
        except Exception as err:  # noqa: BLE001 - a peer that cannot do it is a result
            print(f"ckatorch         failed: {type(err).__name__}: {str(err).splitlines()[0][:150]}")
    med = {k: (_median([w for w, _ in v]), _median([c for _, c in v])) for k, v in times.items()}
    for name, (w, c) in med.items():
        print(f"{name:16s} wall {w:7.2f} s  cpu {c:7.2f} s")
    if "forwards only" not in med or "torch-cka" not in med:
        return
    fw, fc = med["forwards only"]
    tw, tc = med["torch-cka"]
    for name in ("vitscope", "vitscope float32"):
        if name not in med:
            continue
        vw, vc = med[name]

        def part(t: float, v: float, f: float) -> str:  # a part <= 0 is timing noise (a loaded machine)
            return f"{(t - f) / (v - f):.1f}x" if v > f and t > f else "n/a (noise: a part <= 0)"

        print(f"torch-cka / {name}: end to end wall {tw / vw:.2f}x, cpu {tc / vc:.2f}x; CKA part (forwards "
              f"subtracted) wall {part(tw, vw, fw)}, cpu {part(tc, vc, fc)}")
    # Amdahl: both tools run the same two forwards, so however fast vitscope's CKA part, the end-to-end ratio is
    # at most (forwards + torch-cka's CKA part) / forwards = torch-cka / forwards.
    print(f"Amdahl bound on the end-to-end ratio (torch-cka / forwards only): wall {tw / fw:.2f}x, cpu {tc / fc:.2f}x; "
          f"10x end to end would need torch-cka's CKA part to be >= 9x the forwards (it is {(tw - fw) / fw:.2f}x)")
    print(f"10x on the CKA part needs vitscope's CKA part <= {(tw - fw) / 10:.2f} s wall / {(tc - fc) / 10:.2f} s cpu")


if __name__ == "__main__":
    main()
