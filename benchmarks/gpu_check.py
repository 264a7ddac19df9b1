"""One prepared GPU check: vitscope next to its peers, side by side in one process, within about 8 minutes.

1. probe / plain forward on ViT-B/16 (timm ``vit_base_patch16_224``, random weights) at batch 128: the cost
   of every forward measure over a plain ``model.eval()`` forward on the same batches (goal <= 1.5x);
2. Hessian top-1 eigenvalue on ViT-S/16 (``vit_small_patch16_224``): vitscope (Lanczos, defaults) vs
   PyHessian (power iteration), same batch and tolerance 1e-3: time, Hessian-vector products, eigenvalues;
3. training throughput: vitscope's ``train_one_epoch`` vs a plain timm loop (AdamW, cross entropy), both in
   bf16 autocast with channels-last inputs, on ViT-S/16 at batch 128 (goal: within 5%).

Each pair runs interleaved (the order alternates every repeat) and the median of the paired ratios is
printed with the geometric mean and its 95% t interval over the repeats; the training goal is called met only
when the whole interval is at or under 1.05x, not met when it is wholly above, else inconclusive; everything is
written to ``--out`` (JSON). ``--tiny`` runs the same code on a CPU with tiny models in seconds (what the test
suite checks); ``--cpu-training`` sizes the training check for a CPU (ViT-Ti/16 at 112 px, batch 32: a real
model, minutes on 2 cores). GPU figures go into benchmarks/README.md ("GPU check").

    python benchmarks/gpu_check.py --out gpu_check.json            # on a GPU (default device: cuda)
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/gpu_check.json
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import vitscope
from vitscope.curvature import HessianOperator, top_eigenvalues
from vitscope.io.atomic import atomic_write_json
from vitscope.training import train_one_epoch

FULL = {"probe_model": "vit_base_patch16_224", "probe_img": 224, "probe_batch": 128, "probe_batches": 4,
        "hessian_model": "vit_small_patch16_224", "hessian_img": 224, "hessian_batch": 32,
        "train_model": "vit_small_patch16_224", "train_img": 224, "train_batch": 128, "train_steps": 30,
        "train_repeats": 16, "repeats": 3, "classes": 1000}
CPU_TRAINING = {"train_model": "vit_tiny_patch16_224", "train_kwargs": {"img_size": 112}, "train_img": 112,
                "train_batch": 32, "train_steps": 4, "train_repeats": 16, "classes": 10}
TINY = {"probe_model": "test_vit_cb", "probe_img": 32, "probe_batch": 8, "probe_batches": 2,
        "hessian_model": "test_vit_cb", "hessian_img": 32, "hessian_batch": 4,
        "train_model": "test_vit_cb", "train_img": 32, "train_batch": 8, "train_steps": 2,
        "train_repeats": 3, "repeats": 2, "classes": 10}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _paired(a: Callable[[], Any], b: Callable[[], Any], repeats: int, device: torch.device) -> dict[str, Any]:
    """Times of ``a`` and ``b`` interleaved (order alternating), after one untimed warm-up of each."""
    a(), b()
    ta, tb = [], []
    for r in range(repeats):
        if r % 2 == 0:
            ta.append(_timed(a, device))
            tb.append(_timed(b, device))
        else:
            tb.append(_timed(b, device))
            ta.append(_timed(a, device))
    ratios = [y / x for x, y in zip(ta, tb)]
    return {"a_s": ta, "b_s": tb, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), **_ratio_interval(ratios)}


def _ratio_interval(ratios: list[float], level: float = 0.95) -> dict[str, Any]:
    """Geometric mean of paired time ratios with its t interval (on the log ratios, one per repeat)."""
    from scipy import stats

    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = statistics.fmean(logs)
    if n < 2:
        return {"ratio_geomean": math.exp(mean), "ratio_ci95": [math.nan, math.nan]}
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(logs) / math.sqrt(n)
    return {"ratio_geomean": math.exp(mean), "ratio_ci95": [math.exp(mean - half), math.exp(mean + half)]}


def _goal_verdict(ci: list[float], goal: float) -> str:
    """'met' when the whole 95% interval of the time ratio is at or under ``goal``, 'not met' when it is wholly
    above, else 'inconclusive' (more repeats needed)."""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    return "met" if hi <= goal else "not met" if lo > goal else "inconclusive"


def _model(name: str, classes: int, device: torch.device, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return vitscope.create_model(name, num_classes=classes, **kwargs).to(device)


def _batches(n: int, batch: int, img: int, classes: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, img, img, generator=g).to(device),
             torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(n)]


def check_probe(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    model = _model(s["probe_model"], s["classes"], device).eval()
    batches = _batches(s["probe_batches"], s["probe_batch"], s["probe_img"], s["classes"], device)

    def plain() -> None:
        with torch.no_grad():
            for x, _ in batches:
                model(x)

    def probed() -> None:
        vitscope.probe(model, batches, progress=False)

    def explicit() -> None:  # the floor of the attention measures: maps materialised (no fused SDPA)
        with torch.no_grad(), vitscope.explicit_attention(model):
            for x, _ in batches:
                model(x)

    res = _paired(plain, probed, s["repeats"], device)
    floor = _paired(plain, explicit, s["repeats"], device)
    out = {"model": s["probe_model"], "batch": s["probe_batch"], "batches": s["probe_batches"],
           "plain_s": statistics.median(res["a_s"]), "probe_s": statistics.median(res["b_s"]),
           "probe_over_plain": res["ratio_median"], "ratio_range": [res["ratio_min"], res["ratio_max"]],
           "explicit_attention_s": statistics.median(floor["b_s"]),
           "explicit_attention_over_plain": floor["ratio_median"], "goal": "<= 1.5x",
           # after the timings: host waits of one pass each (the probe reads its checks once, at the end)
           "host_syncs": {"plain": _host_syncs(plain, device), "probe": _host_syncs(probed, device)}}
    print(f"probe / plain forward on {out['model']} at batch {out['batch']}: {out['probe_over_plain']:.2f}x "
          f"(plain {out['plain_s']:.3f} s, probe {out['probe_s']:.3f} s; goal <= 1.5x); the forward with "
          f"explicit attention alone (the floor) {out['explicit_attention_over_plain']:.2f}x; host syncs "
          f"{out['host_syncs']}", flush=True)
    return out


def _pyhessian_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tol: float, seed: int
                    ) -> tuple[float, float, int]:
    """PyHessian's ``hessian(...).eigenvalues(top_n=1)`` with its products counted (patched for this call)."""
    import pyhessian  # noqa: F401  (the package attribute `hessian` is the class: use sys.modules)

    ph = sys.modules["pyhessian.hessian"]
    count = {"n": 0}
    original = ph.hessian_vector_product

    def counted(grads, params, v):  # noqa: ANN001, ANN202
        count["n"] += 1
        return original(grads, params, v)

    ph.hessian_vector_product = counted
    torch.manual_seed(seed)  # PyHessian draws its start vector from the global generator
    try:
        with vitscope.explicit_attention(model):  # SDPA has no double backward
            t0 = time.perf_counter()
            h = ph.hessian(model, F.cross_entropy, data=(x, y), cuda=x.is_cuda)  # includes its backward pass
            values, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=1)
            _sync(x.device)
            elapsed = time.perf_counter() - t0
    finally:
        ph.hessian_vector_product = original
        for p in model.parameters():  # PyHessian leaves graph-carrying .grad behind
            p.grad = None
    return float(values[0]), elapsed, count["n"]


