"""``vitscope probe``: run the papers' measures on a model and data, write JSON and CSV tables."""
from __future__ import annotations

import argparse

from vitscope.cli import CLIError

INTERVENTIONS = ("lesion", "localization")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vitscope.probing import PROBE_MEASURES

    p = sub.add_parser("probe", help="measure attention, CKA, ratio of norms, Fourier, variance ... on a model",
                       description="Run forward measures in one pass per batch and write DIR/results.json "
                                   "plus one CSV per measure.")
    p.add_argument("--model", required=True, help="model name (vitscope or timm)")
    p.add_argument("--checkpoint", help="local weights (.safetensors, .bin, .pth)")
    p.add_argument("--data", default="elpv", help="data spec: fake, elpv, cifar10:PATH, imagefolder:PATH ...")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--measures", default="attention_entropy,attention_distance,cka,ratio_of_norms,fourier,"
                                         "feature_variance",
                   help=f"comma-separated: {', '.join(sorted(PROBE_MEASURES))}, {', '.join(INTERVENTIONS)}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", type=int)
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitscope.data import create_loader, data_info
    from vitscope.io.atomic import atomic_write_json, json_safe, write_csv
    from vitscope.io.weights import load_model
    from vitscope.probing import PROBE_MEASURES, ProbeResult, probe

    names = [m.strip() for m in args.measures.split(",") if m.strip()]
    unknown = [m for m in names if m not in PROBE_MEASURES and m not in INTERVENTIONS]
    if unknown:
        raise CLIError(f"unknown measure(s) {unknown}; choose from {sorted(PROBE_MEASURES) + list(INTERVENTIONS)}")
    info = data_info(args.data)
    kwargs = {} if args.checkpoint else {"num_classes": info.num_classes}
    model = load_model(args.model, checkpoint=args.checkpoint, **kwargs)
    img_size = args.img_size or model.pretrained_cfg.get("input_size", (3, info.img_size, info.img_size))[-1]
    loader = create_loader(args.data, split=args.split, batch_size=args.batch_size, img_size=img_size)

    forward = [m for m in names if m in PROBE_MEASURES]
    result = probe(model, loader, forward, device=args.device, max_batches=args.max_batches) if forward \
        else ProbeResult()
    result.meta.update(model_name=args.model, checkpoint=args.checkpoint, data=args.data, split=args.split)
    out = result.save(args.out)
    extra = {}
    if "lesion" in names:
        from vitscope.interventions import lesion

        extra["lesion"] = lesion(model, loader, device=args.device, max_batches=args.max_batches).to_rows()
    if "localization" in names:
        from vitscope.interventions import localization_probe

        extra["localization"] = localization_probe(model, loader, device=args.device,
                                                   max_batches=args.max_batches).to_rows()
    if extra:
        merged = {**result.to_dict(), **{k: {"rows": rows} for k, rows in extra.items()}}
        atomic_write_json(out / "results.json", json_safe(merged))
        for k, rows in extra.items():
            write_csv(out / f"{k}.csv", rows)
    acc = result.meta.get("accuracy")
    print(f"wrote {out / 'results.json'} ({', '.join(names)})" + (f"; accuracy {acc:.3f}" if acc is not None else ""))
    return 0
