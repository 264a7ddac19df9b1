"""Input checks shared by the robustness measures: pixel-space images and matching labels."""
from __future__ import annotations

import torch


def check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Require a float (B, C, H, W) batch in [0, 1] pixel space; returns it detached."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(images).__name__}")
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor of shape (B, C, H, W), got {tuple(images.shape)} {images.dtype}"
        )
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            raise ValueError(
                f"{name} must be in [0, 1] pixel space, got values in [{lo:.4g}, {hi:.4g}]; load data with "
                "normalize=False (e.g. create_loader(spec, normalize=False)) and let the measure apply the "
                "model's mean/std"
            )
    return images.detach()


def check_targets(targets: torch.Tensor, batch: int) -> torch.Tensor:
    """Require integer class labels (B,) matching the image batch; returns them as long."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch tensor, got {type(targets).__name__}")
    if targets.ndim != 1 or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be integer class indices of shape (B,), got {tuple(targets.shape)} {targets.dtype}"
        )
    if targets.shape[0] != batch:
        raise ValueError(f"mismatched label count: {batch} images but {targets.shape[0]} targets")
    return targets.detach().long()


def pixel_batch(images: torch.Tensor, targets: torch.Tensor, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The robustness measures' ``prepare`` for ``vitscope.measures.evaluation.eval_batches``: float images on
    ``device``, checked to be in pixel space, and their labels."""
    images = check_images(images.to(device, non_blocking=True).float())
    return images, check_targets(targets, images.shape[0]).to(device)