def check_hessian(s: dict[str, Any], device: torch.device, tol: float = 1e-3) -> dict[str, Any]:
    model = _model(s["hessian_model"], s["classes"], device).eval()
    (x, y), = _batches(1, s["hessian_batch"], s["hessian_img"], s["classes"], device)
    n_params = sum(p.numel() for p in model.parameters())
    runs: dict[str, list[tuple[float, float, int]]] = {"vitscope": [], "pyhessian": []}

    def ours(seed: int) -> tuple[float, float, int]:
        _sync(device)
        t0 = time.perf_counter()
        op = HessianOperator(model, F.cross_entropy, (x, y))
        res = top_eigenvalues(model, F.cross_entropy, (x, y), k=1, tol=tol, seed=seed, operator=op)
        _sync(device)
        return float(res.eigenvalues[0]), time.perf_counter() - t0, res.n_hvp

    try:
        import pyhessian  # noqa: F401
    except ImportError:
        have_pyhessian = False
    else:
        have_pyhessian = True
    ours(0)  # warm-up (kernels, allocator)
    for r in range(s["repeats"]):
        runs["vitscope"].append(ours(r))
        if have_pyhessian:
            runs["pyhessian"].append(_pyhessian_top1(model, x, y, tol, r))
    out: dict[str, Any] = {"model": s["hessian_model"], "params": n_params, "batch": s["hessian_batch"], "tol": tol}
    for name, rs in runs.items():
        if rs:
            out[name] = {"median_s": statistics.median(t for _, t, _ in rs),
                         "hvps": statistics.median(n for _, _, n in rs), "eigenvalues": [v for v, _, _ in rs]}
    if have_pyhessian:
        out["speedup_vs_pyhessian"] = out["pyhessian"]["median_s"] / out["vitscope"]["median_s"]
        ref = out["pyhessian"]["eigenvalues"][0]
        out["eigenvalue_rel_diff"] = abs(out["vitscope"]["eigenvalues"][0] - ref) / abs(ref)
        print(f"Hessian top-1 on {out['model']} ({n_params / 1e6:.1f}M params, batch {out['batch']}): vitscope "
              f"{out['vitscope']['median_s']:.2f} s / {out['vitscope']['hvps']:.0f} HVPs, PyHessian "
              f"{out['pyhessian']['median_s']:.2f} s / {out['pyhessian']['hvps']:.0f} HVPs: "
              f"{out['speedup_vs_pyhessian']:.2f}x faster; eigenvalues differ by {out['eigenvalue_rel_diff']:.1e} "
              "relative", flush=True)
    else:
        out["pyhessian"] = "not installed (pip install pyhessian)"
        print(f"Hessian top-1 on {out['model']}: vitscope {out['vitscope']['median_s']:.2f} s; PyHessian not "
              "installed", flush=True)
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def _host_syncs(fn: Callable[[], Any], device: torch.device) -> int | str | None:
    """How many times ``fn`` makes the host wait for the GPU (``torch.cuda.set_sync_debug_mode``); None on a CPU."""
    if device.type != "cuda":
        return None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    except Exception as e:  # a diagnostic only: never lose the timings for it
        return f"not counted ({type(e).__name__}: {e})"
    return sum("synchroniz" in str(w.message) for w in caught)


