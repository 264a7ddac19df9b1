"""Sharpness-aware minimization (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently
Improving Generalization").

One SAM update of weights ``w`` with base optimizer ``opt`` and radius ``rho``:

1. ``g = grad L(w)``; ascend to ``w + e`` with ``e = rho * g / ||g||_2`` (norm over all parameters);
2. ``g_sam = grad L(w + e)``;
3. restore ``w`` exactly and let ``opt`` step with ``g_sam``.

HDVW (Park & Kim 2022) uses SAM to flatten ViT loss landscapes. The class holds only the perturbation
bookkeeping; the engine runs the two forward/backward passes and steps the base optimizer, so the
base optimizer's state, the scheduler and the gradient scaler are the usual ones.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["SAM"]


class SAM:
    """The ascent/restore half of a SAM step over ``params``.

    Usage::

        loss_fn().backward(); sam.ascend(); optimizer.zero_grad()
        loss_fn().backward(); sam.restore(); optimizer.step()
    """

    def __init__(self, params: Iterable[torch.Tensor], rho: float = 0.05, eps: float = 1e-12):
        if rho <= 0:
            raise ValueError(f"SAM radius rho must be > 0, got {rho}")
        self.params = [p for p in params if p.requires_grad]
        self.rho = rho
        self.eps = eps
        self._saved: list[torch.Tensor] | None = None

    @torch.no_grad()
    def ascend(self) -> torch.Tensor:
        """Move every parameter to ``w + rho * g / ||g||``; returns ``||g||`` (global L2 norm)."""
        if self._saved is not None:
            raise RuntimeError("SAM.ascend() called twice without restore()")
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError("SAM.ascend() needs gradients: call loss.backward() first")
        wide = torch.promote_types(grads[0].dtype, torch.float32)  # half grads: norm in float32
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.to(wide)) for g in grads]))
        scale = self.rho / (grad_norm + self.eps)
        self._saved = [p.detach().clone() for p in self.params]
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad * scale.to(p.grad.dtype))
        return grad_norm

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by :meth:`ascend` (exactly, not by subtracting ``e``)."""
        if self._saved is None:
            raise RuntimeError("SAM.restore() called without ascend()")
        for p, w in zip(self.params, self._saved):
            p.copy_(w)
        self._saved = None
