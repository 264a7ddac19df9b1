"""``vitscope robustness``: calibration, occlusion, FGSM/PGD, band noise and corruptions of a model.

Writes ``DIR/results.json``, ``summary.csv`` plus one CSV per measure, and PNG figures.
"""
from __future__ import annotations

import argparse
from fractions import Fraction

from vitscope.cli import CLIError


def _floats(text: str) -> list[float]:
    """Comma-separated numbers; fractions such as ``8/255`` are allowed."""
    try:
        return [float(Fraction(t.strip())) for t in text.split(",") if t.strip()]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected numbers like 1/255,8/255 or 0.1, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,5, got {text!r}") from None


def _run_img_size(checkpoint: str | None) -> int | None:
    """``img_size`` of the training run that wrote ``checkpoint`` (its run dir's config.yaml), if any."""
    import logging
    import os

    import yaml

    if not checkpoint:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            size = (yaml.safe_load(f) or {}).get("img_size")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if isinstance(size, int) and size > 0:
        logging.getLogger(__name__).info("img_size %d from the training run's %s", size, path)
        return size
    return None


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vitscope.robustness.suite import SUITE

    p = sub.add_parser(
        "robustness",
        help="calibration, occlusion, FGSM/PGD, Fourier-band noise and corruptions of a model",
        description="Evaluate a model's calibration (HDVW), center occlusion and FGSM (CB), PGD, "
        "Fourier-band noise (HDVW) and common corruptions in one pass over the test split; writes "
        "DIR/results.json, CSV tables and PNG figures.",
    )
    p.add_argument("--model", required=True, help="model name (vitscope or timm)")
    p.add_argument("--checkpoint", help="local weights (.safetensors, .bin, .pth)")
    p.add_argument("--data", default="elpv", help="data spec: fake, elpv, cifar10:PATH, imagefolder:PATH ...")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--suite", default=",".join(SUITE), help=f"comma-separated subset of {','.join(SUITE)}")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", type=int, help="stop after N batches (quick looks)")
    p.add_argument("--img-size", type=int,
                   help="input size (default: the training run's config.yaml next to --checkpoint, else the model's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--eps", type=_floats, default=None, help="L-inf radii for FGSM/PGD, e.g. 1/255,2/255,4/255,8/255")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--pgd-alpha", type=float, help="PGD step (default 2.5 eps / steps)")
    p.add_argument("--no-random-start", action="store_true", help="start PGD at the clean image")
    p.add_argument("--freqs", type=_floats, default=None, help="normalized noise frequencies (default 0,0.1,...,1)")
    p.add_argument("--freq-eps", type=float, help="L2 norm of band noise per image (default 0.05 sqrt(CHW))")
    p.add_argument("--freq-width", type=float, default=0.2, help="width of the frequency band")
    p.add_argument("--corruptions", help="comma-separated corruption names (default: all)")
    p.add_argument("--severities", type=_ints, default=[1, 2, 3, 4, 5])
    p.add_argument("--cifar-c", metavar="DIR", help="use the released CIFAR-10-C/100-C .npy files in DIR "
                   "for the corruptions measure instead of corrupting the test split")
    p.add_argument("--normalization", choices=("data", "model"), default="data",
                   help="input mean/std: the data set's (data_info, as vitscope training uses) or the "
                   "model's pretrained_cfg (for timm pretrained weights)")
    p.add_argument("--n-bins", type=int, default=10, help="calibration bins")
    p.add_argument("--occlusion-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vitscope.data import create_loader, data_info
    from vitscope.io.weights import load_model
    from vitscope.robustness.corruptions import CORRUPTIONS
    from vitscope.robustness.report import save_results
    from vitscope.robustness.suite import DEFAULT_EPS, DEFAULT_FREQS, check_suite, evaluate_cifar_c, evaluate_robustness

    suite = check_suite(args.suite.split(","))
    for name, value in (("--batch-size", args.batch_size), ("--max-batches", args.max_batches),
                        ("--pgd-steps", args.pgd_steps), ("--n-bins", args.n_bins)):
        if value is not None and value < 1:
            raise CLIError(f"{name} must be a positive integer, got {value}")
    bad_sev = [s for s in args.severities if not 1 <= s <= 5]
    if bad_sev:
        raise CLIError(f"--severities must be in 1..5, got {bad_sev}")
    if args.cifar_c and "corruptions" not in suite:
        raise CLIError("--cifar-c needs 'corruptions' in --suite")
    corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()] if args.corruptions else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    info = data_info(args.data)
    kwargs = {} if args.checkpoint else {"num_classes": info.num_classes}
    model = load_model(args.model, checkpoint=args.checkpoint, **kwargs).to(device).eval()
    img_size = args.img_size or _run_img_size(args.checkpoint) or \
        model.pretrained_cfg.get("input_size", (3, info.img_size, info.img_size))[-1]
    loader = create_loader(args.data, split=args.split, batch_size=args.batch_size, img_size=img_size,
                           normalize=False)
    progress = False if args.no_progress else None
    if args.normalization == "model":
        from vitscope.robustness.attacks import resolve_normalization

        mean, std = resolve_normalization(model)
    else:
        mean, std = tuple(info.mean), tuple(info.std)
    synthetic = [s for s in suite if not (s == "corruptions" and args.cifar_c)]
    results = evaluate_robustness(
        model, loader, synthetic, mean=mean, std=std, device=device, max_batches=args.max_batches,
        n_bins=args.n_bins, occlusion_fraction=args.occlusion_fraction, eps=args.eps or DEFAULT_EPS,
        pgd_steps=args.pgd_steps, pgd_alpha=args.pgd_alpha, pgd_random_start=not args.no_random_start,
        freqs=args.freqs or DEFAULT_FREQS, freq_eps=args.freq_eps, freq_width=args.freq_width,
        corruptions=corruptions or CORRUPTIONS, severities=args.severities, seed=args.seed, progress=progress,
    )
    if args.cifar_c:
        results["corruptions"] = evaluate_cifar_c(
            model, args.cifar_c, corruptions, args.severities, clean_accuracy=results["clean"]["accuracy"],
            mean=mean, std=std, device=device, batch_size=args.batch_size,
            max_batches=args.max_batches, img_size=img_size, progress=progress,
        )
    meta = {
        "model": args.model, "checkpoint": args.checkpoint, "data": args.data, "split": args.split,
        "img_size": img_size, "mean": list(mean), "std": list(std), "normalization": args.normalization,
        "suite": suite,
        "max_batches": args.max_batches, "seed": args.seed, "cifar_c": args.cifar_c,
    }
    written = save_results(results, args.out, meta, plots=not args.no_plots)
    line = [f"clean {results['clean']['accuracy']:.3f}"]
    if "calibration" in results:
        line.append(f"ECE {results['calibration']['ece']:.3f}")
    for a in ("fgsm", "pgd"):
        if a in results:
            line.append(f"{a} " + "/".join(f"{v:.3f}" for v in results[a]["accuracy"]))
    if "corruptions" in results:
        line.append(f"corruptions mean {results['corruptions']['mean_accuracy']:.3f}")
    print(f"wrote {len(written)} files to {args.out} (n={results['n']}): " + ", ".join(line))
    return 0
