"""Options and setup shared by the analysis commands (``probe``, ``hessian``, ``landscape``, ``robustness``).

``add_model_options`` registers the model / data / preprocessing / device / output options, and
``build_setup`` turns them into what every analysis needs, the same way for all four commands:

- the model: a name (random weights, seeded), ``--pretrained`` timm weights from the Hugging Face cache,
  or ``--checkpoint`` (a training run directory, its ``model.safetensors``, a ``save_weights`` file or any
  timm checkpoint), rebuilt exactly as it was trained (name, ``model_kwargs``, ``img_size``, classes);
- its data loader, preprocessed as the model's ``pretrained_cfg`` says for pretrained weights
  (``timm.data.resolve_data_config``), as the data set's statistics say otherwise, each field overridable;
- the device and the metadata written into every output (model, weights, preprocessing, classes).

Every option is checked before any model is built or any data is read: bad input is one ``CLIError``.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitscope.cli import CLIError

_logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def _triple(text: str) -> tuple[float, float, float]:
    """``0.5,0.5,0.5`` (one number is repeated over the 3 channels)."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers like 0.485,0.456,0.406, got {text!r}") \
            from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected 3 finite numbers (one per RGB channel), got {text!r}")
    return (values[0], values[1], values[2])


def _default_workers() -> int:
    """timm's train.py / validate.py default (-j 4), at most the CPUs this process may use (torch's suggested
    maximum: more workers than CPUs only contend)."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cpus)


WORKERS = _default_workers()


def add_model_options(
    p: argparse.ArgumentParser,
    *,
    data_required: bool = True,
    split_default: str = "val",
    batch_size: int = 64,
    amp: bool = True,
) -> None:
    """Register ``--model --pretrained --checkpoint --use-ema --data --split -b/--batch-size -j/--workers``, the
    preprocessing overrides (``--img-size`` or timm's ``--input-size C H W``), ``--device`` (and ``--amp``
    ``--amp-dtype`` when the command's work is forward passes), ``--seed`` and ``--out``. ``--data`` has no default
    (what is measured on is always said); ``data_required=False`` for a command with another image source."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="model name: vitscope's (`vitscope models`), timm's with a pretrained tag if "
                   "wanted (vit_base_patch16_224.augreg2_in21k_ft_in1k), or a hub repository hf-hub:ORG/NAME; "
                   "optional with --checkpoint RUN_DIR. Without --pretrained or --checkpoint its weights are "
                   "random (said on stderr, recorded as weights: random)")
    g.add_argument("--pretrained", action="store_true",
                   help="load timm's pretrained weights for --model from the Hugging Face hub cache "
                   "(downloaded on first use; HF_HUB_OFFLINE=1 uses the cache only)")
    g.add_argument("--checkpoint", metavar="RUN_DIR|FILE",
                   help="a vitscope training run directory (or its model.safetensors: the network is rebuilt "
                   "exactly as trained), or local weights (.safetensors, .bin, .pth) for --model")
    g.add_argument("--use-ema", action="store_true",
                   help="load the checkpoint's EMA weights (a run trained with model_ema=true, a timm checkpoint's "
                   "state_dict_ema) instead of its raw ones, as timm's validate.py --use-ema; recorded as ema")
    g.add_argument("--data", required=data_required,
                   help="data spec: elpv (embedded solar-cell images), fake, cifar10:PATH, imagefolder:PATH ...")
    g.add_argument("--split", default=split_default, choices=SPLITS)
    g.add_argument("-b", "--batch-size", type=int, default=batch_size)
    g.add_argument("-j", "--workers", type=int, default=WORKERS,
                   help="data loader worker processes (default: 4 as timm, at most the CPUs available; 0 loads in the "
                   "main process)")
    pre = p.add_argument_group(
        "preprocessing", "auto (default): the model's pretrained_cfg for --pretrained hub weights; for a training "
        "run, what it recorded it was validated with (a fine-tuned run: the model's pretrained_cfg; runs of older "
        "vitscope versions: the data set's statistics at the run's img_size); the data set's statistics otherwise; "
        "each field can be overridden")
    pre.add_argument("--preprocess", default="auto", choices=("auto", "model", "data"),
                     help="model: timm.data.resolve_data_config(model) (size, interpolation, crop_pct, mean/std); "
                     "data: the data set's mean/std at the model's input size")
    pre.add_argument("--img-size", type=int, help="input size (default: the run's or the model's)")
    pre.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                     help="timm's spelling of the input size: 3 S S (square RGB inputs)")
    pre.add_argument("--mean", type=_triple, help="normalization mean, e.g. 0.485,0.456,0.406")
    pre.add_argument("--std", type=_triple, help="normalization std, e.g. 0.229,0.224,0.225")
    pre.add_argument("--interpolation", choices=INTERPOLATIONS, help="resize interpolation")
    pre.add_argument("--crop-pct", type=float, help="center-crop fraction (resize to size / crop_pct, then crop)")
    dev = p.add_argument_group("device")
    dev.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda, "
                     "cuda:1 ...")
    if amp:
        add_amp_options(dev)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")


