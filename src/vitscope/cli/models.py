"""``vitscope models [PATTERN]``: list vitscope's registered models with parameter counts."""
from __future__ import annotations

import argparse

import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models vitscope registers, with parameter counts")
    p.add_argument("pattern", nargs="?", default="", help="shell-style filter, e.g. '*cb*' or 'alternet'")
    p.add_argument("--no-count", action="store_true", help="list names only (fast)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitscope.models import create_model, list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no vitscope model matches {args.pattern!r}")
        return 1
    width = max(len(n) for n in names)
    for name in names:
        if args.no_count:
            print(name)
            continue
        with torch.device("meta"):  # count parameters without allocating them
            model = create_model(name)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:<{width}}  {n_params / 1e6:9.3f}M  ({n_params:,} parameters)")
    return 0
