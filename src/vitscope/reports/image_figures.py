"""Figures drawn on images (ViT Fig. 6 and 7, CONVIT Fig. 5): ``AttentionMaps`` in, a matplotlib ``Figure`` out.

Many small maps are packed into one mosaic array drawn by a single ``imshow`` (grey gaps between tiles), so a
figure of 12 layers x 12 heads costs one image, not 144 axes. Every mosaic of one figure shares one colour
scale, shown by its colour bar; the query patch is outlined in white on the image and on every map.
"""
from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from vitscope.attention_images import AttentionMaps

__all__ = ["rollout_figure", "query_maps_figure", "gpsa_figure", "patch_components_figure",
           "position_similarity_figure", "save_attention_figures"]

MAP_CMAP = "inferno"
GAP = 1  # pixels of gap between mosaic tiles


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _bare(ax, title: str = "") -> None:
    ax.set_axis_off()  # no ticks: matplotlib's tick objects cost more than the images
    if title:
        ax.set_title(title, fontsize=8)


def _labels_at(ax, positions: Sequence[float], labels: Sequence[str], axis: str, fontsize: float = 6,
               top: bool = False) -> None:
    """Tick-like labels as plain texts (an axis of 48 ticks costs ~0.1 s to draw, texts almost nothing)."""
    for p, text in zip(positions, labels):
        if axis == "x":
            ax.text(p, 1.01 if top else -0.01, text, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom" if top else "top", fontsize=fontsize)
        else:
            ax.text(-0.01, p, text, transform=ax.get_yaxis_transform(), ha="right", va="center", fontsize=fontsize)


def _thin(n: int, most: int = 16) -> list[int]:
    step = max(1, -(-n // most))
    return list(range(0, n, step))


def _resize_nearest(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w[, c]) -> (H, W[, c]) by nearest neighbour (exact block repeats when H, W are multiples)."""
    h, w = m.shape[:2]
    rows = (np.arange(size[0]) * h // size[0]).astype(int)
    cols = (np.arange(size[1]) * w // size[1]).astype(int)
    return m[rows][:, cols]


def mosaic(tiles: Sequence[Sequence[np.ndarray]], tile: tuple[int, int] | None = None, group: int = 0,
           group_gap: int = 4) -> np.ndarray:
    """Rows of 2-D (or RGB) tiles -> one array with NaN gaps; tiles resized (nearest) to the largest tile.
    With ``group``, every ``group`` columns are set apart by ``group_gap`` extra pixels."""
    flat = [t for row in tiles for t in row]
    th = tile[0] if tile else max(t.shape[0] for t in flat)
    tw = tile[1] if tile else max(t.shape[1] for t in flat)
    n_rows, n_cols = len(tiles), max(len(r) for r in tiles)
    extra = flat[0].shape[2:]
    width = n_cols * (tw + GAP) - GAP + (((n_cols - 1) // group) * group_gap if group else 0)
    out = np.full((n_rows * (th + GAP) - GAP, width, *extra), np.nan, dtype=np.float64)
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            y, x = i * (th + GAP), _tile_x(j, tw, group, group_gap)
            out[y:y + th, x:x + tw] = _resize_nearest(np.asarray(t, dtype=np.float64), (th, tw))
    return out


def _tile_x(j: int, tw: int, group: int = 0, group_gap: int = 4) -> int:
    return j * (tw + GAP) + ((j // group) * group_gap if group else 0)


def _cell_boxes(cells: Sequence[tuple[int, int, int, int, int, int]], th: int, tw: int,
                group: int = 0) -> PatchCollection:
    """White outlines of the query cell (row, col) of a (h, w) grid inside mosaic tile (i, j)."""
    rects = []
    for i, j, r, c, h, w in cells:
        ch, cw = th / h, tw / w
        rects.append(Rectangle((_tile_x(j, tw, group) + c * cw - 0.5, i * (th + GAP) + r * ch - 0.5), cw, ch))
    return PatchCollection(rects, facecolor="none", edgecolor="white", linewidth=0.7)


def _image_strip(images: np.ndarray, gap: int) -> np.ndarray:
    """(B, H, W, 3) images side by side, white ``gap`` pixels apart."""
    B, H, W, _ = images.shape
    out = np.ones((H, B * (W + gap) - gap, 3))
    for b in range(B):
        out[:, b * (W + gap):b * (W + gap) + W] = images[b]
    return out


def _query_boxes(box: tuple[float, float, float, float], n: int, width: int, gap: int, dy: float = 0.0) -> list:
    y0, x0, y1, x1 = box
    rects = []
    for b in range(n):
        xo = b * (width + gap)
        rects.append(Rectangle((xo + x0 - 0.5, dy + y0 - 0.5), x1 - x0, y1 - y0, facecolor="none",
                               edgecolor="white", lw=1.2))
        rects.append(Rectangle((xo + x0 - 0.5, dy + y0 - 0.5), x1 - x0, y1 - y0, facecolor="none",
                               edgecolor="black", lw=0.5, linestyle="--"))
    return rects


def _labels(maps: AttentionMaps) -> list[str]:
    labels = maps.meta.get("labels")
    return [str(v) for v in labels] if isinstance(labels, list) else []


def _image_names(maps: AttentionMaps, images: Sequence[int]) -> list[str]:
    labels = _labels(maps)
    return [labels[b] if b < len(labels) else f"image {b}" for b in images]


def _name_images(ax, names: Sequence[str], width: int, gap: int) -> None:
    ax.set_axis_off()
    _labels_at(ax, [b * (width + gap) + width / 2 for b in range(len(names))], list(names), "x", 7, top=True)


def rollout_figure(maps: AttentionMaps, title: str = "") -> Figure:
    """Each image above its rollout overlay (patch blocks, 65% opacity over the grey image); one colour scale
    (smallest .. largest weight over all images). Drawn as one composite image."""
    from matplotlib import colormaps

    if maps.rollout is None:
        raise ValueError(f"no rollout: {maps.rollout_source or 'not computed'}")
    B, H, W, _ = maps.images.shape
    lo, hi = float(np.nanmin(maps.rollout)), float(np.nanmax(maps.rollout))
    norm = Normalize(lo, hi if hi > lo else lo + 1e-12)  # one scale for all images
    cmap = colormaps[MAP_CMAP]
    gap = max(2, W // 16)
    over = np.empty_like(maps.images, dtype=np.float64)
    for b in range(B):
        heat = cmap(norm(_resize_nearest(maps.rollout[b], (H, W))))[..., :3]  # (H, W, 3)
        grey = maps.images[b].mean(-1, keepdims=True)
        over[b] = 0.35 * grey + 0.65 * heat
    top, bottom = _image_strip(maps.images, gap), _image_strip(over, gap)
    comp = np.concatenate([top, np.ones((gap, top.shape[1], 3)), bottom])  # (2H + gap, ..., 3)
    fig = _figure((min(16.0, 1.2 * B + 1.1), 2.9))
    ax = fig.add_subplot()
    ax.imshow(comp, interpolation="nearest")
    _name_images(ax, _image_names(maps, range(B)), W, gap)
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, shrink=0.5, anchor=(0.0, 0.0), label="rollout weight")
    fig.suptitle(textwrap.fill(title or f"Attention rollout ({maps.rollout_source})", 70), fontsize=9)
    return fig


def query_maps_figure(maps: AttentionMaps, images: Sequence[int] | None = None, title: str = "",
                      gamma: float = 0.5) -> Figure:
    """The images with the query patch outlined, above a mosaic of the attention maps of that patch: one row
    per layer, one column per head, the heads of each image side by side under it; one power-law colour scale
    (``gamma``) from 0 to the largest weight, so diffuse and sharp heads both show."""
    images = list(range(maps.images.shape[0])) if images is None else list(images)
    heads = max(m.shape[1] for m in maps.query_maps)
    L, n = len(maps.query_maps), len(images)
    tiles = [[m[b, h] if h < m.shape[1] else np.full(m.shape[2:], np.nan) for b in images for h in range(heads)]
             for m in maps.query_maps]
    mos = mosaic(tiles, group=heads)
    th = max(m.shape[2] for m in maps.query_maps)
    tw = max(m.shape[3] for m in maps.query_maps)
    group_w = _tile_x(heads, tw, heads) - 4  # width of one image's heads in the mosaic
    # images scaled to their group's width, so each sits above its own heads
    H, W = maps.images.shape[1:3]
    side = max(group_w, 1)
    pics = np.stack([_resize_nearest(maps.images[b], (int(round(side * H / W)), side)) for b in images])
    scale = side / W
    box = tuple(v * scale for v in maps.query_box)
    strip = _image_strip(pics, 4)
    width = min(16.0, max(4.8, 0.42 * heads * n + 1.8))
    fig = _figure((width, width * (strip.shape[0] + mos.shape[0]) / max(mos.shape[1], 1) * 0.8 + 1.0))
    ax_img, ax = fig.subplots(2, 1, height_ratios=[strip.shape[0], mos.shape[0]])
    ax_img.imshow(strip, interpolation="nearest")
    for r in _query_boxes(box, n, side, 4):
        ax_img.add_patch(r)
    _name_images(ax_img, _image_names(maps, images), side, 4)
    vmax = float(np.nanmax(mos)) or 1.0
    im = ax.imshow(mos, cmap=MAP_CMAP, norm=PowerNorm(gamma, 0.0, vmax), interpolation="nearest")
    cells = [(i, k * heads + h, *maps.query_cells[i], *maps.query_maps[i].shape[2:]) for i in range(L)
             for k in range(n) for h in range(maps.query_maps[i].shape[1])]
    ax.add_collection(_cell_boxes(cells, th, tw, heads))
    ax.set_axis_off()
    _labels_at(ax, [i * (th + GAP) + th / 2 for i in range(L)],
               [f"{name.removeprefix('blocks.').removesuffix('.attn')} {kind}"
                for name, kind in zip(maps.layers, maps.kinds)], "y")
    cols = [(k, h) for k in range(n) for h in range(heads)]
    _labels_at(ax, [_tile_x(j, tw, heads) + tw / 2 for j in range(len(cols))], [f"h{h}" for _, h in cols], "x",
               5 if len(cols) > 24 else 6)
    fig.colorbar(im, ax=[ax_img, ax], shrink=0.6, label=f"attention (power {gamma:g})")
    title = title or f"Attention of query patch {maps.query}: layers (rows) x heads (columns) per image"
    fig.suptitle(textwrap.fill(title, int(width * 11)), fontsize=9)
    return fig


def gpsa_figure(maps: AttentionMaps, title: str = "", gamma: float = 0.5) -> Figure:
    """ConViT: the gates sigmoid(lambda) per GPSA layer and head, and each head's positional attention of the
    query patch (before gating); one colour scale for all positional maps."""
    if maps.gpsa_gates is None or maps.gpsa_positional is None:
        raise ValueError("no GPSA layer in these maps (not a ConViT)")
    gates, pos = maps.gpsa_gates, maps.gpsa_positional  # (L, heads), (L, heads, h, w)
    L, heads, h, w = pos.shape
    fig = _figure((1.4 + 0.5 * heads + 0.6 * heads + 1.2, max(2.4, 0.5 * L + 0.8)))
    ax_g, ax_p = fig.subplots(1, 2, width_ratios=[max(1.0, 0.5 * heads), max(1.0, 0.6 * heads)])
    img = ax_g.imshow(gates, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for i in range(L):
        for j in range(heads):
            ax_g.text(j, i, f"{gates[i, j]:.2f}", ha="center", va="center", fontsize=6,
                      color="white" if gates[i, j] < 0.6 else "black")
    ax_g.set_axis_off()
    _labels_at(ax_g, range(heads), [f"h{j}" for j in range(heads)], "x")
    _labels_at(ax_g, range(L), [f"GPSA {i}" for i in range(L)], "y")
    ax_g.set_title("gate sigmoid(λ): 1 = positional", fontsize=8)
    fig.colorbar(img, ax=ax_g, shrink=0.8)
    mos = mosaic([[pos[i, j] for j in range(heads)] for i in range(L)])
    im = ax_p.imshow(mos, cmap=MAP_CMAP, norm=PowerNorm(gamma, 0.0, float(np.nanmax(mos)) or 1.0),
                     interpolation="nearest")
    r, c = maps.query_cells[maps.kinds.index("gpsa")] if "gpsa" in maps.kinds else maps.query
    ax_p.add_collection(_cell_boxes([(i, j, r, c, h, w) for i in range(L) for j in range(heads)], h, w))
    _bare(ax_p, f"positional attention of patch {(r, c)}")
    fig.colorbar(im, ax=ax_p, shrink=0.8, label=f"positional attention (power {gamma:g})")
    fig.suptitle(title or "ConViT GPSA gates and positional attention", fontsize=9)
    return fig


def patch_components_figure(maps: AttentionMaps, title: str = "", cols: int = 7) -> Figure:
    """The principal components of the patch-embedding filters as small images (ViT Fig. 7 left), each scaled
    to its own [min, max], with its explained-variance share."""
    if maps.patch_components is None:
        raise ValueError("no patch-embedding components (no linear patch embedding)")
    comps = maps.patch_components  # (k, C, P, P)
    k = comps.shape[0]
    tiles = []
    for c in comps:
        t = np.moveaxis(c, 0, -1)  # (P, P, C)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-12)
        tiles.append(t if t.shape[-1] == 3 else np.repeat(t[..., :1], 3, axis=-1))
    cols = min(cols, k)
    rows = [tiles[i:i + cols] for i in range(0, k, cols)]
    P = comps.shape[-1]
    scale = max(1, 16 // P)  # draw tiny patches at least 16 px
    mos = mosaic(rows, (P * scale, P * scale))
    mos = np.where(np.isnan(mos), 1.0, mos)  # white gaps in an RGB image
    fig = _figure((0.55 * cols + 0.4, 0.6 * len(rows) + 0.6))
    ax = fig.add_subplot()
    ax.imshow(mos, interpolation="nearest")
    _bare(ax)
    expl = maps.patch_explained
    share = f"; together {100 * float(expl.sum()):.0f}% of the variance" if expl is not None else ""
    ax.set_title(title or f"Patch-embedding filters: first {k} principal components{share}", fontsize=8)
    return fig


def position_similarity_figure(maps: AttentionMaps, title: str = "") -> Figure:
    """Position-embedding similarity (ViT Fig. 7 centre): tile (i, j) shows the cosine similarity of the
    embedding of patch (i, j) with every other patch's, on one scale from -1 to 1."""
    if maps.position_similarity is None or maps.position_grid is None:
        raise ValueError("no position-embedding similarity (no learned position embedding)")
    h, w = maps.position_grid
    sim = maps.position_similarity.reshape(h, w, h, w)
    mos = mosaic([[sim[i, j] for j in range(w)] for i in range(h)])
    fig = _figure((4.2, 3.7))
    ax = fig.add_subplot()
    im = ax.imshow(mos, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    _labels_at(ax, [j * (w + GAP) + w / 2 for j in _thin(w)], [str(j) for j in _thin(w)], "x", 5)
    _labels_at(ax, [i * (h + GAP) + h / 2 for i in _thin(h)], [str(i) for i in _thin(h)], "y", 5)
    ax.text(0.5, -0.06, "input patch column", transform=ax.transAxes, ha="center", va="top", fontsize=8)
    ax.text(-0.07, 0.5, "input patch row", transform=ax.transAxes, ha="right", va="center", rotation=90,
            fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.85, label="cosine similarity")
    ax.set_title(title or "Position-embedding similarity", fontsize=9)
    return fig


def _png(fig: Figure, dpi: int = 130) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def save_attention_figures(maps: AttentionMaps, out_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Write every figure the maps support as PNG into ``out_dir`` (atomically): ``rollout.png``,
    ``query_maps_<i>.png`` per image, ``gpsa.png``, ``patch_embedding.png``, ``position_embedding.png``."""
    from vitscope.io.atomic import atomic_write_bytes

    out = Path(out_dir)
    figs: list[tuple[str, Figure]] = []
    if maps.rollout is not None:
        figs.append(("rollout", rollout_figure(maps, f"{prefix}attention rollout ({maps.rollout_source})")))
    for b in range(maps.images.shape[0]):
        figs.append((f"query_maps_{b}", query_maps_figure(maps, [b], f"{prefix}attention of patch {maps.query}, "
                                                                   "per layer (rows) and head (columns)")))
    if maps.gpsa_gates is not None:
        figs.append(("gpsa", gpsa_figure(maps, f"{prefix}GPSA gates and positional attention")))
    if maps.patch_components is not None:
        figs.append(("patch_embedding", patch_components_figure(maps)))
    if maps.position_similarity is not None:
        figs.append(("position_embedding", position_similarity_figure(maps, f"{prefix}position-embedding "
                                                                            "similarity")))
    paths = []
    for name, fig in figs:
        path = out / f"{name}.png"
        atomic_write_bytes(path, _png(fig))
        fig.clear()
        paths.append(path)
    return paths
