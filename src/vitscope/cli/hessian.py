"""``vitscope hessian``: HDVW's Hessian eigenvalue spectrum of a model on training minibatches.

Writes ``DIR/hessian.json`` (every eigenvalue per batch, density, negative fraction, config) and
``DIR/hessian.png`` (eigenvalue density with the negative fraction).
"""
from __future__ import annotations

import argparse

from vitscope.cli import CLIError
from vitscope.cli._common import add_model_options, build_setup, check_positive


def add_common(p: argparse.ArgumentParser) -> None:
    """Model and data options shared by ``hessian`` and ``landscape`` (no ``--amp``: their products and loss
    differences need float32 or float64)."""
    add_model_options(p, split_default="train", batch_size=32, amp=False)
    p.add_argument("--batches", type=int, default=4, help="number of minibatches to use")
    p.add_argument("--train-mode", action="store_true", help="run the model in train mode (default eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _memory(text: str) -> int:
    from vitscope.curvature.eigen import parse_memory

    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "hessian", help="Hessian eigenvalue spectrum on training minibatches (HDVW)",
        description="Top-k Hessian eigenvalues per training minibatch (HDVW's protocol: training transform, "
        "model in eval mode, NLL + optional L2 term); writes DIR/hessian.json and DIR/hessian.png.",
    )
    add_common(p)
    p.add_argument("--k", type=int, default=5, help="eigenvalues per batch")
    p.add_argument("--method", default="lanczos", choices=("lanczos", "power"))
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--memory-budget", type=_memory, metavar="SIZE",
                   help="most memory the eigensolver's vectors may take, e.g. 8GB (default: half the device's free "
                   "memory); over it Lanczos keeps fewer vectors or switches to power iteration, noted in hessian.json")
    p.add_argument("--backend", default="auto", choices=("auto", "func", "autograd", "cached"),
                   help="Hessian-vector products: double backward through one retained graph per batch "
                   "(cached; auto, the default, picks it), torch.func forward-over-reverse recomputed each "
                   "product (func: less memory), or plain double backward (autograd)")
    p.add_argument("--start", default="gradient", choices=("gradient", "random"),
                   help="Lanczos start vector: the loss gradient plus a random vector (default; fewer products) "
                   "or a random vector")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 term weight (default 0: NLL only)")
    p.add_argument("--l2-style", default="half_sq", choices=("half_sq", "hdvw"),
                   help="half_sq: wd/2 sum||p||^2; hdvw: wd sum||p|| (HDVW's code)")
    p.add_argument("--groups", default="all", choices=("all", "block"),
                   help="block: separate spectra for attention, mlp, norm, conv, other parameters")
    p.add_argument("--mixup", type=float, default=0.0, help="timm Mixup alpha (training transform; 0 = off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="timm CutMix alpha (0 = off)")
    p.add_argument("--augment", action="store_true", help="use the data set's training augmentation")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitscope.curvature._io import plot_spectrum, save_figure
    from vitscope.curvature.spectrum import eigenvalue_spectrum
    from vitscope.io.atomic import atomic_write_json, staged_output

    check_positive(k=args.k, batches=args.batches, batch_size=args.batch_size, max_iter=args.max_iter)
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise CLIError("--mixup/--cutmix need an even --batch-size (timm's Mixup)")
    setup = build_setup(args, augment=args.augment, max_examples=args.batch_size * args.batches, needs_logits=True)
    model, loader = setup.model, setup.loader
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.k > n_params:
        raise CLIError(f"--k {args.k} exceeds the model's {n_params} trainable parameters (a Hessian of that size "
                       f"has at most {n_params} eigenvalues); use --k <= {n_params}")
    transform = None
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup

        transform = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=0.0,
                          num_classes=model.num_classes)
    result = eigenvalue_spectrum(
        model, loader, k=args.k, transform=transform, weight_decay=args.weight_decay,
        l2_style=args.l2_style, max_batches=args.batches, groups="block" if args.groups == "block" else None,
        train_mode=args.train_mode, method=args.method, tol=args.tol, max_iter=args.max_iter, seed=args.seed,
        backend=args.backend, progress=not args.no_progress, start=args.start, shard=True,
        memory_budget=args.memory_budget,
    )
    if not setup.is_main:
        return 0  # torchrun: every rank holds all batches' eigenvalues; rank 0 alone writes
    out = Path(args.out)
    data = result.to_dict()
    data["run"] = {**setup.meta, "batch_size": args.batch_size, "batches": args.batches,
                   "img_size": setup.img_size, "mixup": args.mixup, "cutmix": args.cutmix, "augment": args.augment}
    title = f"{setup.meta['model']}: top-{args.k} Hessian eigenvalues"
    with staged_output(out) as stage:  # both files appear together, or neither
        atomic_write_json(stage / "hessian.json", data)
        save_figure(plot_spectrum(result, title=title), stage / "hessian.png")
    parts = [f"{g}: max {v.max():.4g}, min {v.min():.4g}, negative {100 * result.negative_fraction[g]:.1f}%"
             for g, v in result.eigenvalues.items()]
    print(f"wrote {out / 'hessian.json'} and hessian.png ({len(result.batch_sizes)} batches, "
          f"{result.n_hvp} Hessian-vector products); " + "; ".join(parts))
    return 0
