"""``vitscope attention``: attention drawn on images (ViT Fig. 6 and 7, CONVIT Fig. 5) as PNG plus the raw maps.

For the first N images of a data split (``--data``) or of a folder of image files (``--images``) it writes
``OUT/attention.npz`` (``vitscope.probing.attention_images.load_attention_maps`` reads it; ``vitscope report`` shows it)
and PNGs: the rollout overlays, per image the per-layer per-head maps of the query patch, ConViT's gates and
positional maps, the patch-embedding components and the position-embedding similarity.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vitscope.cli import CLIError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _query(text: str) -> tuple[int, int]:
    try:
        r, c = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROW,COL of the query patch like 3,5, got {text!r}") from None
    return r, c


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vitscope.cli._common import add_model_options

    p = sub.add_parser("attention", help="draw attention rollout and per-head maps on images (PNG + .npz)",
                       description="Attention on images: rollout from the class token (or the documented "
                                   "substitute), per-layer per-head maps of a query patch, ConViT gates and "
                                   "positional maps, patch- and position-embedding figures; writes DIR/*.png "
                                   "and DIR/attention.npz.")
    add_model_options(p, data_required=False, split_default="test", batch_size=4, amp=False)
    p.add_argument("--images", metavar="DIR", help="a folder of image files (instead of --data); preprocessed "
                   "with the statistics of the data a --checkpoint run was trained on, else as the model's "
                   "pretrained_cfg says; --mean/--std/--img-size override")
    p.add_argument("--num-images", type=int, default=4, help="how many images (the first of the split or folder)")
    p.add_argument("--query", type=_query, help="ROW,COL of the query patch (default: the centre patch)")
    p.add_argument("--head-fusion", default="mean", choices=("mean", "max", "min"), help="rollout head fusion")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this fraction of weakest links")
    p.set_defaults(func=run)


def _folder_images(args: argparse.Namespace, model, meta: dict) -> tuple[object, list[str], dict]:
    """(images (N, 3, S, S), file names, preprocessing) from ``--images DIR``."""
    import torch
    from timm.data import create_transform

    from vitscope.cli._common import resolve_preprocessing
    from vitscope.data.local import default_max_pixels, load_rgb

    folder = Path(args.images).expanduser()
    if not folder.is_dir():
        raise CLIError(f"--images {args.images} is not a directory; give a folder of image files")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise CLIError(f"--images {args.images} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    if args.preprocess == "data":
        raise CLIError("--preprocess data needs --data (a folder of images has no data set statistics); "
                       "use --preprocess model or --mean/--std")
    pre = None
    trained_on = meta.get("trained_on")
    if args.preprocess == "auto" and isinstance(trained_on, str) and trained_on and not meta.get("pretrained"):
        # a run trained from scratch: the statistics of the data it was trained on
        from vitscope.data import data_info

        try:
            info = data_info(trained_on)
        except (ValueError, FileNotFoundError, OSError):
            info = None  # that data set is not on this machine: fall back to the model's pretrained_cfg
        if info is not None:
            args.data, args.preprocess = trained_on, "data"
            try:
                pre = resolve_preprocessing(args, model, meta, info)
            finally:
                args.data = ""
    if pre is None:
        args.preprocess = "model"
        pre = resolve_preprocessing(args, model, meta, None)
    tf = create_transform(pre["input_size"], is_training=False, interpolation=pre["interpolation"],
                          mean=pre["mean"], std=pre["std"], crop_pct=pre["crop_pct"], crop_mode=pre["crop_mode"])
    images = []
    for f in files[:args.num_images]:
        try:  # the pixel budget of image folders (PIL's decompression-bomb limit) holds here too
            images.append(tf(load_rgb(str(f), default_max_pixels())))
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot read image {f} ({e}); remove it or convert it to PNG/JPEG") from None
    return torch.stack(images), [f.name for f in files[:args.num_images]], pre


def run(args: argparse.Namespace) -> int:
    from vitscope.cli._common import (
        build_model,
        build_setup,
        check_out,
        check_positive,
        check_preprocess_options,
        resolve_device,
    )
    from vitscope.io.atomic import atomic_write_json, json_safe
    from vitscope.probing.attention_images import ATTENTION_FILE, attention_maps
    from vitscope.reports.image_figures import save_attention_figures

    check_positive(num_images=args.num_images)
    if bool(args.data) == bool(args.images):
        raise CLIError("give exactly one of --data SPEC (a data split) or --images DIR (a folder of image files)")
    if not 0.0 <= args.discard_ratio < 1.0:
        raise CLIError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    check_preprocess_options(args)
    out = check_out(args.out)
    if args.images:
        device = resolve_device(args.device)
        model, meta = build_model(args, None)
        images, labels, pre = _folder_images(args, model, meta)
        model = model.to(device)
        meta.update(images=str(args.images), preprocessing=pre, device=str(device), seed=args.seed)
    else:
        args.batch_size = args.num_images
        setup = build_setup(args)
        model, device, meta, pre = setup.model, setup.device, setup.meta, setup.preprocessing
        images, targets = next(iter(setup.loader))
        from vitscope.data import data_info

        names = data_info(args.data).class_names
        labels = [names[int(t)] if names else f"class {int(t)}" for t in targets]
    meta.update(model_name=args.model or meta.get("model"), labels=labels, query=args.query,
                head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)
    try:
        maps = attention_maps(model, images, args.query, mean=pre["mean"], std=pre["std"],
                              head_fusion=args.head_fusion, discard_ratio=args.discard_ratio, device=device)
    except ValueError as e:
        raise CLIError(str(e)) from None
    maps.meta = json_safe(meta)
    out.mkdir(parents=True, exist_ok=True)
    path = maps.save(out / ATTENTION_FILE)
    pngs = save_attention_figures(maps, out, prefix=f"{maps.meta.get('model_name')}: ")
    atomic_write_json(out / "attention_meta.json", json_safe({**meta, "files": [p.name for p in pngs]}))
    print(f"wrote {path} and {len(pngs)} PNG figures to {out} ({len(labels)} images, "
          f"{len(maps.layers)} attention layers; rollout: {maps.rollout_source})")
    return 0
