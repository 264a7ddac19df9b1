"""Local window multi-head self-attention on feature maps (HDVW, Park & Kim 2022, AlterNet's MSA).

The map (B, C, H, W) is cut into non-overlapping ``window_size`` x ``window_size`` windows; inside each
window every position attends to every other, with a learned 2-D relative position bias added to the
logits before the softmax. q, k and v are 1x1 convs (no bias) to ``num_heads * head_dim`` channels;
the output projection is a 1x1 conv with bias to ``dim_out`` channels, as in the official
``LocalAttention``/``Attention2d``. The official bias table is one (2w-1) x (2w-1) table shared by all
heads (the default here); ``rel_pos_per_head=True`` gives Swin's per-head tables instead.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import RelPosBias, use_fused_attn
from timm.models import register_notrace_function


@register_notrace_function  # shape-dependent branch: timm's FX tracer records the call (public name: FX skips _names)
def check_whole_windows(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Raise unless the map (B, C, H, W) is a whole number of windows; returns ``x``."""
    H, W = x.shape[-2], x.shape[-1]
    if H % window_size or W % window_size:
        raise ValueError(
            f"WindowAttention2d: a {H}x{W} feature map is not a whole number of {window_size}x{window_size} "
            "windows; use an input size whose stage maps are multiples of the window, or build the model "
            "with a window_size that divides them"
        )
    return x


class WindowAttention2d(nn.Module):
    """Window MSA with relative position bias on (B, C, H, W) maps; H and W must be multiples of the window.

    Args:
        dim: Input channels.
        dim_out: Output channels (default ``dim``).
        num_heads: Attention heads.
        head_dim: Channels per head (HDVW: 64).
        window_size: Side of the square attention window (HDVW: 7 at 224 px).
        qkv_bias: Bias in the q/k/v projection (HDVW: no).
        attn_drop: Dropout on the attention probabilities.
        proj_drop: Dropout after the output projection.
        rel_pos_per_head: One bias table per head (Swin) instead of one shared table (HDVW's code).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        num_heads: int = 8,
        head_dim: int = 64,
        window_size: int = 7,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos_per_head: bool = False,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.window_size = window_size
        self.scale = head_dim**-0.5
        self.fused_attn = use_fused_attn()
        inner = num_heads * head_dim
        self.qkv = nn.Conv2d(dim, 3 * inner, kernel_size=1, bias=qkv_bias)
        self.rel_pos = RelPosBias((window_size, window_size), num_heads if rel_pos_per_head else 1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Conv2d(inner, dim_out or dim, kernel_size=1)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ws, nh, hd = self.window_size, self.num_heads, self.head_dim
        x = check_whole_windows(x, ws)
        B, _, H, W = x.shape
        gh, gw = H // ws, W // ws
        n = ws * ws
        qkv = self.qkv(x)  # (B, 3*nh*hd, H, W)
        qkv = qkv.view(B, 3, nh, hd, gh, ws, gw, ws).permute(1, 0, 4, 6, 2, 5, 7, 3)  # (3, B, gh, gw, nh, ws, ws, hd)
        q, k, v = qkv.reshape(3, B * gh * gw, nh, n, hd).unbind(0)  # (B*nW, nh, N, hd) each
        bias = self.rel_pos.get_bias().to(q.dtype)  # (1, nh or 1, N, N)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias  # (B*nW, nh, N, N)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            out = attn @ v  # (B*nW, nh, N, hd)
        out = out.reshape(B, gh, gw, nh, ws, ws, hd).permute(0, 3, 6, 1, 4, 2, 5)  # (B, nh, hd, gh, ws, gw, ws)
        out = out.reshape(B, nh * hd, H, W)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, window_size={self.window_size}"
