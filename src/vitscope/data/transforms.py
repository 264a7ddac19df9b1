"""Image transforms for every data set, built with timm's ``create_transform``.

Every data set hands a PIL image to the transform (the in-memory sets ``elpv`` and ``fake`` too),
so one pipeline serves all. Eval: resize + center crop (``crop_pct`` 1.0 for the small sets, so a
32 px CIFAR image is left untouched at 32 px; 0.875 for ImageFolder) + to-tensor + normalize.
Train with ``augment``: the crop is either timm's (``rrc``/``rkrc``/``rkrr``) or ``pad``, the random
crop with zero padding 4 plus horizontal flip used for CIFAR by HDVW (Park & Kim 2022); the rest
(RandAugment string, color jitter, random erasing) is timm's. ``normalize=False`` gives float
tensors in [0, 1].
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

# The keys an ``augment`` dict may hold (timm's create_transform names, plus ``crop`` and ``padding``).
AUGMENT_KEYS = (
    "crop", "padding", "scale", "ratio", "hflip", "vflip", "color_jitter", "auto_augment", "interpolation",
    "re_prob", "re_mode", "re_count",
)
SMALL_DEFAULTS: dict[str, Any] = {"crop": "pad", "padding": 4, "hflip": 0.5, "color_jitter": None}
IMAGEFOLDER_DEFAULTS: dict[str, Any] = {"crop": "rrc", "hflip": 0.5, "color_jitter": 0.4}


class ToRGB:
    """PIL image -> RGB (grayscale repeated to 3 channels); RGB images pass unchanged."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, keeping its meaning at 0 bits (a black image): Pillow >= 11 rejects bits < 1."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(tfs: list[Any]) -> None:
    """Route timm's (Rand/Auto/AugMix) posterize ops through ``_posterize`` (RandAugment ``inc1`` at
    magnitude 10 asks for 0 bits, which raises in recent Pillow)."""
    for t in tfs:
        ops = list(getattr(t, "ops", []) or []) + [op for sub in getattr(t, "policy", []) or [] for op in sub]
        for op in ops:
            if getattr(op, "aug_fn", None) is timm_aa.posterize:
                op.aug_fn = _posterize


def augment_options(augment: bool | dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any] | None:
    """Resolve ``augment`` (False/None: none, True: ``defaults``, dict: ``defaults`` updated by it)."""
    if augment is None or augment is False:
        return None
    if augment is True:
        return dict(defaults)
    if not isinstance(augment, dict):
        raise ValueError(f"augment must be a bool or a dict of {AUGMENT_KEYS}, got {type(augment).__name__}")
    opts = dict(augment)
    if "train_crop_mode" in opts:  # timm's name for the crop
        opts["crop"] = opts.pop("train_crop_mode")
    unknown = sorted(set(opts) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"unknown augment option(s) {unknown}; valid: {list(AUGMENT_KEYS)}")
    return {**defaults, **opts}


def build_transform(
    img_size: int,
    native_size: int | None,
    train: bool,
    augment: bool | dict[str, Any] | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    normalize: bool = True,
    defaults: dict[str, Any] | None = None,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    crop_mode: str = "center",
) -> Callable[[Image.Image], Any]:
    """PIL image -> float tensor (3, img_size, img_size).

    Args:
        native_size: the data set's own image size (``None`` if it varies); ``pad`` crops resize to
            ``img_size`` first when it differs.
        train: use ``augment`` (eval transform otherwise, or when ``augment`` is falsy).
        defaults: what ``augment=True`` means for this data set.
        crop_pct: eval center-crop fraction (timm's ``crop_pct``).
        interpolation, crop_mode: eval resize interpolation and crop mode (timm's names; a pretrained model's
            ``resolve_data_config`` gives both). The training augmentation keeps its own interpolation.
    """
    opts = augment_options(augment, defaults or SMALL_DEFAULTS) if train else None
    norm_mean, norm_std = (mean, std) if normalize else ((0.0,) * 3, (1.0,) * 3)
    if opts is None:
        tf = create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                              crop_mode=crop_mode, mean=norm_mean, std=norm_std)
        return transforms.Compose([ToRGB(), *tf.transforms])
    crop = opts.pop("crop", "pad")
    padding = opts.pop("padding", 4)
    re = {k: opts.pop(k) for k in ("re_prob", "re_mode", "re_count") if k in opts}
    if crop not in ("pad", "rrc", "rkrc", "rkrr"):
        raise ValueError(f"augment crop must be 'pad', 'rrc', 'rkrc' or 'rkrr', got {crop!r}")
    try:
        primary, secondary, _ = create_transform(
            img_size, is_training=True, separate=True, train_crop_mode=None if crop == "pad" else crop,
            mean=mean, std=std, **opts,  # mean sets the RandAugment fill colour
        )
    except (AssertionError, KeyError, TypeError) as e:  # timm asserts on unknown policy strings
        raise ValueError(f"bad augment options {opts}: {e} (see timm.data.create_transform)") from e
    _patch_posterize(secondary.transforms)
    first: list[Any] = list(primary.transforms)
    if crop == "pad":
        resize = [] if native_size == img_size else [transforms.Resize(img_size), transforms.CenterCrop(img_size)]
        first = [*resize, transforms.RandomCrop(img_size, padding=padding), *first[1:]]  # first[1:] = flips
    final: list[Any] = [transforms.ToTensor(), transforms.Normalize(norm_mean, norm_std)]
    if re.get("re_prob", 0) > 0:
        final.append(RandomErasing(re["re_prob"], mode=re.get("re_mode", "const"),
                                   max_count=re.get("re_count", 1), device="cpu"))
    return transforms.Compose([ToRGB(), *first, *secondary.transforms, *final])
