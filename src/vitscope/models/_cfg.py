"""Default timm pretrained-config entries for vitscope's models (none ship weights)."""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def cfg(img_size: int = 224, first_conv: str = "patch_embed.proj", classifier: str = "head", **kwargs: Any) -> dict:
    """A timm pretrained_cfg with no weights; 32-pixel models get CIFAR statistics and 100 classes."""
    small = img_size <= 64
    return {
        "url": "",
        "num_classes": 100 if small else 1000,
        "input_size": (3, img_size, img_size),
        "pool_size": None,
        "crop_pct": 1.0 if small else 0.9,
        "interpolation": "bicubic",
        "mean": CIFAR_MEAN if small else IMAGENET_DEFAULT_MEAN,
        "std": CIFAR_STD if small else IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        "license": "apache-2.0",
        **kwargs,
    }
