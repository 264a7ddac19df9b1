"""``vitscope landscape``: loss landscape along random filter-normalized directions (Li et al. 2018).

Writes ``DIR/landscape.json`` (coordinates, loss, accuracy, policy), ``DIR/landscape.png`` (1-D curve or
2-D contour) and ``DIR/directions.safetensors`` (the directions, to reproduce the plot).
"""
from __future__ import annotations

import argparse

from vitscope.cli import CLIError
from vitscope.cli._common import build_setup, check_positive
from vitscope.cli.hessian import add_common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "landscape", help="loss landscape along random filter-normalized directions",
        description="Loss (and accuracy) on a 1-D or 2-D grid around the weights along random directions "
        "normalized per filter (Li et al. 2018) or HDVW's way; writes DIR/landscape.json, DIR/landscape.png "
        "and DIR/directions.safetensors. Under torchrun (torchrun --nproc_per_node N -m vitscope landscape ...) "
        "the batches are split over the processes (each example counted once) and rank 0 alone writes.",
    )
    add_common(p)
    p.add_argument("--dims", type=int, default=2, choices=(1, 2))
    p.add_argument("--steps", type=int, default=21, help="grid points per axis")
    p.add_argument("--span", type=float, default=1.0, help="grid covers [-span, span]")
    p.add_argument("--normalization", default="filter", choices=("filter", "hdvw"))
    p.add_argument("--ignore", default="biasbn", choices=("biasbn", "none"),
                   help="biasbn: zero direction for 1-D parameters (biases, norms)")
    p.add_argument("--tokens", default="row", choices=("row", "filter", "exclude"),
                   help="pos_embed/cls_token policy: one filter per token row, whole tensor, or excluded")
    p.add_argument("--weight-decay", type=float, default=0.0, help="add wd * L2 term (default 0)")
    p.add_argument("--l2-style", default="hdvw", choices=("half_sq", "hdvw"))
    p.add_argument("--directions", help="reuse a directions.safetensors from an earlier run")
    p.set_defaults(func=run)


def _check_directions_file(path: str, dims: int) -> None:
    """``--directions`` must be a directions.safetensors of an earlier landscape run with ``dims`` directions."""
    from vitscope.curvature.landscape import load_directions

    try:
        dirs, _ = load_directions(path)
        n = len(dirs)
        if not all(dirs):
            raise ValueError("a direction is empty")
    except FileNotFoundError:
        raise CLIError(f"--directions {path}: no such file; pass DIR/directions.safetensors of an earlier "
                       "landscape run") from None
    except Exception as e:  # safetensors' own errors, bad keys, bad metadata
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CLIError(f"--directions {path} is not a directions file written by `vitscope landscape` ({msg}); "
                       "pass DIR/directions.safetensors of an earlier run") from None
    if n != dims:
        raise CLIError(f"--directions {path} holds {n} direction(s) but --dims is {dims}; pass --dims {n}")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitscope.curvature._io import plot_landscape, save_figure
    from vitscope.curvature.landscape import loss_landscape, save_directions
    from vitscope.io.atomic import atomic_write_json, staged_output

    if args.steps < 1:
        raise CLIError(f"--steps must be a positive integer, got {args.steps}")
    if args.span <= 0:
        raise CLIError(f"--span must be positive, got {args.span}")
    check_positive(batches=args.batches)
    if args.directions:
        _check_directions_file(args.directions, args.dims)
    setup = build_setup(args, max_examples=args.batch_size * args.batches, needs_logits=True)
    model, loader = setup.model, setup.loader  # loss_landscape moves each batch to the model's device
    result = loss_landscape(
        model, None, loader, dims=args.dims, steps=args.steps, span=args.span,
        normalization=args.normalization, ignore=None if args.ignore == "none" else args.ignore,
        tokens=args.tokens, seed=args.seed, max_batches=args.batches, weight_decay=args.weight_decay,
        l2_style=args.l2_style, directions=args.directions, train_mode=args.train_mode,
        progress=not args.no_progress, shard=True,
    )
    if not setup.is_main:
        return 0  # torchrun: the batches were split over the ranks and the sums merged; rank 0 alone writes
    out = Path(args.out)
    data = result.to_dict()
    data["run"] = {**setup.meta, "batch_size": args.batch_size, "batches": args.batches,
                   "img_size": setup.img_size, "directions": str(out / "directions.safetensors")}
    with staged_output(out) as stage:  # the three files appear together, or none
        save_directions(stage / "directions.safetensors", result.directions, result.policy)
        atomic_write_json(stage / "landscape.json", data)
        save_figure(plot_landscape(result, title=f"{setup.meta['model']}: loss landscape"), stage / "landscape.png")
    centre = result.loss[(args.steps // 2,) * args.dims]
    print(f"wrote {out / 'landscape.json'}, landscape.png and directions.safetensors "
          f"({result.n_examples} examples; loss at the weights {centre:.4g}, min {result.loss.min():.4g}, "
          f"max {result.loss.max():.4g})")
    return 0
