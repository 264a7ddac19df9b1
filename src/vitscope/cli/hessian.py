"""``vitscope hessian``: HDVW's Hessian eigenvalue spectrum of a model on training minibatches.

Writes ``DIR/hessian.json`` (every eigenvalue per batch, density, negative fraction, config) and
``DIR/hessian.png`` (eigenvalue density with the negative fraction).
"""
from __future__ import annotations

import argparse

from vitscope.cli import CLIError


def add_common(p: argparse.ArgumentParser) -> None:
    """Model and data options shared by ``hessian`` and ``landscape``."""
    p.add_argument("--model", required=True, help="model name (vitscope or timm)")
    p.add_argument("--checkpoint", help="local weights (.safetensors, .bin, .pth)")
    p.add_argument("--data", required=True, help="data spec: fake, elpv, cifar10:PATH, imagefolder:PATH ...")
    p.add_argument("--split", default="train", choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="number of minibatches to use")
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--train-mode", action="store_true", help="run the model in train mode (default eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_model_and_data(args: argparse.Namespace, augment: bool = False):  # noqa: ANN201
    """(model on its device, loader, device, img_size) from the common options."""
    import torch

    from vitscope.data import create_loader, data_info
    from vitscope.io.weights import load_model

    for name, value in (("--batch-size", args.batch_size), ("--batches", args.batches)):
        if value is not None and value < 1:
            raise CLIError(f"{name} must be a positive integer, got {value}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = data_info(args.data)
    kwargs = {} if args.checkpoint else {"num_classes": info.num_classes}
    torch.manual_seed(args.seed)  # a model without --checkpoint gets the same random weights every run
    model = load_model(args.model, checkpoint=args.checkpoint, **kwargs).to(device)
    img_size = args.img_size or model.pretrained_cfg.get("input_size", (3, info.img_size, info.img_size))[-1]
    loader = create_loader(args.data, split=args.split, batch_size=args.batch_size, img_size=img_size,
                           augment=augment, seed=args.seed, max_examples=args.batch_size * args.batches)
    return model, loader, device, img_size


class _ToDevice:
    """Iterate a loader moving each batch to ``device``."""

    def __init__(self, loader, device):  # noqa: ANN001
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):  # noqa: ANN204
        for x, y in self.loader:
            yield x.to(self.device), y.to(self.device)


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

    from vitscope.curvature._io import plot_spectrum, save_figure, write_json
    from vitscope.curvature.spectrum import eigenvalue_spectrum

    if args.k < 1:
        raise CLIError(f"--k must be a positive integer, got {args.k}")
    model, loader, device, img_size = load_model_and_data(args, augment=args.augment)
    transform = None
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup

        if args.batch_size % 2:
            raise CLIError("--mixup/--cutmix need an even --batch-size (timm's Mixup)")
        transform = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=0.0,
                          num_classes=model.num_classes)
    result = eigenvalue_spectrum(
        model, _ToDevice(loader, device), k=args.k, transform=transform, weight_decay=args.weight_decay,
        l2_style=args.l2_style, max_batches=args.batches, groups="block" if args.groups == "block" else None,
        train_mode=args.train_mode, method=args.method, tol=args.tol, max_iter=args.max_iter, seed=args.seed,
        backend=args.backend, progress=not args.no_progress, start=args.start,
    )
    out = Path(args.out)
    data = result.to_dict()
    data["run"] = {"model": args.model, "checkpoint": args.checkpoint, "data": args.data, "split": args.split,
                   "batch_size": args.batch_size, "batches": args.batches, "img_size": img_size,
                   "mixup": args.mixup, "cutmix": args.cutmix, "augment": args.augment}
    write_json(out / "hessian.json", data)
    save_figure(plot_spectrum(result, title=f"{args.model}: top-{args.k} Hessian eigenvalues"), out / "hessian.png")
    parts = [f"{g}: max {v.max():.4g}, min {v.min():.4g}, negative {100 * result.negative_fraction[g]:.1f}%"
             for g, v in result.eigenvalues.items()]
    print(f"wrote {out / 'hessian.json'} and hessian.png ({len(result.batch_sizes)} batches, "
          f"{result.n_hvp} Hessian-vector products); " + "; ".join(parts))
    return 0
