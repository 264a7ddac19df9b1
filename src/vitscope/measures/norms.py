"""Ratio of norms ||z|| / ||f(z)|| between the residual stream and a branch (RAGHU, Fig. 13).

z is the stream entering a sub-layer (``cap.residuals[i][0]``; for CNN blocks the skip-path output,
``cap.shortcuts[i]``) and f(z) the branch output before the add (``cap.branches[i]``). A large ratio means
the skip connection dominates. Averaging convention (function and streaming class alike): the ratio is
taken per token (or per example for CNN maps) and the *ratios* are averaged, not the norms.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from vitscope.measures._streaming import StreamingMeasure, check_layout, layer_option
from vitscope.measures._validate import as_list, check_tensor, memory_order

_logger = logging.getLogger(__name__)

Tensor = torch.Tensor

__all__ = ["ratio_of_norms", "RatioOfNorms"]


def _ratio_sums(
    z: Any, fz: Any, num_prefix_tokens: int, name_z: str = "z", name_fz: str = "fz", validate: bool = True,
    checks: Any = None,
) -> dict[str, Tensor]:
    z = check_tensor(z, name_z, (3, 4), "(B, N, D) tokens or (B, C, H, W) maps", finite=validate)
    fz = check_tensor(fz, name_fz, (3, 4), "(B, N, D) tokens or (B, C, H, W) maps", finite=validate)
    if z.shape != fz.shape:
        raise ValueError(
            f"{name_z} {tuple(z.shape)} and {name_fz} {tuple(fz.shape)} must have the same shape; pass the stream "
            "entering the sub-layer and its branch output (for CNN blocks with downsampling use cap.shortcuts)"
        )
    if z.ndim == 4:  # CNN: one ratio over the whole map per example (channels-last maps read in memory order)
        nz = torch.linalg.vector_norm(memory_order(z, keep_first=True).flatten(1), dim=1, dtype=torch.float64)  # (B,)
        nf = torch.linalg.vector_norm(memory_order(fz, keep_first=True).flatten(1), dim=1, dtype=torch.float64)
    else:  # tokens: one ratio per token
        if not isinstance(num_prefix_tokens, int) or not 0 <= num_prefix_tokens < z.shape[1]:
            raise ValueError(
                f"num_prefix_tokens must be an int in [0, {z.shape[1]}), got {num_prefix_tokens!r}"
            )
        nz = torch.linalg.vector_norm(z, dim=-1, dtype=torch.float64)  # (B, N)
        nf = torch.linalg.vector_norm(fz, dim=-1, dtype=torch.float64)
    both = f"both {name_z} and {name_fz} are exactly zero for some tokens: the ratio is undefined"
    zero = f"{name_fz} is exactly zero for some tokens/examples (e.g. a zero-initialised branch); their ratio is inf"
    if checks is not None:  # vitscope.probe: device-side flags, read once after the pass (no host sync here)
        checks.fail_if(((nf == 0) & (nz == 0)).any(), both)
        checks.warn_if((nf == 0).any(), zero)
    elif (nf == 0).any():
        if (nz[nf == 0] == 0).any():
            raise ValueError(both)
        warnings.warn(zero, RuntimeWarning, stacklevel=3)
    ratio = nz / nf
    B = z.shape[0]
    if z.ndim == 4:
        return {"spatial_sum": ratio.sum(), "spatial_count": float(B)}
    spatial = ratio[:, num_prefix_tokens:]  # (B, N - p)
    out = {"spatial_sum": spatial.sum(), "spatial_count": float(spatial.numel())}
    if num_prefix_tokens >= 1:
        out["cls_sum"] = ratio[:, 0].sum()
        out["cls_count"] = float(B)
    return out


def _finish(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {"spatial": state["spatial_sum"] / state["spatial_count"]}
    if "cls_sum" in state:
        out["cls"] = state["cls_sum"] / state["cls_count"]
    return out


def ratio_of_norms(z: Tensor, fz: Tensor, num_prefix_tokens: int = 1) -> dict[str, Tensor]:
    """Ratio ||z|| / ||f(z)|| of the residual stream to a branch output (RAGHU).

    Tokens (B, N, D): the L2 norm over channels per token; ``cls`` is the mean over the batch of the first
    prefix token's ratio (present only when ``num_prefix_tokens >= 1``), ``spatial`` the mean over the
    batch and the spatial tokens of the per-token ratios. CNN maps (B, C, H, W): one ratio of Frobenius
    norms over the whole map per example, averaged over the batch, under ``spatial``. A zero branch gives
    inf (with a warning).

    Args:
        z: Stream entering the sub-layer (or the skip-path output for CNN blocks).
        fz: Branch output, same shape.
        num_prefix_tokens: Class/register tokens before the spatial tokens (tokens only).

    Returns:
        ``{"cls": scalar, "spatial": scalar}`` (float64; ``cls`` omitted without prefix tokens or for maps).
    """
    return _finish(_ratio_sums(z, fz, num_prefix_tokens))


class RatioOfNorms(StreamingMeasure):
    """Streaming ``ratio_of_norms``: sums of per-token (per-example for maps) ratios and their counts.

    ``update(z, fz, layout=None)``: ``z`` and ``fz`` one tensor each or aligned lists (one per sub-layer);
    ``z`` may be ``cap.residuals`` itself (pairs ``(z_in, z_out)``: z_in is used). Prefix tokens come from
    the constructor, else ``layout`` (``cap.layout``), else 1 for tokens.
    """

    def __init__(self, num_prefix_tokens: int | None = None) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        super().__init__()

    def _options(self) -> dict[str, Any]:
        return {"num_prefix_tokens": self.num_prefix_tokens}

    def update(self, z: Any, fz: Any, layout: Any = None, *, validate: bool = True) -> None:
        """Add one batch (see the class docstring). ``validate=False`` skips the finite-value scans (shapes are
        always checked): for callers that checked the tensors already, such as ``vitscope.probe``."""
        zs, single = as_list(z, "z")
        fzs, _ = as_list(fz, "fz")
        if len(zs) != len(fzs):
            raise ValueError(f"z has {len(zs)} layers but fz has {len(fzs)}; pass aligned lists")
        check_layout(layout, len(zs))
        self._accumulate([self.layer_sums(zi, fi, layout, i, "" if single else f"[{i}]", validate)
                          for i, (zi, fi) in enumerate(zip(zs, fzs))], single)

    def layer_sums(self, z: Any, fz: Any, layout: Any = None, i: int = 0, suffix: str = "",
                   validate: bool = True, checks: Any = None) -> dict[str, Tensor]:
        """One layer's additive contribution (the per-layer part of ``update``; ``layout`` a LayerInfo or the
        list indexed by ``i``). ``vitscope.probe`` adds them layer by layer as the model runs, passing
        ``checks`` (``fail_if(flag, message)`` / ``warn_if(flag, message)`` with 0-d device bools) so that the
        zero-norm checks do not read values on the host."""
        if isinstance(z, (tuple, list)):  # an entry of cap.residuals: (z_in, z_out)
            z = z[0]
        prefix = layer_option(self.num_prefix_tokens, layout, i, "num_prefix_tokens")
        return _ratio_sums(z, fz, 1 if prefix is None else prefix, f"z{suffix}", f"fz{suffix}", validate, checks)

    def _compute_layer(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return _finish(state)