def add_amp_options(p: Any) -> None:
    """``--amp [bf16|fp16]`` and timm's ``--amp-dtype bfloat16|float16`` (folded by ``check_amp``)."""
    from vitscope.runtime import AMP_DTYPES

    p.add_argument("--amp", nargs="?", const="bf16", default="none", choices=tuple(AMP_DTYPES),
                   help="run the forward passes under torch.autocast in bfloat16 (--amp alone or --amp bf16) or "
                   "float16 (--amp fp16; CUDA, or a CPU where this torch autocasts to it); the measures themselves are "
                   "reduced in float32/64; recorded as amp and precision")
    p.add_argument("--amp-dtype", choices=("bfloat16", "float16"),
                   help="timm's spelling: --amp-dtype bfloat16|float16 is --amp bf16|fp16")


def check_amp(args: argparse.Namespace, device: Any) -> None:
    """Fold ``--amp-dtype`` into ``--amp`` (a contradiction is an error) and refuse a precision torch cannot autocast
    to on ``device``, before any work."""
    from vitscope.runtime import AMP_DTYPES, amp_name, check_autocast

    given = getattr(args, "amp_dtype", None)
    if given:
        want = amp_name(given)
        if args.amp not in ("none", want):
            raise CLIError(f"--amp {args.amp} contradicts --amp-dtype {given}; pass one of them")
        args.amp = want
    try:
        check_autocast(device, AMP_DTYPES[getattr(args, "amp", "none")])
    except ValueError as err:
        raise CLIError(f"--amp {args.amp}: {err}") from None


def precision(args: argparse.Namespace) -> str:
    """The floating-point type the forward passes run in, as training records it (``precision``)."""
    from vitscope.runtime import AMP_DTYPES

    return str(AMP_DTYPES[getattr(args, "amp", "none")] or "float32").removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# Checks done before any work


def check_positive(**values: int | None) -> None:
    """``--name`` must be a positive integer (keyword names use ``_`` for ``-``)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def check_out(out: str) -> Path:
    """``--out`` must be a directory or a path that can become one (no file at it or above it)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {out} is an existing file; --out names an output directory: choose another path")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"--out {out}: {parent} is a file, so no directory can be made under it; "
                               "choose another path")
            break
    return path


