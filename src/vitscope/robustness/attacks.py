"""L-infinity adversarial attacks in [0, 1] pixel space: FGSM (Goodfellow et al. 2015) and PGD (Madry et al.
2018), as used by CB (Hyeon-Woo et al. 2023) for robustness of ViTs.

The perturbation lives in pixel space, before the model's input normalization; the model sees
``(x_adv - mean) / std`` through ``Normalized``. Loss is the summed cross-entropy (each example's
gradient independent of the batch), the model is put in eval mode during the attack and restored
afterwards; only first-order gradients are taken, so fused attention kernels are fine.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitscope.measures.evaluation import eval_mode
from vitscope.robustness._checks import check_images, check_targets

_logger = logging.getLogger(__name__)

__all__ = ["Normalized", "resolve_normalization", "pixel_model", "fgsm", "pgd"]


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a model that takes [0, 1] pixel-space images.

    Args:
        model: the classifier expecting normalized inputs.
        mean, std: per-channel statistics (length C).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean has {mean_t.numel()} channels but std has {std_t.numel()}")
        if not (std_t > 0).all():
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.model = model
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)  # (1, C, 1, 1)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)  # (1, C, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"images have {x.shape[1]} channels but mean/std have {self.mean.shape[1]}")
        return self.model((x - self.mean.to(x)) / self.std.to(x))


def resolve_normalization(
    model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) to use: given ones, else the model's timm ``pretrained_cfg``.

    Raises:
        ValueError: only one of mean/std given, or none given and the model has no pretrained_cfg.
    """
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither (then the model's pretrained_cfg is used)")
    if mean is not None:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if not getattr(model, "pretrained_cfg", None):
        raise ValueError(
            f"{type(model).__name__} has no pretrained_cfg to read its input normalization from; pass "
            "mean=..., std=... (use mean=(0, 0, 0), std=(1, 1, 1) if it takes [0, 1] images) or wrap it "
            "in vitscope.robustness.Normalized"
        )
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])


def pixel_model(
    model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> nn.Module:
    """``model`` as a [0, 1] pixel-space classifier: ``Normalized`` models are returned as they are."""
    if isinstance(model, Normalized):
        if mean is not None or std is not None:
            raise ValueError("model is already Normalized: do not pass mean/std as well")
        return model
    mean_r, std_r = resolve_normalization(model, mean, std)
    return Normalized(model, mean_r, std_r)


def _check_eps(eps: float, name: str = "eps") -> float:
    eps = float(eps)
    if not (0.0 <= eps <= 1.0):
        raise ValueError(f"{name} must be in [0, 1] (pixel units; 8/255 = {8 / 255:.4f}), got {eps}")
    return eps


def _input_grad(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), targets, reduction="sum")
        return torch.autograd.grad(loss, x)[0]  # (B, C, H, W)


def fgsm(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    eps: float,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Fast gradient sign method: ``clamp(x + eps * sign(grad_x CE), 0, 1)`` (L-infinity, pixel space).

    Args:
        model: classifier; normalized with ``mean``/``std`` (default: its pretrained_cfg) unless it is
            already a ``Normalized``.
        images: (B, C, H, W) in [0, 1].
        targets: (B,) class indices.
        eps: L-infinity radius in pixel units (e.g. 1/255).

    Returns:
        adversarial images (B, C, H, W), detached, in [0, 1], within eps of ``images``.
    """
    images = check_images(images)
    targets = check_targets(targets, images.shape[0]).to(images.device)
    eps = _check_eps(eps)
    net = pixel_model(model, mean, std)
    with eval_mode(net):
        grad = _input_grad(net, images, targets)
    return (images + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    random_start: bool = True,
    seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) under L-infinity in [0, 1] pixel space.

    Each step: ``x <- clip_{x0, eps}(x + alpha * sign(grad)) clamped to [0, 1]``; with ``random_start``
    the start is ``x0 + U(-eps, eps)`` clamped to [0, 1], drawn from a CPU generator seeded by ``seed``
    (the same as torchattacks.PGD, whose default alpha is 2/255).

    Args:
        alpha: step size; default ``2.5 * eps / steps`` (Madry et al.).
        steps: number of gradient steps.
        Other arguments as in ``fgsm``.

    Returns:
        adversarial images (B, C, H, W), detached, in [0, 1], within eps of ``images``.
    """
    images = check_images(images)
    targets = check_targets(targets, images.shape[0]).to(images.device)
    eps = _check_eps(eps)
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    alpha = 2.5 * eps / steps if alpha is None else float(alpha)
    if alpha < 0:
        raise ValueError(f"alpha must be non-negative, got {alpha}")
    net = pixel_model(model, mean, std)
    x = images.clone()
    if random_start:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.rand(images.shape, generator=gen, dtype=images.dtype) * (2 * eps) - eps
        x = (x + noise.to(images.device)).clamp(0.0, 1.0)
    with eval_mode(net):
        for _ in range(int(steps)):
            grad = _input_grad(net, x, targets)
            x = x + alpha * grad.sign()
            x = (images + (x - images).clamp(-eps, eps)).clamp(0.0, 1.0).detach()
    return x
