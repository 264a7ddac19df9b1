"""Center occlusion (CB, Hyeon-Woo et al. 2023): zero the central square of each image in pixel space."""
from __future__ import annotations

import torch

from vitscope.robustness._checks import check_images

__all__ = ["occlude_center", "occlusion_box"]


def occlusion_box(height: int, width: int, fraction: float = 0.5) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the centred box covering ``fraction`` of each side.

    The side is ``round(fraction * side)`` pixels (CB: 112 of 224 at fraction 0.5; 16 of 32), offset
    ``(side - box) // 2`` from the top/left.
    """
    if not (0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be in [0, 1] (fraction of each side), got {fraction}")
    bh, bw = round(fraction * height), round(fraction * width)
    top, left = (height - bh) // 2, (width - bw) // 2
    return top, top + bh, left, left + bw


def occlude_center(images: torch.Tensor, fraction: float = 0.5, value: float = 0.0) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] with the central ``fraction x fraction`` square set to ``value``.

    CB's protocol: the central 112 x 112 of a 224 x 224 image zeroed in pixel space (before
    normalization), scaled with resolution. Returns a new tensor.
    """
    images = check_images(images)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"value must be a pixel value in [0, 1], got {value}")
    top, bottom, left, right = occlusion_box(images.shape[-2], images.shape[-1], fraction)
    out = images.clone()
    out[..., top:bottom, left:right] = value  # (B, C, bh, bw)
    return out
