"""Spatial smoothing (Park & Kim 2022, "Blurs Behave Like Ensembles: Spatial Smoothings to Improve
Accuracy, Uncertainty, and Robustness", the companion of HDVW).

``Blur`` is a fixed 2x2 box filter with stride 1 that keeps the map size: the input is padded by one
pixel at the right and bottom (zeros by default, so border outputs average in zeros, as the paper's
``Blur`` with ``pad_mode="constant"`` does), then 2x2 average-pooled.
``SpatialSmoothing`` is the paper's ``TanhBlurBlock``: ``blur(relu(t * tanh(x / t)))`` with t = 10.

Trap: the official code's fast path is ``nn.AvgPool2d(kernel_size=2, stride=1, padding=1)``, which
pads both sides and so GROWS every map by one pixel (32 -> 33). vitscope keeps shapes instead; the
two agree everywhere except that the official output has one extra row/column on the top/left.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_PAD_MODES = ("zeros", "replicate", "reflect")


class Blur(nn.Module):
    """2x2 box blur, stride 1, shape-preserving (pad right/bottom by one pixel).

    Args:
        pad_mode: How the right/bottom border is filled: ``zeros`` (paper default), ``replicate`` or
            ``reflect``.
    """

    def __init__(self, pad_mode: str = "zeros"):
        super().__init__()
        if pad_mode not in _PAD_MODES:
            raise ValueError(f"Blur pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}")
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C, H + 1, W + 1) -> (B, C, H, W)
        if self.pad_mode == "zeros":
            x = F.pad(x, (0, 1, 0, 1))
        else:
            x = F.pad(x, (0, 1, 0, 1), mode=self.pad_mode)
        return F.avg_pool2d(x, kernel_size=2, stride=1)

    def extra_repr(self) -> str:
        return f"kernel=2x2, pad_mode={self.pad_mode}"


class SpatialSmoothing(nn.Module):
    """Paper's smoothing block: optional ``t * tanh(x / t)``, optional ReLU, then ``Blur``.

    Args:
        temp: Temperature ``t`` of the tanh squashing (paper: 10); ``None`` skips the tanh.
        relu: Apply a ReLU after the tanh (paper: yes).
        pad_mode: Border filling of the blur (see ``Blur``).
    """

    def __init__(self, temp: float | None = 10.0, relu: bool = True, pad_mode: str = "zeros"):
        super().__init__()
        if temp is not None and temp <= 0:
            raise ValueError(f"SpatialSmoothing temp must be positive or None, got {temp}")
        self.temp = temp
        self.relu = relu
        self.blur = Blur(pad_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temp is not None:
            x = self.temp * torch.tanh(x / self.temp)
        if self.relu:
            x = F.relu(x)
        return self.blur(x)

    def extra_repr(self) -> str:
        return f"temp={self.temp}, relu={self.relu}"
