"""``vitscope report``: one self-contained HTML page of the papers' figures from vitscope output directories."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="HTML report with the papers' figures from probe/train/hessian/landscape/robustness outputs",
        description="Read vitscope output directories (probe results.json, train metrics.jsonl/probes.jsonl, "
                    "hessian.json, landscape.json, robustness.json) and write one self-contained HTML page; "
                    "every figure is also saved as PNG and CSV (and SVG with --svg) under figures/ next to it.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="vitscope output directories (one per model)")
    p.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    p.add_argument("--title", default="vitscope report", help="page title")
    p.add_argument("--workers", type=int, default=None,
                   help="processes drawing the figures (default: one per CPU, at most one per model + 1)")
    p.add_argument("--svg", action="store_true",
                   help="also write every figure as SVG (text kept as text; about a third more drawing time)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitscope.reports import build_report

    out = build_report(args.run_dirs, args.out, title=args.title, workers=args.workers, svg=args.svg)
    print(f"wrote {out} (figures under {out.parent / 'figures'})")
    return 0
