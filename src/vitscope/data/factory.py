"""``create_dataset``, ``create_loader`` and ``data_info`` for a data spec string.

See ``vitscope.data.specs`` for the syntax and ``vitscope.data.local``/``elpv``/``fake`` for each set.
Options common to the path sets: ``val_fraction`` (default 0: ``val`` is the official test set;
``F > 0``: ``val`` is a seeded per-class ``F`` slice of the train set, removed from ``train``) and
``split_seed`` (0). ``cifar100`` also takes ``labels=coarse``; ``imagefolder`` takes ``crop_pct`` and
``labels=imagenet`` (synset folders get their ImageNet-1k indices), ``check=false`` (no header scan of every
image up front, ~0.1 ms a file; see ``vitscope.data.local``) and ``max_pixels=N`` (images declaring more pixels
are skipped and counted with the unreadable ones; default PIL's ``Image.MAX_IMAGE_PIXELS``, 89,478,485).
Every spec accepts ``img_size=S`` in place of the ``img_size`` argument.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vitscope.data import local
from vitscope.data.specs import DataSpec, check_options, parse_spec
from vitscope.data.subsample import subsample_per_class
from vitscope.data.transforms import IMAGEFOLDER_DEFAULTS, SMALL_DEFAULTS, build_transform

_logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_PATH_OPTIONS: dict[str, Any] = {"val_fraction": 0.0, "split_seed": 0}


@dataclass(frozen=True, kw_only=True)
class DataInfo:
    """What a model needs to know about a data set (at the resolved ``img_size``)."""

    name: str
    num_classes: int
    in_chans: int = 3
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...] | None = None


@dataclass
class _Resolved:
    spec: DataSpec
    img_size: int | None
    options: dict[str, Any]


def _resolve(spec: str | DataSpec, img_size: int | None, spec_options: dict[str, Any]) -> _Resolved:
    parsed = parse_spec(spec, **spec_options)
    options = dict(parsed.options)
    spec_size = options.pop("img_size", None)
    size = img_size if img_size is not None else spec_size
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ValueError(f"img_size must be a positive integer, got {size!r}")
    return _Resolved(parsed, size, options)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _native(r: _Resolved) -> dict[str, Any]:
    """num_classes, native img_size (None if it varies), mean, std, class_names, augment defaults, crop_pct."""
    name, opts = r.spec.name, r.options
    if name == "fake":
        from vitscope.data.fake import fake_info

        return {**fake_info(**opts), "defaults": SMALL_DEFAULTS, "crop_pct": 1.0}
    if name == "elpv":
        from vitscope.data.elpv import elpv_info

        info = elpv_info(img_size=r.img_size, **opts)
        return {**info, "defaults": SMALL_DEFAULTS, "crop_pct": 1.0}
    if name in ("cifar10", "cifar100"):
        check_options(name, opts, {**_PATH_OPTIONS, **({"labels": "fine"} if name == "cifar100" else {})})
        if name == "cifar10":
            return dict(num_classes=10, img_size=32, mean=local.CIFAR10_MEAN, std=local.CIFAR10_STD,
                        class_names=CIFAR10_CLASSES, defaults=SMALL_DEFAULTS, crop_pct=1.0)
        labels = opts.get("labels", "fine")
        if labels not in ("fine", "coarse"):
            raise ValueError(f"cifar100: labels must be 'fine' or 'coarse', got {labels!r}")
        return dict(num_classes=100 if labels == "fine" else 20, img_size=32, mean=local.CIFAR100_MEAN,
                    std=local.CIFAR100_STD, class_names=local.cifar100_class_names(r.spec.path, labels),
                    defaults=SMALL_DEFAULTS, crop_pct=1.0)
    if name in ("mnist", "fashion_mnist"):
        check_options(name, opts, _PATH_OPTIONS)
        mnist = name == "mnist"
        classes = local.datasets.MNIST.classes if mnist else local.datasets.FashionMNIST.classes
        return dict(num_classes=10, img_size=28, mean=local.MNIST_MEAN if mnist else local.FASHION_MEAN,
                    std=local.MNIST_STD if mnist else local.FASHION_STD, class_names=tuple(classes),
                    defaults={**SMALL_DEFAULTS, "hflip": 0.0} if mnist else SMALL_DEFAULTS, crop_pct=1.0)
    if name == "imagefolder":
        opts = check_options(name, opts, {**_PATH_OPTIONS, "crop_pct": 0.875, "labels": "folders",
                                               "check": True, "max_pixels": None})
        _check_max_pixels(opts["max_pixels"])
        classes = local.imagefolder_classes(r.spec.path, opts["labels"])
        return dict(num_classes=len(classes), img_size=None, mean=local.IMAGENET_MEAN, std=local.IMAGENET_STD,
                    class_names=tuple(classes), defaults=IMAGEFOLDER_DEFAULTS, crop_pct=opts["crop_pct"])
    raise AssertionError(name)  # parse_spec rejects unknown names


def _check_max_pixels(value: Any) -> int | None:
    """The imagefolder option ``max_pixels``: a positive integer (None: PIL's ``Image.MAX_IMAGE_PIXELS``)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"imagefolder: max_pixels must be a positive integer (pixels per image), got {value!r}")
    return value


def _info(r: _Resolved, native: dict[str, Any]) -> DataInfo:
    size = r.img_size or native["img_size"] or 224
    names = native["class_names"]
    return DataInfo(
        name=r.spec.name, num_classes=native["num_classes"], in_chans=3, img_size=size,
        mean=tuple(native["mean"]), std=tuple(native["std"]), class_names=tuple(names) if names else None,
    )


def data_info(spec: str | DataSpec, img_size: int | None = None, **spec_options: Any) -> DataInfo:
    """Classes, channels, image size and normalisation of the data set named by ``spec``."""
    r = _resolve(spec, img_size, spec_options)
    return _info(r, _native(r))


def data_preprocessing(spec: str | DataSpec, img_size: int | None = None, **spec_options: Any) -> dict[str, Any]:
    """The data set's own eval preprocessing in timm's data-config keys (``input_size``, ``interpolation``,
    ``mean``, ``std``, ``crop_pct``, ``crop_mode``): what ``create_dataset`` uses when given no ``preprocessing``."""
    r = _resolve(spec, img_size, spec_options)
    native = _native(r)
    info = _info(r, native)
    return {"input_size": (3, info.img_size, info.img_size), "interpolation": "bilinear", "mean": tuple(info.mean),
            "std": tuple(info.std), "crop_pct": float(native["crop_pct"]), "crop_mode": "center"}


def dataset_targets(ds: Dataset) -> list[int]:
    """Integer labels of ``ds`` (a vitscope/torchvision data set or a ``Subset`` of one) without loading images."""
    if isinstance(ds, Subset):
        base = dataset_targets(ds.dataset)
        return [base[i] for i in ds.indices]
    targets = getattr(ds, "targets", None)
    if targets is None:
        raise ValueError(f"{type(ds).__name__} has no .targets; cannot subsample it per class")
    return [int(t) for t in (targets.tolist() if torch.is_tensor(targets) else targets)]


def _base_dataset(r: _Resolved, split: str, download: bool) -> Dataset:
    name, path, opts = r.spec.name, r.spec.path, dict(r.options)
    if name == "fake":
        from vitscope.data.fake import make_fake

        return make_fake(split, **opts)
    if name == "elpv":
        from vitscope.data.elpv import make_elpv

        return make_elpv(split, img_size=r.img_size, **opts)
    val_fraction = float(opts.pop("val_fraction", 0.0))
    split_seed = int(opts.pop("split_seed", 0))
    if not 0 <= val_fraction < 1:
        raise ValueError(f"{name}: val_fraction must be in [0, 1), got {val_fraction}")
    holdout = val_fraction > 0 and split in ("train", "val")
    source = "train" if holdout else split
    if name in ("cifar10", "cifar100"):
        ds = local.make_cifar(name, path, source, download=download, coarse=opts.get("labels") == "coarse")
    elif name in ("mnist", "fashion_mnist"):
        ds = local.make_mnist(name, path, source, download=download)
    else:
        if download:
            raise ValueError("imagefolder cannot be downloaded; point the spec at a local folder")
        ds = local.make_imagefolder(path, "train" if holdout else split, labels=opts.get("labels", "folders"),
                                    check=bool(opts.get("check", True)),
                                    max_pixels=_check_max_pixels(opts.get("max_pixels")))
    if not holdout:
        return ds
    targets = dataset_targets(ds)
    val_idx = subsample_per_class(targets, val_fraction, seed=split_seed)
    if split == "val":
        return Subset(ds, val_idx.tolist())
    train_idx = np.setdiff1d(np.arange(len(targets)), val_idx)
    return Subset(ds, train_idx.tolist())


def create_dataset(
    spec: str | DataSpec,
    split: str = "train",
    img_size: int | None = None,
    augment: bool | dict[str, Any] = False,
    normalize: bool = True,
    download: bool = False,
    preprocessing: dict[str, Any] | None = None,
    **spec_options: Any,
) -> Dataset:
    """The ``split`` of the data set named by ``spec``, yielding ``(image (3, S, S) float, label int)``.

    Args:
        img_size: output size S (default: the set's own size; 64 for elpv, 224 for ImageFolder).
        augment: training augmentation (only for ``split="train"``): ``True`` for the set's default
            (CIFAR-style pad-4 crop + flip; timm's random-resized crop for ImageFolder) or a dict of
            timm ``create_transform`` options (``auto_augment``, ``re_prob``, ``crop``, ...).
        normalize: subtract mean / divide std; ``False`` gives pixels in [0, 1].
        download: let torchvision fetch a missing CIFAR/MNIST copy into PATH.
        preprocessing: a model's eval preprocessing in timm's data-config keys (``input_size``,
            ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``; e.g.
            ``timm.data.resolve_data_config(model=model)``), replacing the data set's own; it sets the size
            and mean/std of the training augmentation too. ``img_size`` must then be None or agree.
    """
    _check_split(split)
    pre = _check_preprocessing(preprocessing, img_size)
    r = _resolve(spec, pre["input_size"][-1] if pre else img_size, spec_options)
    native = _native(r)
    info = _info(r, native)
    ds = _base_dataset(r, split, download)
    base = ds.dataset if isinstance(ds, Subset) else ds
    view = dict(mean=info.mean, std=info.std, crop_pct=native["crop_pct"])
    if pre:
        view = dict(mean=pre["mean"], std=pre["std"], crop_pct=pre.get("crop_pct", 1.0),
                    interpolation=pre.get("interpolation", "bilinear"), crop_mode=pre.get("crop_mode", "center"))
    base.transform = build_transform(
        info.img_size, native["img_size"], train=split == "train", augment=augment, normalize=normalize,
        defaults=native["defaults"], **view,
    )
    return ds


def _check_preprocessing(pre: dict[str, Any] | None, img_size: int | None) -> dict[str, Any] | None:
    """``preprocessing`` with its required keys checked (``input_size``, ``mean``, ``std``)."""
    if pre is None:
        return None
    missing = [k for k in ("input_size", "mean", "std") if k not in pre]
    if missing:
        raise ValueError(f"preprocessing lacks {missing}; pass timm.data.resolve_data_config(model=model)")
    size = pre["input_size"]
    if len(size) != 3 or size[-1] != size[-2]:
        raise ValueError(f"preprocessing input_size must be (3, S, S), got {tuple(size)}")
    if img_size is not None and img_size != size[-1]:
        raise ValueError(f"img_size={img_size} contradicts preprocessing input_size {tuple(size)}; pass one")
    return dict(pre)


def create_loader(
    spec: str | DataSpec,
    split: str = "train",
    batch_size: int = 64,
    img_size: int | None = None,
    augment: bool | dict[str, Any] = False,
    normalize: bool = True,
    num_workers: int = 0,
    shuffle: bool | None = None,
    seed: int = 0,
    max_examples: int | None = None,
    distributed: bool = False,
    download: bool = False,
    drop_last: bool = False,
    fraction: float | None = None,
    preprocessing: dict[str, Any] | None = None,
    **spec_options: Any,
) -> DataLoader:
    """A DataLoader over ``create_dataset(...)`` yielding ``(images (B, 3, S, S) float, labels (B,) long)``.

    Args:
        shuffle: default ``True`` for ``train``, ``False`` otherwise; seeded by ``seed``.
        max_examples: keep a seeded random subset of this many examples (in data set order).
        fraction: keep a seeded ``fraction`` of every class first (ConViT's sample-efficiency protocol;
            pair it with ``steps_constant_epochs``).
        preprocessing: a model's eval preprocessing (see ``create_dataset``).
        distributed: shard with a seeded ``DistributedSampler`` when torch.distributed is initialised
            (call ``loader.sampler.set_epoch(epoch)`` each epoch; without ``drop_last`` it pads the
            last shard with repeated examples, so exact evaluation should gather per-example results).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = create_dataset(spec, split=split, img_size=img_size, augment=augment, normalize=normalize,
                        download=download, preprocessing=preprocessing, **spec_options)
    if fraction is not None and fraction < 1:
        ds = Subset(ds, subsample_per_class(dataset_targets(ds), fraction, seed=seed).tolist())
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        if max_examples < len(ds):
            keep = np.sort(np.random.default_rng(seed).choice(len(ds), size=max_examples, replace=False))
            ds = Subset(ds, keep.tolist())
    if shuffle is None:
        shuffle = split == "train"
    sampler = None
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = torch.utils.data.DistributedSampler(ds, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif distributed:
        _logger.warning("distributed=True but torch.distributed is not initialised; loading all the data")
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(
        ds, batch_size=batch_size, shuffle=bool(shuffle) and sampler is None, sampler=sampler,
        num_workers=num_workers, drop_last=drop_last, generator=generator,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
        collate_fn=local.collate_skipping_none,  # drops images an ImageFolder could not decode
    )
