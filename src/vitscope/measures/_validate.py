"""Input checks shared by the measures: each failure names the argument and the fix."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

Tensor = torch.Tensor


def check_tensor(
    x: Any, name: str, ndim: int | Sequence[int] | None = None, what: str = "", finite: bool = True
) -> Tensor:
    """Check that ``x`` is a (finite, unless ``finite=False``) real tensor with an allowed number of dims."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            dims = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {dims}{' ' + what if what else ''}, got shape {tuple(x.shape)}")
    if x.is_complex() or not (x.is_floating_point()):
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}; convert with .float()")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one example")
    if finite and not all_finite(x):
        raise_non_finite(name)
    return x


def all_finite(x: Tensor) -> bool:
    """Whether every element is finite: one reduction (a NaN/Inf anywhere makes the sum non-finite), with the
    element-wise check only when the sum itself is not finite (overflow of large finite values)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def raise_non_finite(name: str) -> None:
    raise ValueError(
        f"{name} contains NaN or Inf; the model or its inputs produced non-finite values "
        "(check the input normalization and the checkpoint)"
    )


def memory_order(x: Tensor, keep_first: bool = False) -> Tensor:
    """``x`` with its dims permuted into the order they lie in memory (a view; ``keep_first``: dim 0, the examples,
    stays first): contiguous for a dense tensor that is a permutation of a contiguous one, such as the
    channels-first view of a channels-last map (Swin, ConvNeXt). A reduction over all its elements (or over each
    example's) then reads memory in order instead of striding across it, several times faster on a CPU, and
    ``flatten``/``reshape`` of it copy nothing. ``x`` itself when no such permutation exists."""
    if x.is_contiguous():
        return x
    rest = sorted(range(1 if keep_first else 0, x.ndim), key=lambda d: (-x.stride(d), d))
    view = x.permute(([0] if keep_first else []) + rest)  # (B, C, H, W) channels-last -> (B, H, W, C)
    return view if view.is_contiguous() else x


def as_float(x: Tensor) -> Tensor:
    """Upcast half precision to float32 (compute is at least float32)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_attention(attn: Any, name: str = "attn", validate: bool = True, square: bool = True) -> Tensor:
    """Check a post-softmax attention tensor (B, H, N, N): 4-D, square (unless ``square`` is False: pooled keys,
    (B, H, N, M)), finite, rows summing to 1.

    Returns it (half precision upcast to float32), with tiny negative round-off clamped to 0. With
    ``validate=False`` only the type and shape are checked (no scan of the values, no clamp): for maps the
    caller already checked with ``check_attention``.
    """
    attn = check_tensor(attn, name, 4, "(B, H, N, N) post-softmax attention", finite=False)
    if square and attn.shape[-1] != attn.shape[-2]:
        raise ValueError(
            f"{name} must be self-attention (B, H, N, N) with as many keys as queries, got shape {tuple(attn.shape)}"
        )
    attn = as_float(attn)
    if not validate:
        return attn
    tol = 1e-3 if attn.dtype in (torch.float32, torch.float64) else 1e-2
    rows = attn.sum(-1)  # (B, H, N); NaN/Inf anywhere in a row shows here (float32 is ample for tol 1e-3)
    if not torch.isfinite(rows).all():
        raise_non_finite(name)
    low = float(attn.min())
    if (rows - 1).abs().max() > tol or low < -tol:
        raise ValueError(
            f"{name} rows must be probabilities summing to 1 (max deviation {float((rows - 1).abs().max()):.3g}, "
            f"min entry {low:.3g}); pass post-softmax attention maps, not logits"
        )
    return attn.clamp_min(0) if low < 0 else attn


def as_grid(grid: Any, name: str = "grid") -> tuple[int, int]:
    """Normalize ``grid`` (int or (h, w)) to a tuple of two positive ints."""
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    try:
        h, w = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair (h, w) of token-grid sizes, got {grid!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} sizes must be positive, got {grid!r}")
    return h, w


def check_grid(grid: Any, num_tokens: int, num_prefix_tokens: int, name: str = "grid") -> tuple[int, int]:
    """Check that ``grid`` covers the ``num_tokens - num_prefix_tokens`` spatial tokens."""
    h, w = as_grid(grid, name)
    if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
    if h * w != num_tokens - num_prefix_tokens:
        raise ValueError(
            f"{name}={h}x{w} does not match {num_tokens} tokens minus num_prefix_tokens={num_prefix_tokens} "
            f"(= {num_tokens - num_prefix_tokens} spatial tokens); pass the layer's token grid and its number of "
            "class/register tokens (cap.attention_layout / cap.layout hold both)"
        )
    return h, w


def grid_coords(h: int, w: int, device: torch.device | None = None) -> Tensor:
    """(row, col) of each token of a row-major h x w grid, shape (h*w, 2), float64."""
    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)
    return torch.stack([rows, cols], dim=-1)  # (h*w, 2)


@functools.lru_cache(maxsize=64)
def pairwise_distance(h: int, w: int, device: torch.device | None = None, normalize: bool = False) -> Tensor:
    """Euclidean distance between token positions of an h x w grid, (h*w, h*w), float64.

    Positions are (row, col) in patch units, or divided by (h - 1, w - 1) when ``normalize`` (so they lie in
    [0, 1]; an axis of size 1 has the single coordinate 0). Cached per grid and device: do not modify it.
    """
    pos = grid_coords(h, w, device)  # (N, 2)
    if normalize:
        scale = torch.tensor([max(h - 1, 1), max(w - 1, 1)], dtype=torch.float64, device=device)
        pos = pos / scale
    return torch.cdist(pos, pos)  # (N, N)


def to_map(x: Tensor, grid: Any, num_prefix_tokens: int, name: str) -> Tensor:
    """Tokens (B, N, D) -> maps (B, D, h, w) after dropping prefix tokens (as ``vitscope.tokens_to_map``)."""
    if x.ndim == 4:
        return x
    if x.ndim != 3:
        raise ValueError(f"{name} must be (B, N, D) tokens or (B, C, H, W) maps, got shape {tuple(x.shape)}")
    if grid is None:
        raise ValueError(
            f"{name} holds tokens (B, N, D): pass grid= and num_prefix_tokens= (or layout=cap.layout), "
            "or convert with vitscope.tokens_to_map(x, grid, num_prefix_tokens)"
        )
    B, N, D = x.shape
    h, w = check_grid(grid, N, num_prefix_tokens)
    return x[:, num_prefix_tokens:].transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)


def as_list(x: Any, name: str) -> tuple[list, bool]:
    """A tensor -> ([tensor], single=True); a list/tuple of tensors (one per layer) -> (list, False)."""
    if isinstance(x, torch.Tensor):
        return [x], True
    if isinstance(x, (list, tuple)) and len(x) > 0:
        return list(x), False
    raise ValueError(f"{name} must be a tensor or a non-empty list of tensors (one per layer), got {type(x).__name__}")
