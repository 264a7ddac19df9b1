"""What each captured tensor is: the sub-layer it came from and how its tokens map to space."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LayerInfo:
    """Where a captured tensor comes from.

    Attributes:
        name: Module path of the sub-layer (``blocks.3.attn``, ``blocks.3.mlp``, ``layer2.1``).
        kind: ``stem`` (the stream entering the first block: patch embedding with position embedding and
            class token for a ViT, the stem convolutions and pooling for a CNN; ``block`` = -1), ``block`` (a
            whole block's output: ``layers="blocks"``, or a block whose sub-layers vitscope cannot split),
            ``msa`` (self-attention), ``gpsa`` (ConViT gated positional attention), ``mlp``, ``conv`` (a
            residual conv block that keeps the map size), ``downsample`` (a conv block whose output map is
            smaller than its input: stride or pooling; HDVW treats subsampling apart, it lowers variance),
            ``channel`` (XCiT's channel-attention sub-layer) or ``pooled`` / ``channel`` / ``other`` for attention
            maps whose keys are pooled (PVT, Twins, MViTv2), that attend over channels (XCiT) or whose geometry
            vitscope does not know: no distance, nonlocality or
            query map is computed on those (the probe names them under ``not_applicable``),
            ``smoothing`` (a spatial-smoothing layer, e.g. the blur between ResNet stages; "Blurs Behave Like
            Ensembles": like subsampling, it lowers variance).
        block: Index of the block (residual block or smoothing layer) in forward order (0-based; -1: the stem).
        num_prefix_tokens: Class/register tokens before the spatial tokens (0 for maps and windows).
        grid: Spatial token grid (h, w), or the feature-map size for CNN blocks.
        patch_size: Pixels per token (or per feature-map cell) along one side, when known.
        num_heads: Attention heads, for attention layers.
        stage: Index of the stage (resolution level, timm's ``feature_info``) holding the block; 0 for an
            isotropic model (ViT), None for the stem.
        window_shift: For attention in square windows (``grid`` = the window), the cyclic shift (rows, cols) of
            the map before it was cut into windows (Swin's shifted windows; (0, 0) for plain windows): window
            position (i, j) of window (u, v) is map cell ((u * ws + i + shift_r) mod H, (v * ws + j + shift_c)
            mod W), windows numbered row-major per image.
        query_coords: Where the spatial queries sit when not on the plain grid ``grid``: (row coordinates, column
            coordinates) of the h x w query grid, in cells of ``patch_size`` pixels (None: 0..h-1, 0..w-1). MaxViT's
            grid attention: a window's tokens lie ``map / grid`` cells apart.
        key_grid: The key grid (hk, wk) when keys are pooled or spatially reduced (PVTv2, Twins); None: the keys
            are the queries' tokens.
        key_coords: (row, column) coordinates of ``key_grid`` (or of ``grid`` when it is None and
            ``query_coords`` is given) in the same cells: a key made by an s x s stride-s reduction sits at the
            centre of the cells it covers, i * s + (s - 1) / 2.
    """

    name: str
    kind: str
    block: int
    num_prefix_tokens: int = 0
    grid: tuple[int, int] | None = None
    patch_size: int | None = None
    num_heads: int | None = None
    stage: int | None = None
    window_shift: tuple[int, int] | None = None
    query_coords: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    key_grid: tuple[int, int] | None = None
    key_coords: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def is_attention(self) -> bool:
        return self.kind in ("msa", "gpsa")

    @property
    def has_positions(self) -> bool:
        """Whether queries and keys are the same tokens of a plain token grid (or a square window of one), so
        query maps, rollout and relative distance mean something."""
        return self.kind in ("msa", "gpsa") and self.grid is not None and self.query_coords is None \
            and self.key_grid is None

    @property
    def has_key_positions(self) -> bool:
        """Whether every spatial query and key sits at a known place (``has_positions``, or coordinates given for
        pooled keys or dilated windows), so attention distance, nonlocality and entropy over keys apply."""
        return self.has_positions or (self.kind in ("msa", "pooled") and self.grid is not None
                                      and self.key_coords is not None)

    def cell_distance(self, device: torch.device | None = None) -> torch.Tensor | None:
        """(S_q, S_k) Euclidean distance, in cells of ``patch_size`` pixels, from each spatial query to each
        spatial key (float64), when they are not one plain grid (``query_coords`` / ``key_coords``); else None."""
        if self.key_coords is None or self.grid is None:
            return None
        qr, qc = self.query_coords or (tuple(range(self.grid[0])), tuple(range(self.grid[1])))
        kr, kc = self.key_coords

        def points(rows, cols):  # row-major grid points, (len(rows) * len(cols), 2)
            r = torch.tensor(rows, dtype=torch.float64, device=device)
            c = torch.tensor(cols, dtype=torch.float64, device=device)
            return torch.stack([r.repeat_interleave(len(cols)), c.repeat(len(rows))], dim=-1)

        return torch.cdist(points(qr, qc), points(kr, kc))  # (S_q, S_k)

    def to_dict(self) -> dict:
        return asdict(self)


def tokens_to_map(x: torch.Tensor, grid: tuple[int, int] | None = None, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Turn ViT tokens (B, N, D) into feature maps (B, D, h, w) after dropping prefix tokens.

    A 4-D input (already B, C, H, W) is returned unchanged, so measures treat ViTs and CNNs alike.
    ``grid`` defaults to a square grid.
    """
    if x.ndim == 4:
        return x
    if x.ndim != 3:
        raise ValueError(f"tokens_to_map expects (B, N, D) tokens or (B, C, H, W) maps, got shape {tuple(x.shape)}")
    B, N, D = x.shape
    n_spatial = N - num_prefix_tokens
    if grid is None:
        side = int(round(n_spatial**0.5))
        grid = (side, side)
    h, w = grid
    if h * w != n_spatial:
        raise ValueError(
            f"{N} tokens minus {num_prefix_tokens} prefix tokens = {n_spatial} do not fill a {h}x{w} grid; "
            "pass the right grid and num_prefix_tokens (see cap.layout)"
        )
    return x[:, num_prefix_tokens:].transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)


def first_tensor(x) -> torch.Tensor | None:
    """The tensor a block passes on: itself, or the first tensor of a tuple/list output (None if there is none)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):  # a DenseNet layer takes the list of the maps so far
        return next((t for t in map(first_tensor, x) if t is not None), None)
    return None
