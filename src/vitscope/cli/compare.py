"""``vitscope compare A B``: two models layer by layer on the same examples (RAGHU Fig. 2), each through its own
preprocessing; cross-model CKA and per-layer few-shot linear probes, written as results.json + CSV."""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from vitscope.cli import CLIError
from vitscope.cli._common import (
    SPLITS,
    WORKERS,
    add_amp_options,
    add_linear_probe_options,
    autocast,
    build_model,
    check_amp,
    check_classes,
    check_out,
    check_positive,
    few_shot_loaders,
    parse_shots,
    precision,
    resolve_device,
    resolve_preprocessing,
)

_logger = logging.getLogger(__name__)

_EPOCH = re.compile(r"^(?P<path>.+)@(?P<epoch>\d+|best|last)$")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vitscope.comparing import COMPARE_MEASURES, LAYER_SELECTIONS

    p = sub.add_parser(
        "compare", help="compare two models layer by layer (cross-model CKA, linear probes)",
        description="Run two models on the same examples, each through its own preprocessing, and write "
                    "DIR/results.json with the (La x Lb) minibatch CKA of their layers (RAGHU Fig. 2) and, with "
                    "--measures linear_probe, few-shot ridge probes per layer; one CSV per measure.")
    p.add_argument("a", metavar="A", help="model A: a timm / vitscope name (random weights, or --pretrained hub "
                   "weights; hf-hub:ORG/NAME), a training run directory, a weights file, or RUN@EPOCH (an epoch the "
                   "run kept: its latest, @best, or one of checkpoints/kept/ with keep_epochs)")
    p.add_argument("b", metavar="B", help="model B, as A (B = RUN@3 with A = RUN@last compares a run over training)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights for A and B given by name")
    p.add_argument("--data", required=True,
                   help="data spec: elpv (embedded solar-cell images), fake, cifar10:PATH, imagefolder:PATH ...")
    p.add_argument("--split", default="val", choices=SPLITS, help="the compared (held-out) examples")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("-j", "--workers", type=int, default=WORKERS,
                   help="data loader worker processes (default: 4 as timm, at most the CPUs available)")
    p.add_argument("--max-batches", type=int)
    p.add_argument("--measures", default="cka", help=f"comma-separated: {', '.join(COMPARE_MEASURES)}")
    p.add_argument("--layers", default="blocks", choices=LAYER_SELECTIONS,
                   help="blocks: each residual block's output, named by module path (blocks.3, layer2.1); "
                   "sublayers: the attention / MLP split (blocks.3.attn, blocks.3.mlp)")
    p.add_argument("--layer-names", metavar="GLOB[,GLOB]",
                   help="keep only the layers these fnmatch patterns match (as probe), e.g. 'blocks.*' or "
                   "'layer[34].*'")
    p.add_argument("--layer-names-b", metavar="GLOB[,GLOB]", help="the patterns for model B when they differ")
    p.add_argument("--gram-dtype", default="float64", choices=("float64", "float32"),
                   help="float64 (default): CKA to ~1e-12; float32: centred features multiplied in float32, HSIC "
                   "still float64, faster, within a derived bound (~1e-8 in practice; docs/compare.md)")
    add_linear_probe_options(p)
    p.add_argument("--preprocess", default="auto", choices=("auto", "model", "data"),
                   help="each model's eval preprocessing: auto (hub weights: the model's pretrained_cfg; a run: what "
                   "it recorded; else the data's statistics at the model's input size), model or data")
    p.add_argument("--use-ema", action="store_true", help="the EMA weights of runs trained with model_ema=true")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda ...")
    add_amp_options(p)  # CKA is still reduced in float64
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def _epoch_weights(run: Path, which: str) -> Path:
    """The weights file of epoch ``which`` (a number, ``best`` or ``last``) of run directory ``run``."""
    from vitscope.io.runs import epoch_weights

    try:
        return epoch_weights(run, which)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None


def model_args(spec: str, args: argparse.Namespace, which: str) -> argparse.Namespace:
    """The ``--model/--pretrained/--checkpoint`` options one model of the pair stands for, for the analysis
    commands' ``build_model`` and ``resolve_preprocessing`` (one loader and one resolver for every command)."""
    ns = argparse.Namespace(model=None, pretrained=False, checkpoint=None, img_size=None, mean=None, std=None,
                            interpolation=None, crop_pct=None, preprocess=args.preprocess, seed=args.seed,
                            data=args.data, use_ema=args.use_ema, split=args.split, batch_size=args.batch_size,
                            workers=args.workers, out=args.out, device=args.device)
    m = _EPOCH.match(spec)
    if m and Path(m["path"]).expanduser().is_dir():
        ns.checkpoint = str(_epoch_weights(Path(m["path"]).expanduser(), m["epoch"]))
    elif Path(spec).expanduser().exists():
        ns.checkpoint = spec
    elif m:
        raise CLIError(f"{which} {spec}: {m['path']} is not a run directory")
    elif "/" in spec and not spec.startswith("hf-hub:") and not spec.startswith("timm/"):
        raise CLIError(f"{which} {spec}: no such run directory or weights file (a model name has no '/')")
    else:
        ns.model, ns.pretrained = spec, args.pretrained
    return ns


