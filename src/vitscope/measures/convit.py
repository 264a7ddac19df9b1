"""ConViT GPSA read-outs (d'Ascoli et al. 2021): gating values and positional attention centres.

timm's ``GPSA`` scores key j for query i positionally with ``pos_proj(r_ij)``, r_ij = [dx, dy, dx^2 + dy^2]
where dx = col_j - col_i and dy = row_j - row_i (``GPSA.get_rel_indices``). Per head the logit
``w0 dx + w1 dy + w2 (dx^2 + dy^2) + b`` equals ``w2 ||delta - c||^2 + const`` with centre
``c = (-w0 / (2 w2), -w1 / (2 w2))``: for w2 < 0 the positional attention is a Gaussian-like bump peaked at
offset c, its sharpness (locality strength) ``-w2``. ``GPSA.local_init`` sets head ``h1 + k h2``
(k = floor(sqrt(H)), centre index ctr = (k - 1) / 2 for even k, k // 2 for odd) to
``[2 (h2 - ctr), 2 (h1 - ctr), -1] * locality_strength``, i.e. c = (h2 - ctr, h1 - ctr), strength alpha.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

Tensor = torch.Tensor

__all__ = ["gpsa_gates", "gpsa_attention_centres", "GPSACentres", "gpsa_layers", "gpsa_positional_attention"]


class GPSACentres(NamedTuple):
    """Positional attention of one GPSA layer, per head.

    Attributes:
        centre: (H, 2) offset (dx, dy) in patches (dx along columns, dy along rows) where the positional
            attention peaks when ``peaked``; otherwise the stationary point of the logit (a minimum for
            w2 > 0; NaN when w2 == 0 exactly).
        locality: (H,) locality strength -w2 (positive for a peaked head).
        peaked: (H,) bool, w2 < 0.
    """

    centre: Tensor
    locality: Tensor
    peaked: Tensor


def gpsa_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every GPSA layer (a module with ``gating_param`` and a ``pos_proj`` Linear(3, H))."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(getattr(m, "gating_param", None), torch.Tensor)
              and isinstance(getattr(m, "pos_proj", None), nn.Linear) and m.pos_proj.in_features == 3]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no GPSA layer (ConViT's gated positional self-attention); "
            "pass a ConViT model such as convit_tiny_32 or test_convit_32"
        )
    return layers


def gpsa_gates(model: nn.Module) -> list[Tensor]:
    """Gate ``sigmoid(gating_param)`` per head for each GPSA layer in depth order: 1 = purely positional,
    0 = purely content attention (ConViT Fig. 4). Returns a list of (H,) float32 tensors."""
    return [torch.sigmoid(m.gating_param.detach().float()).cpu() for _, m in gpsa_layers(model)]


def gpsa_attention_centres(model: nn.Module) -> list[GPSACentres]:
    """Centre (dx, dy) and locality strength of each head's positional attention, per GPSA layer,
    derived from ``pos_proj`` weights (see the module docstring for the convention)."""
    out = []
    for _, m in gpsa_layers(model):
        w = m.pos_proj.weight.detach().double().cpu()  # (H, 3): [w_dx, w_dy, w_dist2]
        w0, w1, w2 = w.unbind(-1)
        denom = torch.where(w2 != 0, 2 * w2, torch.full_like(w2, float("nan")))
        centre = torch.stack([-w0 / denom, -w1 / denom], dim=-1)  # (H, 2)
        out.append(GPSACentres(centre=centre, locality=-w2, peaked=w2 < 0))
    return out


def gpsa_positional_attention(model: nn.Module, num_patches: int) -> list[Tensor]:
    """The positional attention ``softmax_j(pos_proj(r_ij))`` of each GPSA layer (the part the gate weighs with
    g = sigmoid(gating_param); CONVIT Eq. 5), for ``num_patches`` patches on a square grid, before gating.

    Returns:
        One (H, N, N) float32 tensor per GPSA layer in depth order; row i is query patch i (row-major grid).
    """
    out = []
    for _, m in gpsa_layers(model):
        with torch.no_grad():
            rel = m.get_rel_indices(num_patches).to(m.pos_proj.weight)  # (1, N, N, 3)
            logits = m.pos_proj(rel)[0].permute(2, 0, 1)  # (H, N, N)
            out.append(logits.float().softmax(dim=-1).cpu())
    return out
