"""``vitscope robustness``: calibration, occlusion, FGSM/PGD, band noise and corruptions of a model.

Writes ``DIR/results.json``, ``summary.csv`` plus one CSV per measure, and PNG figures.
"""
from __future__ import annotations

import argparse
from fractions import Fraction

from vitscope.cli import CLIError
from vitscope.cli._common import add_model_options, autocast, build_setup, check_positive


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


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vitscope.robustness.suite import SUITE

    p = sub.add_parser(
        "robustness",
        help="calibration, occlusion, FGSM/PGD, Fourier-band noise and corruptions of a model",
        description="Evaluate a model's calibration (HDVW), center occlusion and FGSM (CB), PGD, "
        "Fourier-band noise (HDVW) and common corruptions in one pass over the test split; writes "
        "DIR/results.json, CSV tables and PNG figures.",
    )
    add_model_options(p, split_default="test", batch_size=64)
    p.add_argument("--suite", default=",".join(SUITE), help=f"comma-separated subset of {','.join(SUITE)}")
    p.add_argument("--max-batches", type=int, help="stop after N batches (quick looks)")
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
    p.add_argument("--normalization", choices=("data", "model"), default=None,
                   help="older name of --preprocess data|model")
    p.add_argument("--n-bins", type=int, default=10, help="calibration bins")
    p.add_argument("--occlusion-fraction", type=float, default=0.5)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitscope.robustness.report import save_results
    from vitscope.robustness.suite import check_suite

    suite = check_suite(args.suite.split(","))
    check_positive(max_batches=args.max_batches, pgd_steps=args.pgd_steps, n_bins=args.n_bins)
    bad_sev = [s for s in args.severities if not 1 <= s <= 5]
    if bad_sev:
        raise CLIError(f"--severities must be in 1..5, got {bad_sev}")
    attacks = [a for a in ("fgsm", "pgd") if a in suite]
    if attacks and (args.amp == "fp16" or args.amp_dtype == "float16"):
        raise CLIError(f"--amp fp16 with {','.join(attacks)}: without loss scaling the attacks' input gradients "
                       "underflow in float16; use --amp bf16, or drop fgsm,pgd from --suite")
    if args.cifar_c and "corruptions" not in suite:
        raise CLIError("--cifar-c needs 'corruptions' in --suite")
    corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()] if args.corruptions else None
    if args.normalization:
        if args.preprocess != "auto" and args.preprocess != args.normalization:
            raise CLIError(f"--normalization {args.normalization} contradicts --preprocess {args.preprocess}; "
                           "pass --preprocess only")
        args.preprocess = args.normalization
    # pixels in [0, 1]: the attacks normalize inside the model
    setup = build_setup(args, normalize=False, needs_logits=True)
    model, loader, device, img_size = setup.model, setup.loader, setup.device, setup.img_size
    mean, std = setup.preprocessing["mean"], setup.preprocessing["std"]
    progress = False if args.no_progress else None
    synthetic = [s for s in suite if not (s == "corruptions" and args.cifar_c)]
    with autocast(args, device):
        results = _evaluate(args, model, loader, synthetic, corruptions, mean, std, device, img_size, progress)
    if not setup.is_main:
        return 0  # torchrun: every rank holds the merged counts; rank 0 alone writes
    meta = {
        **setup.meta, "img_size": img_size, "mean": list(mean), "std": list(std),
        "normalization": setup.preprocessing["source"], "suite": suite,
        "max_batches": args.max_batches, "cifar_c": args.cifar_c,
    }
    from vitscope.io.atomic import staged_output

    with staged_output(args.out) as stage:  # every file appears together, or none
        written = save_results(results, stage, meta, plots=not args.no_plots)
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


def _evaluate(args, model, loader, synthetic, corruptions, mean, std, device, img_size, progress):  # noqa: ANN001, ANN202
    """The synthetic suite on ``loader`` plus, with ``--cifar-c``, the released CIFAR-C files."""
    from vitscope.robustness.corruptions import CORRUPTIONS
    from vitscope.robustness.suite import DEFAULT_EPS, DEFAULT_FREQS, evaluate_cifar_c, evaluate_robustness

    results = evaluate_robustness(
        model, loader, synthetic, mean=mean, std=std, device=device, max_batches=args.max_batches,
        n_bins=args.n_bins, occlusion_fraction=args.occlusion_fraction, eps=args.eps or DEFAULT_EPS,
        pgd_steps=args.pgd_steps, pgd_alpha=args.pgd_alpha, pgd_random_start=not args.no_random_start,
        freqs=args.freqs or DEFAULT_FREQS, freq_eps=args.freq_eps, freq_width=args.freq_width,
        corruptions=corruptions or CORRUPTIONS, severities=args.severities, seed=args.seed, progress=progress,
        shard=True,
    )
    if args.cifar_c:
        results["corruptions"] = evaluate_cifar_c(
            model, args.cifar_c, corruptions, args.severities, clean_accuracy=results["clean"]["accuracy"],
            mean=mean, std=std, device=device, batch_size=args.batch_size,
            max_batches=args.max_batches, img_size=img_size, progress=progress, shard=True,
        )
    return results
