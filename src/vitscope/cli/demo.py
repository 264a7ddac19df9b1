"""``vitscope demo [--quick] [--out DIR]``: train five small models on the embedded ELPV data and dissect them."""
from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="train small ViT, ViT+CB, ConViT, ResNet, AlterNet on embedded data and run every analysis",
        description="Train small ViT, ViT+CB, ConViT, ResNet and AlterNet on the embedded ELPV solar-cell data "
                    "(CPU, no download), run every vitscope analysis on each and write OUT/report.html and "
                    "OUT/results.json. About 10 minutes on 2 CPU cores; --quick about 2.",
    )
    p.add_argument("--quick", action="store_true", help="fewer epochs and smaller analyses (about 2 minutes)")
    p.add_argument("--out", default="vitscope-demo", help="output directory (default: vitscope-demo)")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op CPU threads (default 1: tiny models gain little from more)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # test suite: tiny models, few images
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from vitscope.studies import run_demo

    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    from vitscope.cli._common import resolve_device

    res = run_demo(args.out, size=size, device=str(resolve_device(args.device)), progress=sys.stderr.isatty(),
                   threads=args.threads)
    print(f"{'model':<10} {'params':>8} {'top-1':>6} {'balanced':>8} {'ECE':>6}")
    for m in res["models"].values():
        t = m["test"]
        ece = m.get("robustness", {}).get("ece")
        print(f"{m['label']:<10} {m['params']:>8} {t['accuracy']:>6.3f} {t['balanced_accuracy']:>8.3f} "
              f"{ece if ece is None else format(ece, '6.3f'):>6}")
    print(f"majority-class baseline: top-1 {res['data']['majority_accuracy']:.3f}, balanced 0.500")
    mach = res["machine"]
    print(f"total {res['timing_s']['total']:.0f} s wall, {mach['process_cpu_s']:.0f} s CPU; "
          f"load average at start {json.dumps(mach['loadavg_start'])} on {mach['cpu_count']} CPUs")
    print(f"report: {res['report']}")
    return 0
