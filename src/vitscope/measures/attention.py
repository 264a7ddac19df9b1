"""Attention-map measures: entropy (CB), mean attention distance (ViT, RAGHU), nonlocality (ConViT)
and relative distance of interaction (CB).

Every function takes post-softmax attention ``attn`` (B, H, N, N) of one layer (rows sum to 1, e.g. one
entry of ``cap.attentions``) and returns one value per head, (H,), in float64. The streaming classes
take one such tensor or the list ``cap.attentions`` (with ``layout=cap.attention_layout`` for the grid,
patch size and prefix tokens of each layer) and accumulate sums and counts, so unequal batches give
exactly the result over the whole set.

Token positions: spatial tokens are the last ``h * w`` tokens in row-major order (token ``p + r * w + c``
sits at row r, column c, after ``p`` prefix tokens), as timm ViTs lay them out. With a layout whose queries or
keys lie elsewhere (``LayerInfo.cell_distance``: pooled keys of PVTv2/Twins, MaxViT's dilated grid windows),
attention distance and nonlocality use those positions; entropy is over the keys, whatever their number.

Precision: the per-row and per-batch reductions run in the maps' dtype (float64 maps: float64 throughout;
float32 maps: sums over keys and over the batch in float32, relative error ~1e-7), the states in float64.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from vitscope.measures._streaming import StreamingMeasure, check_layout, layer_option
from vitscope.measures._validate import as_list, check_attention, check_grid, pairwise_distance

Tensor = torch.Tensor

__all__ = [
    "attention_entropy", "attention_distance", "class_token_mass", "nonlocality", "relative_distance",
    "AttentionEntropy", "AttentionDistance", "Nonlocality", "RelativeDistance",
]


def _count(x: Tensor, n: int) -> float:
    return float(n)  # a Python number: the streaming base adds the counts of all layers at once


# ------------------------------------------------------------------------------------- per-batch sums
def _entropy_sums(attn: Tensor, name: str = "attn", validate: bool = True) -> dict[str, Tensor]:
    a = check_attention(attn, name, validate, square=False)  # (B, H, N, M)
    B, H, N, _ = a.shape
    # -sum_j A ln A with 0 ln 0 = 0: clamping before the log is exact for A = 0 and faster than xlogy
    ent = -(a * a.clamp_min(torch.finfo(a.dtype).tiny).log()).sum(-1)  # (B, H, N)
    return {"sum": ent.sum((0, 2), dtype=torch.float64), "count": _count(a, B * N)}


def _patch_size(patch_size: Any) -> float:
    if patch_size is None or isinstance(patch_size, bool) or not isinstance(patch_size, (int, float)) \
            or patch_size <= 0:
        raise ValueError(
            f"patch_size must be a positive number of pixels per token side, got {patch_size!r}; "
            "pass the model's patch size (or layout=cap.attention_layout)"
        )
    return float(patch_size)


@functools.lru_cache(maxsize=16)
def _off_diagonal(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """1 - I, (n, n). Cached: do not modify it."""
    return 1 - torch.eye(n, dtype=dtype, device=device)


def _weighted_mass(a: Tensor, dist: Tensor) -> Tensor:
    """sum over examples and queries of sum_j A_ij d_ij, per head: (H,) float64, from the batch sum of A."""
    return (a.sum(0).double() * dist).sum((-1, -2))  # (H,): batch sum in the maps' dtype (float32: ~1e-7)


def _cells(a: Tensor, grid: Any, num_prefix_tokens: int, cells: Tensor | None) -> tuple[Tensor, int]:
    """(S_q, S_k) distances between spatial queries and keys in cells (a plain grid's, else ``cells``), and S_q."""
    N, M = a.shape[-2:]
    if cells is None:
        h, w = check_grid(grid, N, num_prefix_tokens)  # square maps: check_attention saw M == N
        return pairwise_distance(h, w, a.device), h * w
    if tuple(cells.shape) != (N - num_prefix_tokens, M - num_prefix_tokens):
        raise ValueError(f"the layout's positions ({tuple(cells.shape)}) do not match {N} queries and {M} keys "
                         f"minus {num_prefix_tokens} prefix tokens")
    return cells.to(a.device), N - num_prefix_tokens


def _distance_sums(
    attn: Tensor, grid: Any, patch_size: Any, num_prefix_tokens: int, renormalize: bool, name: str = "attn",
    validate: bool = True, cells: Tensor | None = None,
) -> dict[str, Tensor]:
    a = check_attention(attn, name, validate, square=cells is None)  # (B, H, N, M)
    B = a.shape[0]
    ps = _patch_size(patch_size)
    # mass the spatial queries put on the prefix (class) tokens, summed over the batch and queries: (H,)
    prefix = a[..., num_prefix_tokens:, :num_prefix_tokens].sum((0, 2, 3), dtype=torch.float64)
    cell_dist, s_q = _cells(a, grid, num_prefix_tokens, cells)
    a = a[..., num_prefix_tokens:, num_prefix_tokens:]  # (B, H, S_q, S_k) view
    dist = cell_dist * ps  # (S_q, S_k) pixels, float64
    count = _count(a, B * s_q)
    if not renormalize:  # linear in A: sum over the batch first
        return {"sum": _weighted_mass(a, dist), "count": count, "prefix": prefix}
    per_query = (a * dist.to(a.dtype)).sum(-1).double()  # (B, H, S)
    per_query = per_query / a.sum(-1).double().clamp_min(1e-300)  # rows with no spatial mass stay 0
    return {"sum": per_query.sum((0, 2)), "count": count, "prefix": prefix}


def _nonlocality_sums(
    attn: Tensor, grid: Any, num_prefix_tokens: int, name: str = "attn", validate: bool = True,
    cells: Tensor | None = None,
) -> dict[str, Tensor]:
    a = check_attention(attn, name, validate, square=cells is None)  # (B, H, N, M)
    B = a.shape[0]
    dist, s_q = _cells(a, grid, num_prefix_tokens, cells)  # (S_q, S_k) patch units
    a = a[..., num_prefix_tokens:, num_prefix_tokens:]  # (B, H, S_q, S_k) view
    # (1/S) sum_ij (sum_b A_b)_ij d_ij; divided by the example count in compute = nonlocality of mean_b A.
    return {"sum": _weighted_mass(a, dist) / s_q, "count": _count(a, B)}


def _relative_sums(
    attn: Tensor, grid: Any, num_prefix_tokens: int, renormalize: bool, name: str = "attn", validate: bool = True
) -> dict[str, Tensor]:
    a = check_attention(attn, name, validate)  # (B, H, N, N)
    B, H, N, _ = a.shape
    h, w = check_grid(grid, N, num_prefix_tokens)
    S = h * w
    a = a[..., num_prefix_tokens:, num_prefix_tokens:]  # (B, H, S, S) view
    dist = pairwise_distance(h, w, a.device, normalize=True)  # (S, S), positions in [0, 1]^2, zero diagonal
    count = _count(a, B * S)
    if not renormalize:  # self adds 0 (zero diagonal); linear in A
        return {"sum": _weighted_mass(a, dist), "count": count}
    per_query = (a * dist.to(a.dtype)).sum(-1).double()  # (B, H, S): self adds 0
    # divide by the mass on other spatial tokens (summed directly: no cancellation against A_ii); rows with none
    # left stay 0
    mass = (a * _off_diagonal(S, a.dtype, a.device)).sum(-1).double()  # (B, H, S)
    return {"sum": (per_query / mass.clamp_min(1e-300)).sum((0, 2)), "count": count}


def _mean(state: dict[str, Tensor]) -> Tensor:
    return state["sum"] / state["count"]


# ------------------------------------------------------------------------------------------ functions
def attention_entropy(attn: Tensor) -> Tensor:
    """Attention entropy per head (CB: Hyeon-Woo et al. 2023), in nats.

    ``H_i = -sum_j A_ij ln A_ij`` (0 ln 0 = 0) over all N keys (prefix tokens included), averaged over
    the batch and all N queries. Uniform attention gives ln N, one-hot attention 0.

    Args:
        attn: Post-softmax attention (B, H, N, N).

    Returns:
        (H,) float64.
    """
    return _mean(_entropy_sums(attn))


def attention_distance(
    attn: Tensor, grid: Any, patch_size: float, num_prefix_tokens: int = 1, renormalize: bool = False
) -> Tensor:
    """Mean attention distance per head in pixels (ViT paper Fig. 7; RAGHU).

    For each spatial query i: ``sum_j A_ij d_ij``, d the Euclidean distance between patch centres in patch
    units times ``patch_size``; averaged over spatial queries and the batch. Prefix-token rows and columns
    are dropped and, by default, the remaining weights are used as they are: the literature's number
    (Kornblith's code as used by probing-vits for RAGHU; the ViT paper's Fig. 7), so a head that puts mass on
    the class token reads as more local (``class_token_mass`` gives that mass, reported beside it by
    ``vitscope.probe``). ``renormalize=True`` rescales each row to sum to 1 over the spatial keys (a row with
    no spatial mass then contributes 0): the distance of the attention paid to patches alone; with 36% of the
    mass on the class token the two differ by about 55%.

    Args:
        attn: Post-softmax attention (B, H, N, N).
        grid: Spatial token grid (h, w) (or an int for a square grid), h * w = N - num_prefix_tokens.
        patch_size: Pixels per token side.
        num_prefix_tokens: Class/register tokens before the spatial tokens.
        renormalize: Rescale the spatial part of each row to sum to 1 (not the literature's default).

    Returns:
        (H,) float64, pixels.
    """
    return _mean(_distance_sums(attn, grid, patch_size, num_prefix_tokens, renormalize))


def class_token_mass(attn: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Per head, the attention mass spatial queries put on the prefix (class / register) tokens,
    ``sum_{j < p} A_ij`` averaged over spatial queries and the batch: what ``attention_distance`` drops
    without renormalizing (its value is the distance of the remaining ``1 - mass``).

    Args:
        attn: Post-softmax attention (B, H, N, N).
        num_prefix_tokens: Class/register tokens before the spatial tokens.

    Returns:
        (H,) float64, in [0, 1].
    """
    a = check_attention(attn, "attn")  # (B, H, N, N)
    B, _, N, _ = a.shape
    if not 0 <= num_prefix_tokens < N:
        raise ValueError(f"num_prefix_tokens must be in [0, {N}), got {num_prefix_tokens}")
    return a[..., num_prefix_tokens:, :num_prefix_tokens].sum((0, 2, 3), dtype=torch.float64) / (
        B * (N - num_prefix_tokens))


def nonlocality(attn: Tensor, grid: Any, num_prefix_tokens: int = 0) -> Tensor:
    """ConViT nonlocality per head (d'Ascoli et al. 2021), in patch units.

    ``(1/S) sum_ij Abar_ij ||delta_ij||`` with ``Abar`` the attention averaged over the batch, S = h * w
    spatial tokens and delta the offset between patch positions. Prefix-token rows and columns are dropped
    without renormalizing (ConViT's GPSA layers have no prefix token). Matches timm's
    ``GPSA.get_attention_map``.

    Args:
        attn: Post-softmax attention (B, H, N, N).
        grid: Spatial token grid (h, w) (or an int), h * w = N - num_prefix_tokens.
        num_prefix_tokens: Class tokens before the spatial tokens.

    Returns:
        (H,) float64, patch units.
    """
    return _mean(_nonlocality_sums(attn, grid, num_prefix_tokens))


def relative_distance(attn: Tensor, grid: Any, num_prefix_tokens: int = 1, renormalize: bool = True) -> Tensor:
    """Relative distance of interaction per head (CB: Hyeon-Woo et al. 2023), in [0, sqrt(2)].

    Positions are normalized to [0, 1]: token (r, c) of an h x w grid sits at (r / (h - 1), c / (w - 1))
    (an axis of size 1 has coordinate 0), so the largest distance (corner to corner) is sqrt(2).
    Prefix-token rows and columns are dropped and each token's attention to itself is removed. With
    ``renormalize`` (default) the remaining weights of each row are rescaled to sum to 1, so the value is
    the mean distance of the attention a token pays to *other* spatial tokens (a row with nothing left
    contributes 0); without it the raw weights are used. Averaged over spatial queries and the batch.
    No official code exists; this is vitscope's reading of the paper.

    Args:
        attn: Post-softmax attention (B, H, N, N).
        grid: Spatial token grid (h, w) (or an int), h * w = N - num_prefix_tokens.
        num_prefix_tokens: Class/register tokens before the spatial tokens.
        renormalize: Rescale each row to sum to 1 after removing self and prefix tokens.

    Returns:
        (H,) float64.
    """
    return _mean(_relative_sums(attn, grid, num_prefix_tokens, renormalize))


# ---------------------------------------------------------------------------------- streaming classes
class _AttentionMeasure(StreamingMeasure):
    """Shared ``update(attn, layout=None)``: one tensor or a list (``cap.attentions``)."""

    default_prefix = 1

    def __init__(self, grid: Any = None, num_prefix_tokens: int | None = None) -> None:
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens
        super().__init__()

    def _options(self) -> dict[str, Any]:
        return {"grid": self.grid, "num_prefix_tokens": self.num_prefix_tokens}

    def _layer_args(self, layout: Any, i: int) -> tuple[Any, int]:
        grid = layer_option(self.grid, layout, i, "grid")
        if grid is None:
            raise ValueError(
                f"{type(self).__name__} needs the token grid: pass grid=(h, w) to the constructor or "
                "layout=cap.attention_layout to update()"
            )
        prefix = layer_option(self.num_prefix_tokens, layout, i, "num_prefix_tokens")
        return grid, self.default_prefix if prefix is None else prefix

    def _layer_cells(self, layout: Any, i: int, device: torch.device) -> Tensor | None:
        """The layout's query-to-key distances in cells where they are not one plain grid (pooled keys, dilated
        windows; ``LayerInfo.cell_distance``), unless a grid was given to the constructor."""
        info = layout[i] if isinstance(layout, (list, tuple)) else layout
        fn = getattr(info, "cell_distance", None)
        return fn(device) if self.grid is None and callable(fn) else None

    def _sums(self, attn: Tensor, layout: Any, i: int, name: str, validate: bool) -> dict[str, Tensor]:
        raise NotImplementedError

    def update(self, attn: Tensor | list[Tensor], layout: Any = None, *, validate: bool = True) -> None:
        """Add a batch: ``attn`` (B, H, N, N) or a list of them (one per layer, e.g. ``cap.attentions``).

        ``layout``: a LayerInfo or the aligned list (``cap.attention_layout``) giving each layer's grid,
        patch size and prefix tokens; constructor arguments take precedence. ``validate=False`` skips the
        scans of the values (finite, rows of probabilities; shapes are always checked): for callers that
        checked the maps once already, such as ``vitscope.probe`` feeding four attention measures.
        """
        attns, single = as_list(attn, "attn")
        check_layout(layout, len(attns))
        names = ["attn"] if single else [f"attn[{i}]" for i in range(len(attns))]
        self._accumulate(
            [self._sums(a, layout, i, n, validate) for i, (a, n) in enumerate(zip(attns, names))], single
        )

    def _compute_layer(self, state: dict[str, Tensor]) -> Tensor:
        return _mean(state)


class AttentionEntropy(_AttentionMeasure):
    """Streaming ``attention_entropy``: ``compute()`` -> (H,) (or a list, one per layer), nats."""

    def __init__(self) -> None:
        super().__init__()

    def _options(self) -> dict[str, Any]:
        return {}

    def _sums(self, attn: Tensor, layout: Any, i: int, name: str, validate: bool) -> dict[str, Tensor]:
        return _entropy_sums(attn, name, validate)


class AttentionDistance(_AttentionMeasure):
    """Streaming ``attention_distance`` (pixels): sums of per-query distances, of the mass on the prefix tokens
    and query counts; ``compute()`` the distance, ``class_token_mass()`` the mass beside it."""

    def __init__(
        self, grid: Any = None, patch_size: float | None = None, num_prefix_tokens: int | None = None,
        renormalize: bool = False,
    ) -> None:
        self.patch_size = patch_size
        self.renormalize = renormalize
        super().__init__(grid, num_prefix_tokens)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "patch_size": self.patch_size, "renormalize": self.renormalize}

    def _sums(self, attn: Tensor, layout: Any, i: int, name: str, validate: bool) -> dict[str, Tensor]:
        grid, prefix = self._layer_args(layout, i)
        patch_size = layer_option(self.patch_size, layout, i, "patch_size")
        return _distance_sums(attn, grid, patch_size, prefix, self.renormalize, name, validate,
                              self._layer_cells(layout, i, attn.device))

    def class_token_mass(self) -> Tensor | list[Tensor]:
        """Per layer, (H,) mass of the spatial queries on the prefix tokens (``class_token_mass``)."""
        if self._states is None:
            raise ValueError("AttentionDistance.class_token_mass() called before any update()")
        out = [s["prefix"] / s["count"] for s in self._states]
        return out[0] if self._single else out


class Nonlocality(_AttentionMeasure):
    """Streaming ConViT ``nonlocality`` (patch units).

    The state is the sum over examples of ``(1/S) sum_ij A_ij d_ij`` (the distance-weighted sum of A) and
    the example count; the measure is linear in A, so this equals the nonlocality of A averaged over all
    examples exactly.
    """

    default_prefix = 0

    def _sums(self, attn: Tensor, layout: Any, i: int, name: str, validate: bool) -> dict[str, Tensor]:
        grid, prefix = self._layer_args(layout, i)
        return _nonlocality_sums(attn, grid, prefix, name, validate, self._layer_cells(layout, i, attn.device))


class RelativeDistance(_AttentionMeasure):
    """Streaming CB ``relative_distance`` (positions in [0, 1]^2, self excluded)."""

    def __init__(self, grid: Any = None, num_prefix_tokens: int | None = None, renormalize: bool = True) -> None:
        self.renormalize = renormalize
        super().__init__(grid, num_prefix_tokens)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "renormalize": self.renormalize}

    def _sums(self, attn: Tensor, layout: Any, i: int, name: str, validate: bool) -> dict[str, Tensor]:
        grid, prefix = self._layer_args(layout, i)
        return _relative_sums(attn, grid, prefix, self.renormalize, name, validate)
