"""Cost of the full forward probe pass against a plain ``model.eval()`` forward over the same batches.

Goal (measures issue, issue 24 item 5): the probe (every forward measure fed from one capture per batch) takes at
most 1.5x the plain forward's time, on the ViT, Swin-T and ConvNeXt-T. Both run side by side in one process on the
same batches, interleaved: every run follows a plain forward pass, and the median of these paired ratios is printed
next to best/best, per model, then one summary line per model (about 2 minutes on a quiet 2-core CPU).

    python benchmarks/bench_probe.py [--model vit_tiny_patch4_32,swin_tiny_patch4_window7_224,convnext_tiny]
        [--batches B] [--batch-size N] [--threads N] [--glibc-defaults]

Default batches: 6 x 64 for 32 px models, 2 x 8 at 224 px.

The load average is printed before and after: on a shared machine another process on a core stalls every
parallel region of a 2-thread run, so compare ratios only at low load (or with --threads 1).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

import vitscope
from vitscope.capture.sites import is_attention_module
from vitscope.probing import PROBE_MEASURES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_tiny_patch4_32,swin_tiny_patch4_window7_224,convnext_tiny",
                    help="comma-separated model names, each measured in turn")
    ap.add_argument("--batches", type=int, default=None, help="default: 6 (32 px models), 2 (larger inputs)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 64 (32 px models), 8 (larger inputs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--measures", default=None,
                    help="comma list (default: every forward measure that applies, linear_probe aside: it needs a fit "
                    "loader)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="keep glibc's malloc defaults (VITSCOPE_KEEP_FREED_MEMORY=0): by default vitscope.probe "
                    "on a CPU calls vitscope.keep_freed_memory(), and every run here then shares that setting")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.glibc_defaults:
        os.environ["VITSCOPE_KEEP_FREED_MEMORY"] = "0"
    kept = vitscope.keep_freed_memory()  # as the probe's first call does: the plain forward shares the setting
    summary = [bench(name, args, kept) for name in args.model.split(",")]
    print()
    for line in summary:
        print(line)


def bench(model_name: str, args: argparse.Namespace, kept: bool) -> str:
    """Print the table of one model; return its summary line."""
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    model = vitscope.create_model(model_name, num_classes=10).eval()
    size = model.pretrained_cfg["input_size"][-1]
    n_batches = args.batches or (6 if size <= 32 else 2)
    batch_size = args.batch_size or (64 if size <= 32 else 8)
    batches = [(torch.randn(batch_size, 3, size, size), torch.randint(0, 10, (batch_size,)))
               for _ in range(n_batches)]
    has_attn = any(is_attention_module(m) for m in model.modules())
    measures = args.measures.split(",") if args.measures else [  # linear_probe: a fit on other examples first
        n for n, cls in PROBE_MEASURES.items()
        if not cls.static and n != "linear_probe" and (has_attn or not cls.needs_attention)]

    def plain() -> None:
        with torch.no_grad():
            for x, _ in batches:
                model(x)

    def explicit() -> None:  # the floor for attention measures: maps must be materialised
        with torch.no_grad(), vitscope.explicit_attention(model):
            for x, _ in batches:
                model(x)

    def captured() -> None:  # hooks, every record held until the batch ends (probe reduces them as they come)
        with torch.no_grad():
            for x, _ in batches:
                with vitscope.capture(model, attention=has_attn):
                    model(x)

    def probed() -> None:
        vitscope.probe(model, batches, measures, progress=False)

    attn = [m for m in measures if PROBE_MEASURES[m].needs_attention]
    streams = [m for m in measures if not PROBE_MEASURES[m].needs_attention]
    runs = {"plain forward": plain, "explicit attention": explicit, "capture only": captured}
    if attn and streams:  # where the time goes
        runs["probe, attention only"] = lambda: vitscope.probe(model, batches, attn, progress=False)
        runs["probe, streams only"] = lambda: vitscope.probe(model, batches, streams, progress=False)
    runs["probe"] = probed
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    paired: dict[str, list[float]] = {k: [] for k in runs if k != "plain forward"}

    def timed(name: str) -> float:
        t0 = time.perf_counter()
        runs[name]()
        times[name].append(time.perf_counter() - t0)
        return times[name][-1]

    for _ in range(args.repeats):  # each run right after a plain forward pass: paired ratios resist drifting load
        for name in paired:
            base = timed("plain forward")
            paired[name].append(timed(name) / base)
    best = {k: min(v) for k, v in times.items()}
    print(f"model {model_name}, {n_batches} batches x {batch_size}, threads {torch.get_num_threads()}, "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {args.repeats} repeats, "
          f"keep_freed_memory {'on' if kept else 'off'}")
    print(f"measures: {','.join(measures)}")
    print(f"{'':<22} {'best':>8}     {'best/best':>9}  {'median of paired ratios':>23}")
    for name, t in best.items():
        med = f"{statistics.median(paired[name]):.2f}x" if name in paired else ""
        print(f"{name:<22} {t:8.3f} s   {t / best['plain forward']:8.2f}x  {med:>23}")
    line = (f"{model_name}: ratio probe/plain {best['probe'] / best['plain forward']:.2f}x best/best, "
            f"{statistics.median(paired['probe']):.2f}x median paired (goal <= 1.5x)")
    print(line)
    return line


if __name__ == "__main__":
    main()
