"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers")."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vitscope.measures._validate import check_attention

Tensor = torch.Tensor

__all__ = ["attention_rollout"]

_FUSIONS = ("mean", "max", "min")


def attention_rollout(
    attentions: Sequence[Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0, add_residual: bool = True
) -> Tensor:
    """Roll attention out through the layers: ``R = A'_L ... A'_1`` (later layers on the left).

    Per layer the heads are fused (mean, max or min over heads), optionally the ``discard_ratio`` fraction
    of smallest fused weights of each example's N x N map is set to 0 (vit-explain's option, without its
    exception for entry (0, 0)), the identity is added for the residual path (``add_residual``), and each
    row is divided by its own sum, so every A' is row-stochastic and ``R[b, i, j]`` is how much output
    token i draws from input token j. Computed in float64.

    Args:
        attentions: Post-softmax attention maps (B, H, N, N) in depth order (e.g. ``cap.attentions``); all
            with the same B and N.
        head_fusion: ``mean``, ``max`` or ``min`` over heads.
        discard_ratio: Fraction in [0, 1) of the smallest fused weights dropped per example and layer.
        add_residual: Add the identity before normalizing (Abnar & Zuidema's 0.5 A + 0.5 I for mean fusion).

    Returns:
        (B, N, N) float64 rollout; rows sum to 1.
    """
    if head_fusion not in _FUSIONS:
        raise ValueError(f"head_fusion must be one of {_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    if isinstance(attentions, torch.Tensor) or not len(attentions):
        raise ValueError("attentions must be a non-empty list of (B, H, N, N) maps, one per layer (cap.attentions)")
    first = None
    rollout = None
    for i, attn in enumerate(attentions):
        a = check_attention(attn, f"attentions[{i}]").double()  # (B, H, N, N)
        B, _, N, _ = a.shape
        if first is None:
            first = (B, N)
            rollout = torch.eye(N, dtype=torch.float64, device=a.device).expand(B, N, N)
        elif (B, N) != first:
            raise ValueError(
                f"attentions[{i}] has B={B}, N={N} but attentions[0] has B={first[0]}, N={first[1]}; roll out only "
                "layers over the same tokens (e.g. ConViT's GPSA layers have no class token, its MHSA layers do)"
            )
        fused = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[head_fusion]  # (B, N, N)
        if discard_ratio > 0:
            flat = fused.flatten(1).clone()  # (B, N*N)
            k = int(flat.shape[1] * discard_ratio)
            if k:
                flat.scatter_(1, flat.topk(k, dim=1, largest=False).indices, 0.0)
            fused = flat.view(B, N, N)
        if add_residual:
            fused = fused + torch.eye(N, dtype=fused.dtype, device=fused.device)
        rows = fused.sum(-1, keepdim=True)  # (B, N, 1)
        if (rows <= 0).any():
            raise ValueError(
                f"attentions[{i}]: some rows have no weight left after discard_ratio={discard_ratio}; "
                "lower discard_ratio or keep add_residual=True"
            )
        rollout = (fused / rows) @ rollout  # (B, N, N): later layers on the left
    return rollout
