"""Context Broadcasting (Hyeon-Woo et al. 2023, "Scratching Visual Transformer's Back with Uniform
Attention"): add the uniform-attention output (the token mean) to every token.

CB:  ``x <- 0.5 * x + 0.5 * mean_tokens(x)``; no parameters.
CBS: ``x <- (1 - lambda) * x + lambda * mean_tokens(x)`` with a learned per-channel ``lambda``
(initialised to 0.5, so CBS starts as CB). The paper's exact CBS equation is not public; this is the
interpolating form, chosen so that lambda = 0 is the plain ViT and lambda = 0.5 is CB.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ContextBroadcast(nn.Module):
    """Mix each token with the mean over tokens.

    Args:
        dim: Channel dimension (used only by the scaled variant).
        scaled: Learn a per-channel mixing weight (CBS) instead of the fixed 0.5 (CB).
        num_prefix_tokens: Number of class/register tokens at the start of the sequence.
        include_prefix: Whether prefix tokens join the mean (the one-line form of the paper includes them).
            Every token, prefix tokens included, receives the mean either way.
        device, dtype: Where and in which dtype the CBS scale is created (timm's factory kwargs).
    """

    def __init__(self, dim: int, scaled: bool = False, num_prefix_tokens: int = 1, include_prefix: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.include_prefix = include_prefix
        self.scale = nn.Parameter(torch.full((dim,), 0.5, device=device, dtype=dtype)) if scaled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, N, C)
        tokens = x if self.include_prefix else x[:, self.num_prefix_tokens:]
        mean = tokens.mean(dim=1, keepdim=True)  # (B, 1, C)
        if self.scale is None:
            return 0.5 * x + 0.5 * mean
        return (1.0 - self.scale) * x + self.scale * mean

    def extra_repr(self) -> str:
        return f"scaled={self.scale is not None}, include_prefix={self.include_prefix}"


def cbs_scales(model: nn.Module) -> list[torch.Tensor]:
    """The learned CBS scale ``lambda`` (per channel) of every scaled ``ContextBroadcast`` in ``model``, in forward
    (depth) order; CB reports that the learned scale grows with depth (deep layers take more uniform attention).

    Returns:
        One (C,) float32 tensor per scaled CB module.

    Raises:
        ValueError: ``model`` has no scaled CB module (train a CBS model, e.g. ``vit_tiny_cbs_patch2_32``).
    """
    scales = [m.scale.detach().float().cpu() for m in model.modules()
              if isinstance(m, ContextBroadcast) and m.scale is not None]
    if not scales:
        raise ValueError(f"{type(model).__name__} has no learned Context Broadcasting scale (CBS); pass a CBS model "
                         "such as vit_tiny_cbs_patch2_32 or test_vit_cbs")
    return scales