def check_training(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """vitscope's train_one_epoch vs the plain timm-style loop, doing the same work: the same initial weights,
    AdamW, batches, bf16 autocast and channels-last inputs, and both report the epoch's mean loss (the plain
    loop sums it on the device and reads it once at the end). Both models are trained in lockstep (the same
    calls in the same order), so their final losses agree: the figure that shows both sides did the same
    training. On a GPU the host syncs of one epoch of each side are counted after the timings."""
    batches = _batches(s["train_steps"], s["train_batch"], s["train_img"], s["classes"], device)
    models = {}
    for who in ("timm", "vitscope"):
        m = _model(s["train_model"], s["classes"], device, **s.get("train_kwargs", {}))
        m = m.to(memory_format=torch.channels_last).train()
        models[who] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
    crit = nn.CrossEntropyLoss()
    losses: dict[str, float] = {}

    def bf16() -> torch.autocast:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def plain() -> None:
        model, opt = models["timm"]
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for x, y in batches:
            x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with bf16():
                loss = crit(model(x), y)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        losses["timm"] = loss_sum.item() / len(batches)  # equal batches: the mean over images

    def ours() -> None:
        model, opt = models["vitscope"]
        losses["vitscope"] = train_one_epoch(model, batches, opt, crit, 0, device=device, amp_dtype=torch.bfloat16,
                                             channels_last=True)["loss"]

    res = _paired(plain, ours, s["train_repeats"], device)
    images = s["train_batch"] * s["train_steps"]
    out = {"model": s["train_model"], "batch": s["train_batch"], "steps": s["train_steps"],
           "repeats": s["train_repeats"], "amp": "bf16", "channels_last": True,
           "timm_images_per_s": images / statistics.median(res["a_s"]),
           "vitscope_images_per_s": images / statistics.median(res["b_s"]),
           "vitscope_time_over_timm": res["ratio_median"], "ratio_range": [res["ratio_min"], res["ratio_max"]],
           "ratio_geomean": res["ratio_geomean"], "ratio_ci95": res["ratio_ci95"],
           "goal": "within 5% (<= 1.05x)", "goal_verdict": _goal_verdict(res["ratio_ci95"], 1.05),
           "last_epoch_loss": dict(losses),
           "loss_rel_diff": abs(losses["vitscope"] - losses["timm"]) / max(abs(losses["timm"]), 1e-12)}
    out["host_syncs_per_epoch"] = {"timm": _host_syncs(plain, device), "vitscope": _host_syncs(ours, device)}
    print(f"training on {out['model']} (bf16, channels-last, batch {out['batch']}, {out['steps']} steps): vitscope "
          f"{out['vitscope_images_per_s']:.1f} img/s, plain timm loop {out['timm_images_per_s']:.1f} img/s; time "
          f"ratio {out['vitscope_time_over_timm']:.3f}x median, geometric mean {out['ratio_geomean']:.3f}x, 95% CI "
          f"{out['ratio_ci95'][0]:.3f}-{out['ratio_ci95'][1]:.3f} over {out['repeats']} paired repeats (goal <= 1.05x: "
          f"{out['goal_verdict']}); last epoch loss {losses['vitscope']:.4f} vs "
          f"{losses['timm']:.4f}; host syncs per epoch {out['host_syncs_per_epoch']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models and batches (a CPU smoke run in seconds)")
    ap.add_argument("--cpu-training", action="store_true",
                    help="with --tiny: the training check on ViT-Ti/16 at 112 px, batch 32 (a CPU measurement)")
    ap.add_argument("--out", default="gpu_check.json", help="JSON file with every figure")
    ap.add_argument("--only", default="probe,hessian,training", help="comma list of the checks to run")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides of each ratio
        torch.backends.cudnn.allow_tf32 = False
    elif not args.tiny:
        print("warning: the full settings (ViT-B/16 at batch 128) on a CPU take far longer than 8 minutes; "
              "use --tiny", file=sys.stderr)
    settings = TINY if args.tiny else FULL
    if args.cpu_training:
        if not args.tiny:
            raise SystemExit("--cpu-training goes with --tiny (the other checks' CPU sizes)")
        settings = {**TINY, **CPU_TRAINING}
    report: dict[str, Any] = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(), "tiny": args.tiny,
        "load_average": os.getloadavg()[0], "settings": settings,
    }
    start = time.perf_counter()
    checks = {"probe": check_probe, "hessian": check_hessian, "training": check_training}
    for name in args.only.split(","):
        name = name.strip()
        if name not in checks:
            raise SystemExit(f"--only: unknown check {name!r}; choose from {', '.join(checks)}")
        t0 = time.perf_counter()
        report[name] = checks[name](settings, device)
        report[name]["wall_s"] = time.perf_counter() - t0
    report["wall_s"] = time.perf_counter() - start
    atomic_write_json(args.out, report)
    print(f"total {report['wall_s']:.1f} s; wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
