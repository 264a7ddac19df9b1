"""``vitscope probe``: run the papers' measures on a model and data, write JSON and CSV tables."""
from __future__ import annotations

import argparse
import logging
from typing import Any

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

_logger = logging.getLogger(__name__)

INTERVENTIONS = ("lesion", "localization")
DEFAULT_MEASURES = ("attention_entropy", "attention_distance", "cka", "ratio_of_norms", "fourier", "feature_variance")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vitscope.probing import PROBE_MEASURES

    p = sub.add_parser("probe", help="measure attention, CKA, ratio of norms, Fourier, variance ... on a model",
                       description="Run forward measures in one pass per batch and write DIR/results.json "
                                   "plus one CSV per measure.")
    add_model_options(p, split_default="val", batch_size=64)
    p.add_argument("--measures", default=None,
                   help=f"comma-separated: {', '.join(sorted(PROBE_MEASURES))}, {', '.join(INTERVENTIONS)}; or "
                        f"`all` (default: {','.join(DEFAULT_MEASURES)}). With the default or `all`, measures that "
                        "have no meaning on the model (attention measures on a CNN, lesion where vitscope cannot "
                        "remove its blocks) are left out and named with the reason under not_applicable in "
                        "meta.json; a measure named here that does not apply is an error")
    p.add_argument("--max-batches", type=int)
    p.add_argument("--layers", choices=("sublayers", "blocks"), default="sublayers",
                   help="stream measures on each transformer sub-layer (attention, MLP apart; default) or on each "
                        "block's output (named by module path); the stem's output comes first either way")
    p.add_argument("--layer-names", metavar="GLOB[,GLOB]",
                   help="keep only the layers these fnmatch patterns match, e.g. 'stem,blocks.1*'")
    p.add_argument("--position-grid", type=int, metavar="N",
                   help="localization: predict the cell of an N x N grid holding each token instead of its exact "
                        "position (a variant, not RAGHU's; a CNN's 56 x 56 map at 224 px is 3,136 classes, slow on a "
                        "CPU); default: every position is a class")
    add_linear_probe_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitscope.io.atomic import atomic_write_json, json_safe, staged_output, write_csv
    from vitscope.probing import PROBE_MEASURES, ProbeResult, probe

    auto = args.measures is None or args.measures.strip() == "all"
    names = (list(DEFAULT_MEASURES) if args.measures is None else
             [*PROBE_MEASURES, *INTERVENTIONS] if auto else [m.strip() for m in args.measures.split(",") if m.strip()])
    unknown = [m for m in names if m not in PROBE_MEASURES and m not in INTERVENTIONS]
    if unknown or not names:
        raise CLIError(f"unknown measure(s) {unknown}; choose from {sorted(PROBE_MEASURES) + list(INTERVENTIONS)}"
                       if unknown else f"--measures {args.measures!r} names no measure; choose from "
                       f"{sorted(PROBE_MEASURES) + list(INTERVENTIONS)}")
    check_positive(max_batches=args.max_batches, position_grid=args.position_grid)
    shots = parse_shots(args.shots)
    setup = build_setup(args)
    model, loader, device = setup.model, setup.loader, setup.device
    skipped = _not_applicable(model, names)
    if skipped and not auto:  # asked for by name: refused before any work
        name, why = next(iter(skipped.items()))
        raise CLIError(f"measure {name!r} does not apply to {setup.meta['model']}: {why}; drop it (or pass no "
                       "--measures: the measures that apply)")
    names = [n for n in names if n not in skipped]
    if not names:
        raise CLIError(f"no measure of {sorted(skipped)} applies to {setup.meta['model']}: "
                       + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    for name, why in skipped.items():
        _logger.warning("not applicable to %s: %s (%s)", setup.meta["model"], name, why)
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
    if skipped:  # whole measures (a reason) beside the probe's layers a measure skipped (layer -> reason)
        result.meta["not_applicable"] = {**skipped, **result.meta.get("not_applicable", {})}
        result.meta["measures_not_applicable"] = sorted(skipped)
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
            extra["localization"] = localization_probe(model, loader, device=device, max_batches=args.max_batches,
                                                       position_grid=args.position_grid).to_rows()
    out = Path(args.out)
    with staged_output(out) as stage:  # results.json with every part, the CSVs and meta.json appear together
        result.save(stage)
        if extra:
            merged = {**result.to_dict(), **{k: {"rows": rows} for k, rows in extra.items()}}
            atomic_write_json(stage / "results.json", json_safe(merged))
            for k, rows in extra.items():
                write_csv(stage / f"{k}.csv", rows)
    acc = result.meta.get("accuracy")
    na = f"; not applicable: {', '.join(skipped)}" if skipped else ""
    acc_text = f"; accuracy {acc:.3f}" if acc is not None else ""
    print(f"wrote {out / 'results.json'} ({', '.join(names)}{na}){acc_text}")
    return 0


def _not_applicable(model: Any, names: list[str]) -> dict[str, str]:
    """The measures of ``names`` without meaning on ``model``, with the reason: the probe's own (attention measures
    on a CNN ...) and the interventions, which need blocks vitscope can remove (``residual_blocks``)."""
    from vitscope.probing import PROBE_MEASURES, not_applicable

    out = not_applicable(model, [n for n in names if n in PROBE_MEASURES])
    if any(n in INTERVENTIONS for n in names):
        from vitscope.interventions import residual_blocks

        try:
            residual_blocks(model)
        except ValueError as err:
            out.update({n: str(err) for n in names if n in INTERVENTIONS})
    return out