def _label(text: str, ns: argparse.Namespace) -> tuple[str, Path | None]:
    """(a short name for tables and figures, the run directory when the model comes from a run)."""
    from vitscope.io.runs import find_run_spec

    if not ns.checkpoint:
        return text, None
    m = _EPOCH.match(text)
    path = Path(m["path"] if m and Path(m["path"]).expanduser().is_dir() else text).expanduser()
    try:
        spec = find_run_spec(ns.checkpoint)
    except (FileNotFoundError, ValueError):
        spec = None
    if spec is None:
        return path.name, None
    run = path.resolve() if path.is_dir() else None
    epoch = spec.get("epoch")
    return (f"{path.name}@{epoch}" if epoch is not None else path.name), run


def run(args: argparse.Namespace) -> int:
    from vitscope.comparing import COMPARE_MEASURES, compare
    from vitscope.data import create_loader, data_info
    from vitscope.distributed import init_from_env, rank_device
    from vitscope.io.atomic import staged_output

    measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    unknown = [m for m in measures if m not in COMPARE_MEASURES]
    if unknown or not measures:
        raise CLIError(f"--measures: unknown {unknown}; choose from {list(COMPARE_MEASURES)}" if unknown else
                       f"--measures {args.measures!r} names no measure; choose from {list(COMPARE_MEASURES)}")
    check_positive(batch_size=args.batch_size, max_batches=args.max_batches)  # (--ridge etc.: cli/_checks.py)
    if args.workers < 0:
        raise CLIError(f"--workers must be >= 0, got {args.workers}")
    shots = parse_shots(args.shots)
    check_out(args.out)
    globs = lambda text: [g.strip() for g in text.split(",") if g.strip()] if text else None  # noqa: E731
    specs = [model_args(args.a, args, "A"), model_args(args.b, args, "B")]
    device = resolve_device(args.device)
    check_amp(args, device)
    dist = init_from_env(device)
    device = rank_device(device, dist)
    info = data_info(args.data)
    models, metas, pres = [], [], []
    for which, ns in zip("AB", specs):
        model, meta = build_model(ns, info.num_classes)
        check_classes(meta["num_classes"], info.num_classes, args.data, f"model {which} ({meta['model']})")
        pre = resolve_preprocessing(ns, model, meta, info)
        models.append(model.to(device))
        metas.append({**meta, "spec": getattr(args, which.lower()), "preprocessing": pre})
        pres.append(pre)
    if pres[0]["input_size"] != pres[1]["input_size"] or pres[0]["mean"] != pres[1]["mean"]:
        _logger.info("A sees %s px, B %s px: the same examples through each model's own preprocessing",
                     pres[0]["input_size"][-1], pres[1]["input_size"][-1])
    loaders = tuple(create_loader(args.data, split=args.split, batch_size=args.batch_size, seed=args.seed,
                                  num_workers=args.workers, preprocessing=pre, shuffle=False) for pre in pres)
    fit_loaders = few_shot_loaders(args, pres, shots) if "linear_probe" in measures else None
    (label_a, run_a), (label_b, run_b) = _label(args.a, specs[0]), _label(args.b, specs[1])
    if label_a == label_b:
        label_a, label_b = f"{label_a} (A)", f"{label_b} (B)"
    with autocast(args, device):
        result = compare(models[0], models[1], loaders, label_a=label_a, label_b=label_b,
                         measures=measures, layers=args.layers, names=globs(args.layer_names),
                         names_b=globs(args.layer_names_b),
                         fit_loader=fit_loaders, num_classes=info.num_classes, shots=shots, ridge=args.ridge,
                         device=device, max_batches=args.max_batches, shard=True, gram_dtype=args.gram_dtype)
    result.over_training = run_a is not None and run_a == run_b
    result.meta.update(model_name=f"{label_a} vs {label_b}", over_training=result.over_training,
                       model_a={**metas[0], **result.meta["model_a"]}, model_b={**metas[1], **result.meta["model_b"]},
                       data=args.data, split=args.split, fit_split=args.fit_split if fit_loaders else None,
                       data_classes=info.num_classes, device=str(device), amp=args.amp, precision=precision(args),
                       seed=args.seed)
    if not dist.is_main:
        return 0  # torchrun: every rank holds the merged result; rank 0 alone writes
    out = Path(args.out)
    with staged_output(out) as stage:
        result.save(stage)
    summary = ""
    if result.cka is not None:
        summary = f"; CKA {len(result.names_a)} x {len(result.names_b)} layers on {result.meta['examples']} examples"
    print(f"wrote {out / 'results.json'} ({', '.join(measures)}){summary}")
    return 0
