"""The ViT paper's inspection of the learned embeddings (Dosovitskiy et al. 2021, Fig. 7 left and centre).

- ``patch_embedding_components``: principal components of the linear patch-embedding filters. Each of the D
  filters of the patch projection (a conv with kernel = stride = P over C channels) is a C*P*P vector; the
  filters are mean-centred over D and decomposed by SVD, the right singular vectors (orthonormal, ordered by
  singular value) are the components, shown as small C x P x P images.
- ``position_embedding_similarity``: cosine similarity between the learned position embeddings of every pair
  of patch positions (prefix-token embeddings excluded), shown per position as a map over the patch grid.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

Tensor = torch.Tensor

__all__ = ["PatchEmbeddingComponents", "patch_embedding_components", "position_embedding_similarity",
           "position_embedding_grid"]


class PatchEmbeddingComponents(NamedTuple):
    """Principal components of the patch-embedding filters.

    Attributes:
        components: (k, C, P, P) float64, rows orthonormal when flattened, ordered by explained variance; each
            component's sign is fixed so that its largest-magnitude entry is positive.
        explained_variance_ratio: (k,) share of the filters' total variance along each component.
        mean: (C, P, P) the mean filter removed before the decomposition.
    """

    components: Tensor
    explained_variance_ratio: Tensor
    mean: Tensor


def _patch_projection(model: nn.Module) -> nn.Conv2d:
    """The linear patch projection: ``patch_embed.proj``, a Conv2d with kernel = stride applied to the image."""
    name = type(model).__name__
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        raise ValueError(f"{name} has no patch embedding (a CNN?); patch-embedding components need a ViT whose "
                         "patch_embed.proj is a linear patch projection")
    if getattr(pe, "backbone", None) is not None:
        raise ValueError(f"{name} embeds patches with a convolutional stem (hybrid patch_embed.backbone), not a "
                         "linear projection of pixels; its filters are not image patches")
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.groups != 1:
        raise ValueError(f"{name}.patch_embed.proj is {type(proj).__name__}, not a Conv2d with kernel = stride; "
                         "patch-embedding components need the linear patch projection of a plain ViT")
    return proj


def patch_embedding_components(model: nn.Module, k: int = 28) -> PatchEmbeddingComponents:
    """The top ``k`` principal components of the flattened patch-embedding filters (ViT Fig. 7 left: 28).

    The (D, C, P, P) weight of ``patch_embed.proj`` is flattened to D filters of C*P*P values, centred by the
    mean filter and decomposed by SVD in float64. Centred filters span at most min(D - 1, C*P*P) directions
    (12 for a 2 x 2 RGB patch); ``k`` is clipped to that.

    Raises:
        ValueError: the model has no linear patch projection (a CNN, a hybrid conv stem), or ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    w = _patch_projection(model).weight.detach().to(device="cpu", dtype=torch.float64)  # (D, C, P, P)
    D, C, P, Q = w.shape
    if D < 2:
        raise ValueError(f"{type(model).__name__} has {D} patch-embedding filter; principal components need >= 2")
    flat = w.reshape(D, C * P * Q)  # (D, C*P*P)
    mean = flat.mean(0)
    centred = flat - mean  # (D, C*P*P)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (min(D, CPP), CPP)
    var = s**2
    total = var.sum()
    if total <= 0:
        raise ValueError(f"{type(model).__name__}: all patch-embedding filters are equal (zero variance); "
                         "nothing to decompose")
    k = min(k, D - 1, vh.shape[0])  # centring over D filters leaves rank <= D - 1
    comps = vh[:k]  # (k, CPP)
    peak = comps.abs().argmax(1, keepdim=True)  # (k, 1)
    comps = comps * torch.sign(comps.gather(1, peak))  # largest-magnitude entry positive
    return PatchEmbeddingComponents(comps.reshape(k, C, P, Q), var[:k] / total, mean.reshape(C, P, Q))


def _position_embedding(model: nn.Module) -> Tensor:
    pos = getattr(model, "pos_embed", None)
    name = type(model).__name__
    if not isinstance(pos, torch.Tensor):
        why = "was built without one (e.g. pos_embed='none' or use_pos_embed=False)" if hasattr(model, "patch_embed") \
            else "is not a ViT (a CNN?)"
        raise ValueError(f"{name} has no learned position embedding: it {why}; position-embedding similarity "
                         "needs a ViT with a learned absolute pos_embed")
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"{name}.pos_embed has shape {tuple(pos.shape)}, expected (1, tokens, D) as in timm's ViT")
    return pos.detach()[0]  # (tokens, D)


def position_embedding_grid(model: nn.Module) -> tuple[int, int]:
    """(h, w) patch grid the position embeddings are laid out on (``patch_embed.grid_size``; for
    ``dynamic_img_size`` models the grid they were trained at, which is how they are stored)."""
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    if grid is not None:
        return int(grid[0]), int(grid[1])
    n_pos = _position_embedding(model).shape[0]
    for n in (n_pos, n_pos - int(getattr(model, "num_prefix_tokens", 0) or 0)):
        side = int(round(max(n, 0) ** 0.5))
        if side and side * side == n:
            return side, side
    raise ValueError(f"{type(model).__name__}: cannot tell the patch grid of its {n_pos} position embeddings "
                     "(no patch_embed.grid_size and not a square number)")


def _prefix_entries(model: nn.Module, grid: tuple[int, int]) -> int:
    """Position embeddings that belong to prefix (class / register) tokens rather than patches."""
    n_pos = _position_embedding(model).shape[0]
    extra = n_pos - grid[0] * grid[1]
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if extra not in (0, prefix):
        raise ValueError(f"{type(model).__name__}.pos_embed has {n_pos} entries for a {grid[0]}x{grid[1]} patch grid "
                         f"and {prefix} prefix tokens; cannot tell which entries are patches")
    return extra


def position_embedding_similarity(model: nn.Module) -> Tensor:
    """Cosine similarity between the position embeddings of the n = h * w patch positions (ViT Fig. 7 centre).

    Prefix-token entries (class / register tokens; absent with timm's ``no_embed_class`` and in ConViT, whose
    class token joins later) are dropped. Positions are numbered row-major over ``position_embedding_grid``:
    ``sim[i].reshape(h, w)`` is the map of position i.

    Returns:
        (n, n) float64 tensor; the diagonal is 1.

    Raises:
        ValueError: the model has no learned absolute position embedding (a CNN, pos_embed='none').
    """
    grid = position_embedding_grid(model)
    pos = _position_embedding(model).to(device="cpu", dtype=torch.float64)  # (tokens, D)
    p = pos[_prefix_entries(model, grid):]  # (n, D)
    norms = p.norm(dim=1, keepdim=True)  # (n, 1)
    if (norms == 0).any():
        raise ValueError(f"{type(model).__name__}: some position embeddings are all zero (untrained, zero-initialised "
                         "pos_embed?); their cosine similarity is undefined")
    u = p / norms
    return u @ u.T  # (n, n)
