"""``vitscope probe``: run the papers' measures on a model and data, write JSON and CSV tables."""
from __future__ import annotations

import argparse

from vitscope.cli import CLIError
from vitscope.cli._common import (
    add_linear_probe_options,
    add_model_options,
    autocast,
    build_setup,
    check_positive,
    few_shot_loaders,
    parse_shots,
)

INTERVENTIONS = ("lesion", "localization")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vitscope.probing import PROBE_MEASURES

    p = sub.add_parser("probe", help="measure attention, CKA, ratio of norms, Fourier, variance ... on a model",
                       description="Run forward measures in one pass per batch and write DIR/results.json "
                                   "plus one CSV per measure.")
    add_model_options(p, split_default="val", batch_size=64)
    p.add_argument("--measures", default="attention_entropy,attention_distance,cka,ratio_of_norms,fourier,"
                                         "feature_variance",
                   help=f"comma-separated: {', '.join(sorted(PROBE_MEASURES))}, {', '.join(INTERVENTIONS)}")
    p.add_argument("--max-batches", type=int)
    p.add_argument("--layers", choices=("sublayers", "blocks"), default="sublayers",
                   help="stream measures on each transformer sub-layer (attention, MLP apart; default) or on each "
                        "block's output (named by module path); the stem's output comes first either way")
    p.add_argument("--layer-names", metavar="GLOB[,GLOB]",
                   help="keep only the layers these fnmatch patterns match, e.g. 'stem,blocks.1*'")
    add_linear_probe_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitscope.io.atomic import atomic_write_json, json_safe, staged_output, write_csv
    from vitscope.probing import PROBE_MEASURES, ProbeResult, probe

    names = [m.strip() for m in args.measures.split(",") if m.strip()]
    unknown = [m for m in names if m not in PROBE_MEASURES and m not in INTERVENTIONS]
    if unknown or not names:
        raise CLIError(f"unknown measure(s) {unknown}; choose from {sorted(PROBE_MEASURES) + list(INTERVENTIONS)}"
                       if unknown else f"--measures {args.measures!r} names no measure; choose from "
                       f"{sorted(PROBE_MEASURES) + list(INTERVENTIONS)}")
    check_positive(max_batches=args.max_batches)
    shots = parse_shots(args.shots)
    setup = build_setup(args)
    model, loader, device = setup.model, setup.loader, setup.device
    fit = {}
    if "linear_probe" in names:  # the fit examples through the same preprocessing as the probed ones
        fit = {"fit_loader": few_shot_loaders(args, [setup.preprocessing], shots)[0],
               "num_classes": setup.meta["data_classes"], "shots": shots, "ridge": args.ridge}

    forward = [m for m in names if m in PROBE_MEASURES]
    with autocast(args, device):
        layer_names = [g.strip() for g in args.layer_names.split(",") if g.strip()] if args.layer_names else None
        result = probe(model, loader, forward, device=device, max_batches=args.max_batches, shard=True,
                       layers=args.layers, names=layer_names, **fit) if forward else ProbeResult()
    result.meta.update(model_name=setup.meta["model"], **{k: v for k, v in setup.meta.items() if k != "model"})
    if fit:
        result.meta.update(fit_split=args.fit_split, shots=shots, ridge=args.ridge)
    if not setup.is_main:
        return 0  # torchrun: every rank holds the merged result; rank 0 alone writes (and runs lesion/localization)
    extra = {}
    if "lesion" in names:
        from vitscope.interventions import lesion

        with autocast(args, device):
            extra["lesion"] = lesion(model, loader, device=device, max_batches=args.max_batches).to_rows()
    if "localization" in names:
        from vitscope.interventions import localization_probe

        with autocast(args, device):
            extra["localization"] = localization_probe(model, loader, device=device,
                                                       max_batches=args.max_batches).to_rows()
    out = Path(args.out)
    with staged_output(out) as stage:  # results.json with every part, the CSVs and meta.json appear together
        result.save(stage)
        if extra:
            merged = {**result.to_dict(), **{k: {"rows": rows} for k, rows in extra.items()}}
            atomic_write_json(stage / "results.json", json_safe(merged))
            for k, rows in extra.items():
                write_csv(stage / f"{k}.csv", rows)
    acc = result.meta.get("accuracy")
    print(f"wrote {out / 'results.json'} ({', '.join(names)})" + (f"; accuracy {acc:.3f}" if acc is not None else ""))
    return 0