def check_preprocess_options(args: argparse.Namespace) -> None:
    """``--img-size`` (or ``--input-size``, folded into it), ``--crop-pct`` and ``--std`` in range."""
    size = getattr(args, "input_size", None)
    if size is not None:
        c, h, w = size
        if c != 3 or h != w:
            raise CLIError(f"--input-size {c} {h} {w}: vitscope takes square RGB inputs, 3 S S")
        if args.img_size is not None and args.img_size != h:
            raise CLIError(f"--input-size {c} {h} {w} contradicts --img-size {args.img_size}; pass one of them")
        args.img_size = h
    if args.img_size is not None and args.img_size < 1:
        raise CLIError(f"--img-size must be a positive integer, got {args.img_size}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise CLIError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.std is not None and min(args.std) <= 0:
        raise CLIError(f"--std must be positive, got {list(args.std)}")


def resolve_device(name: str | None) -> Any:
    """``torch.device`` for ``--device`` (``vitscope.runtime.resolve_device``: ``auto`` or None is cuda when
    available); a missing CUDA device is an error."""
    from vitscope.runtime import resolve_device as resolve

    try:
        return resolve(name, "--device")
    except ValueError as err:
        raise CLIError(str(err)) from None


def autocast(args: argparse.Namespace, device: Any) -> Any:
    """``vitscope.runtime.autocast`` on ``device`` in ``--amp``'s dtype, a no-op context for ``--amp none``."""
    from vitscope.runtime import AMP_DTYPES
    from vitscope.runtime import autocast as amp

    return amp(device, AMP_DTYPES[getattr(args, "amp", "none")])


# ----------------------------------------------------------------------------------------------
# The model


def run_spec(checkpoint: str) -> dict[str, Any] | None:
    """What builds the network of a training run for ``--checkpoint`` = the run directory or a weights file in
    it (``vitscope.io.runs.find_run_spec``); ``None`` for a weights file outside a run directory."""
    from vitscope.io.runs import find_run_spec

    try:
        return find_run_spec(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(f"--checkpoint {checkpoint}: {err}") from None


def _arch(name: str) -> str:
    return name.split(".", 1)[0]


def build_model(args: argparse.Namespace, num_data_classes: int) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode on the CPU, the meta describing it) for ``--model/--pretrained/--checkpoint``."""
    import torch

    from vitscope.io.checkpoints import load_model
    from vitscope.io.weights import read_sidecar

    use_ema = bool(getattr(args, "use_ema", False))  # commands without --use-ema (compare) load the raw weights
    spec = run_spec(args.checkpoint) if args.checkpoint else None
    if args.checkpoint and spec is None and not Path(args.checkpoint).expanduser().is_file():
        raise CLIError(f"--checkpoint {args.checkpoint}: no such file or run directory")
    if args.pretrained and args.checkpoint:
        raise CLIError("--pretrained loads timm's hub weights and --checkpoint local ones: pass only one")
    if spec is None and args.checkpoint:  # a save_weights file knows its model too
        side = read_sidecar(args.checkpoint)
        if side and side.get("model_name"):
            kwargs = dict(side.get("model_kwargs") or {})
            spec = {"model": side["model_name"], "model_kwargs": kwargs, "img_size": kwargs.get("img_size"),
                    "weights": Path(args.checkpoint).expanduser(), "sidecar": True}
    if spec is not None:
        if args.model and _arch(args.model) != _arch(spec["model"]):
            raise CLIError(f"--model {args.model} contradicts --checkpoint {args.checkpoint}, which holds a "
                           f"{spec['model']}; drop --model (the checkpoint says what to build)")
        if args.img_size and spec.get("img_size") and args.img_size != spec["img_size"]:
            raise CLIError(f"--img-size {args.img_size} contradicts --checkpoint {args.checkpoint}, trained at "
                           f"{spec['img_size']} px; drop --img-size")
        if spec.get("sidecar"):
            from vitscope.io.weights import load_weights

            if use_ema:
                raise CLIError(f"--use-ema: {args.checkpoint} is a save_weights file, which holds one set of weights; "
                               "drop --use-ema")
            model = load_weights(spec["weights"])  # rebuilt from the sidecar, head inferred when not recorded
        else:
            from vitscope.io.runs import load_run_model

            model, _ = load_run_model(spec, ema=use_ema)
        meta = {"model": spec["model"], "model_kwargs": spec.get("model_kwargs") or {},
                "checkpoint": str(spec["weights"]), "pretrained": bool(spec.get("pretrained", False)),
                "img_size": spec.get("img_size"), "trained_on": spec.get("data"),
                "trained_preprocessing": spec.get("preprocessing")}
    elif not args.model:
        raise CLIError("--model is required (or --checkpoint RUN_DIR, which names its model)")
    elif args.pretrained:
        if use_ema:
            raise CLIError("--use-ema chooses among a --checkpoint's weights; hub weights are one set: drop --use-ema")
        model = load_model(args.model, pretrained=True, img_size=args.img_size)  # a ViT's grid resampled by timm
        meta = {"model": args.model, "pretrained": True, "checkpoint": None,
                "hf_hub_id": model.pretrained_cfg.get("hf_hub_id")}
    else:
        torch.manual_seed(args.seed)  # a model without weights gets the same random weights every run
        kwargs = {} if args.checkpoint else {"num_classes": num_data_classes}
        if use_ema and not args.checkpoint:
            raise CLIError("--use-ema chooses among a --checkpoint's weights; there is none")
        model = load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size, use_ema=use_ema,
                           **kwargs)  # no checkpoint: random weights, said on stderr by load_model
        meta = {"model": args.model, "pretrained": False, "checkpoint": args.checkpoint}
    meta["weights"] = "checkpoint" if meta["checkpoint"] else "pretrained" if meta["pretrained"] else "random"
    meta["ema"] = bool(use_ema)
    meta["num_classes"] = int(getattr(model, "num_classes", 0) or 0)
    return model.eval(), meta


def check_classes(model_classes: int, data_classes: int, data: str, what: str) -> str | None:
    """A model with fewer outputs than the data's classes is an error (labels out of range); with more, a loud
    warning (legit for an ImageNet model on a folder of ImageNet classes); returns the warning."""
    if model_classes == 0 or model_classes == data_classes:
        return None
    if model_classes < data_classes:
        raise CLIError(f"{what} has {model_classes} classes but --data {data} has {data_classes}: labels would "
                       "be out of range; analyse it on the data it was trained on (or a set with as many classes)")
    msg = (f"{what} has {model_classes} classes but --data {data} has {data_classes}: accuracy and loss count "
           f"data label i as model class i, which is right only if the data's classes are the first "
           f"{data_classes} of the model's (or the folder follows its class order)")
    _logger.warning("CLASS MISMATCH: %s", msg)
    return msg


# ----------------------------------------------------------------------------------------------
# Preprocessing


def resolve_preprocessing(args: argparse.Namespace, model: Any, model_meta: dict[str, Any], info: Any,
                          data: Any = None) -> dict:
    """The eval preprocessing: ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``
    and ``source``, then the user's overrides. ``source`` is ``model`` (timm's ``resolve_data_config(model=model)``,
    the default for ``--pretrained`` hub weights), ``data`` (the data set's statistics at the model's or the run's
    input size: the default for a run that recorded no preprocessing, as older ``vitscope train`` validated) or
    ``run`` (the ``preprocessing`` a run recorded: what ``vitscope train`` validated it with)."""
    from vitscope.data.preprocessing import resolve_preprocessing as resolve

    mode = args.preprocess
    trained = model_meta.get("img_size")  # a checkpoint's network was built for this size
    recorded = model_meta.get("trained_preprocessing")  # what a run recorded it trained with, if it did
    if mode == "auto" and isinstance(recorded, dict) and "mean" in recorded:
        mode = "run"
    elif mode == "auto":  # hub weights: the model's own; a run without a record: the data's, as it was trained
        mode = "model" if model_meta.get("pretrained") and not model_meta.get("checkpoint") else "data"
    base = None
    if mode == "data":
        size = trained or model.pretrained_cfg.get("input_size", (3, info.img_size, info.img_size))[-1]
        base = {"input_size": (3, size, size), "interpolation": "bilinear", "mean": tuple(info.mean),
                "std": tuple(info.std), "crop_pct": _native_crop(args.data if data is None else data),
                "crop_mode": "center"}
    overrides = {"input_size": (3, args.img_size, args.img_size) if args.img_size else None,
                 "mean": args.mean, "std": args.std, "interpolation": args.interpolation, "crop_pct": args.crop_pct}
    return resolve(mode, model=model, data=base, recorded=recorded, img_size=trained, overrides=overrides)


def _native_crop(data: Any) -> float:  # a spec string or a parsed DataSpec
    from vitscope.data.factory import _native, _resolve

    return float(_native(_resolve(data, None, {}))["crop_pct"])


# ----------------------------------------------------------------------------------------------
# Everything together


@dataclass
class Setup:
    """What an analysis command works with."""

    model: Any  # nn.Module in eval mode on ``device``
    loader: Any  # DataLoader of (images (B, 3, S, S), labels (B,))
    device: Any  # torch.device
    preprocessing: dict[str, Any]  # see resolve_preprocessing
    meta: dict[str, Any] = field(default_factory=dict)  # written into every output
    dist: Any = None  # vitscope.distributed.DistInfo under torchrun (rank 0 alone writes)

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def img_size(self) -> int:
        return int(self.preprocessing["input_size"][-1])


def build_setup(
    args: argparse.Namespace,
    *,
    augment: bool = False,
    normalize: bool = True,
    max_examples: int | None = None,
    needs_logits: bool = False,
) -> Setup:
    """Model, loader, device and metadata from the options of ``add_model_options``.

    Args:
        augment: the data set's training augmentation (``hessian --augment``).
        normalize: ``False`` gives pixels in [0, 1] (robustness normalizes inside its attacks).
        max_examples: a seeded random subset of this many examples.
        needs_logits: the analysis takes a loss of class logits (hessian, landscape, robustness): a model without a
            classifier head (timm's ``num_classes=0``, e.g. DINOv3's tags) is refused in one line.
    """
    from vitscope.data import create_loader, data_info, parse_spec

    check_positive(batch_size=args.batch_size)
    if args.workers < 0:
        raise CLIError(f"--workers must be >= 0, got {args.workers}")
    check_preprocess_options(args)
    check_out(args.out)
    device = resolve_device(args.device)
    check_amp(args, device)
    from vitscope.distributed import init_from_env, rank_device

    dist = init_from_env(device)  # torchrun: join the group; the analyses shard batches over it
    device = rank_device(device, dist)
    data = parse_spec(args.data)  # parsed once here; the data functions below take the DataSpec
    info = data_info(data)
    model, meta = build_model(args, info.num_classes)
    what = f"--checkpoint {args.checkpoint}" if args.checkpoint else f"model {meta['model']}"
    if needs_logits and meta["num_classes"] == 0:
        raise CLIError(f"{what} has no classifier head (num_classes 0: a feature backbone, which outputs features, "
                       "not class logits); this analysis needs a loss over classes: pick a tag with a head or "
                       "fine-tune it first (vitscope train --pretrained)")
    mismatch = check_classes(meta["num_classes"], info.num_classes, args.data, what)
    pre = resolve_preprocessing(args, model, meta, info, data)
    loader = create_loader(data, split=args.split, batch_size=args.batch_size, augment=augment,
                           normalize=normalize, seed=args.seed, max_examples=max_examples,
                           num_workers=args.workers, preprocessing=pre)
    model = model.to(device)
    meta.update(data=args.data, split=args.split, data_classes=info.num_classes, preprocessing=pre,
                device=str(device), amp=getattr(args, "amp", "none"), precision=precision(args),
                seed=args.seed, workers=args.workers)
    if mismatch:
        meta["class_mismatch"] = mismatch
    meta["world_size"] = dist.world_size
    return Setup(model=model, loader=loader, device=device, preprocessing=pre, meta=meta, dist=dist)


class ToDevice:
    """Iterate a loader moving each batch to ``device``."""

    def __init__(self, loader: Any, device: Any) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        for x, y in self.loader:
            yield x.to(self.device), y.to(self.device)


def add_linear_probe_options(p: argparse.ArgumentParser) -> None:
    """``--shots``, ``--ridge``, ``--fit-split``: the few-shot probes of ``probe`` and ``compare`` (RAGHU Sec. 6)."""
    p.add_argument("--shots", default="10,25", help="linear_probe: fit examples per class, comma-separated "
                   "(RAGHU: 10,25)")
    p.add_argument("--ridge", type=float, default=1.0,
                   help="linear_probe: ridge strength relative to each layer's mean feature variance (x n)")
    p.add_argument("--fit-split", default="train", choices=SPLITS, help="linear_probe: where the fit examples come "
                   "from (the first SHOTS of each class in a seeded order)")


def parse_shots(text: str) -> list[int]:
    """``--shots 10,25`` as sorted positive integers (one ``CLIError`` otherwise)."""
    try:
        shots = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        shots = []
    if not shots or shots[0] < 1:
        raise CLIError(f"--shots must be comma-separated positive integers, got {text!r}")
    return shots


def few_shot_loaders(args: argparse.Namespace, preprocessings: list[dict[str, Any]], shots: list[int]) -> tuple:
    """The linear probes' fit loaders, one per preprocessing, over the same examples: ``max(shots)`` per class of
    ``--fit-split`` (a seeded per-class draw, ``vitscope.data.subsample.first_per_class``), in a fixed order."""
    from torch.utils.data import DataLoader, Subset

    from vitscope.data import create_dataset
    from vitscope.data.factory import dataset_targets
    from vitscope.data.local import collate_skipping_none
    from vitscope.data.subsample import first_per_class

    if args.fit_split == args.split:
        _logger.warning("linear_probe: --fit-split and --split are both %r: the probes are scored on examples that "
                        "include their fit examples (not held out)", args.split)
    dsets = [create_dataset(args.data, split=args.fit_split, preprocessing=pre) for pre in preprocessings]
    idx = first_per_class(dataset_targets(dsets[0]), max(shots), seed=args.seed).tolist()
    _logger.info("linear_probe: %d fit examples (%s per class) from the %s split, ridge %g (relative), scored on "
                 "the %s split", len(idx), max(shots), args.fit_split, args.ridge, args.split)
    return tuple(DataLoader(Subset(ds, idx), batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                            collate_fn=collate_skipping_none) for ds in dsets)
