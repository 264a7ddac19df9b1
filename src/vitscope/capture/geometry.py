"""Where the keys of an attention map sit when they are not the query tokens: the table of attention types with
pooled or spatially reduced keys and of window partitions that are not contiguous (a new family is an entry).

- Spatial reduction (PVTv2 ``Attention``, Twins ``GlobalSubSampleAttn``): keys and values come from an
  s x s convolution of stride s over the h x w query map (``sr``), so key (i, j) covers the query cells
  [i s, (i + 1) s) x [j s, (j + 1) s) and sits at their centre, (i s + (s - 1) / 2, j s + (s - 1) / 2) in query
  cells; PVTv2's linear mode pools to a fixed grid first (``AdaptiveAvgPool2d``), whose bin i covers
  [floor(i h / o), ceil((i + 1) h / o)) (PyTorch's adaptive pooling), centre at the bin's middle.
- MaxViT/CoAtNet ``PartitionAttention*`` with ``partition_block`` False (grid attention): the map is cut into a
  g x g grid of windows whose tokens lie H / g cells apart (timm ``grid_partition``): token (i, j) of a window
  sits at (i H / g, j W / g) plus the window's offset, which cancels in every distance.
- MobileViT ``MobileVitBlock``: its transformer runs on the map unfolded into p x p patches, one sequence per
  pixel position (u, v) of a patch (the batch times p * p); token (i, j) of sequence (u, v) is map cell
  (i p + u, j p + v): a dilated window with step p.

- Twins ``LocallyGroupedAttn``: square windows of the token map (padded at the bottom and right, as Swin pads)
  whose maps come per image, (B, windows, heads, n, n) (``WINDOW_GROUPS``): capture records them as Swin's,
  (B windows, heads, n, n), windows row-major.

Hiera's tokens are unrolled by mask unit (``UNROLLED_TOKENS``): no grid is claimed for them.
PiT's token grids (16 px patches at stride 8: their side does not divide the image) take their pixel step from
timm's ``feature_info`` reduction of the stage (``capture.sites.stage_reductions``). Attention whose keys are
pooled by a stride with padding (MViTv2, Hiera's mask units) exposes no map to ``*attn_drop`` hooks, so capture sees
none (as timm's ``AttentionExtract``). CaiT/XCiT class attention (one query, the class token) has no query
position: it stays ``pooled`` with no coordinates, and the measures name it as not applicable.
"""
from __future__ import annotations

import math

import torch.nn as nn
from timm.models import hiera, maxxvit, mobilevit, pvt_v2, twins

Coords = tuple[tuple[float, ...], tuple[float, ...]]

REDUCED_KEYS: tuple[type, ...] = (pvt_v2.Attention, twins.GlobalSubSampleAttn)
GRID_PARTITION: tuple[type, ...] = (maxxvit.PartitionAttentionCl, maxxvit.PartitionAttention2d)
UNFOLDED_PATCHES: tuple[type, ...] = (mobilevit.MobileVitBlock,)
WINDOW_GROUPS: tuple[type, ...] = (twins.LocallyGroupedAttn,)  # maps (B, windows, heads, n, n)
# models whose token sequences are not row-major over the image (Hiera unrolls them by mask unit): capture claims no
# grid for their tokens, so spatial measures (Fourier, feature variance, query maps) name them not applicable
UNROLLED_TOKENS: tuple[type, ...] = (hiera.Hiera,)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _adaptive_centres(n: int, out: int) -> tuple[float, ...]:
    return tuple((math.floor(i * n / out) + math.ceil((i + 1) * n / out) - 1) / 2 for i in range(out))


def reduced_key_coords(attn: nn.Module, grid: tuple[int, int], n_keys: int) -> tuple[tuple[int, int], Coords] | None:
    """(key grid, key coordinates in query cells) of a spatial-reduction attention over an (h, w) query grid, or
    None when ``attn`` is not in the table or its keys do not match."""
    if not isinstance(attn, REDUCED_KEYS):
        return None
    h, w = grid
    pool, sr = getattr(attn, "pool", None), getattr(attn, "sr", None)
    if isinstance(pool, nn.AdaptiveAvgPool2d):  # PVTv2 linear: pool to a fixed grid, then a 1x1 conv
        oh, ow = _pair(pool.output_size)
        coords = (_adaptive_centres(h, oh), _adaptive_centres(w, ow))
    elif isinstance(sr, nn.Conv2d) and sr.kernel_size == sr.stride and _pair(sr.padding) == (0, 0):
        sh, sw = _pair(sr.stride)
        oh, ow = h // sh, w // sw
        coords = (tuple(i * sh + (sh - 1) / 2 for i in range(oh)), tuple(j * sw + (sw - 1) / 2 for j in range(ow)))
    elif sr is None and pool is None:
        oh, ow = h, w
        coords = (tuple(float(i) for i in range(h)), tuple(float(j) for j in range(w)))
    else:
        return None
    return ((oh, ow), coords) if oh * ow == n_keys else None


def window_step(ancestors: list[nn.Module], g: tuple[int, int], map_hw: tuple[int, int]) -> tuple[float, float] | None:
    """Map cells between neighbouring tokens of one g x g window over an (H, W) map when windows are dilated:
    MaxViT grid attention (H / g), MobileViT's unfolded patches (the patch size); None for contiguous windows.
    ``ancestors``: the attention module's parent first, then up to the model."""
    parent = ancestors[0] if ancestors else None
    if isinstance(parent, GRID_PARTITION) and not parent.partition_block:
        return (map_hw[0] / g[0], map_hw[1] / g[1])
    for a in ancestors:
        if isinstance(a, UNFOLDED_PATCHES):
            return (float(a.patch_size[0]), float(a.patch_size[1]))
    return None


def dilated_coords(g: tuple[int, int], step: tuple[float, float]) -> Coords:
    """Coordinates, in map cells, of the g x g tokens of one dilated window (its offset cancels in distances)."""
    return (tuple(i * step[0] for i in range(g[0])), tuple(j * step[1] for j in range(g[1])))
