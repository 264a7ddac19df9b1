"""Figures drawn on images (ViT Fig. 6 and 7, CONVIT Fig. 5): ``AttentionMaps`` in, a matplotlib ``Figure`` out.

Every figure is one axes showing one RGB canvas: many small maps packed into a mosaic (white gaps between
tiles), colour bars drawn as gradients in the same axes, labels as texts (an axes with ticks costs more to
draw than all these pixels). Every mosaic of one figure shares one colour scale, shown by its colour bar;
the query patch is outlined in white on the image and on every map.
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from vitscope.probing.attention_images import AttentionMaps
from vitscope.reports import render as R

__all__ = ["rollout_figure", "query_maps_figure", "gpsa_figure", "patch_components_figure",
           "position_similarity_figure", "save_attention_figures"]

MAP_CMAP = "inferno"
GAP = 1  # pixels of gap between mosaic tiles


def _canvas_axes(canvas: np.ndarray, px_in: float, extra: tuple[float, float] = (1.3, 0.8),
                 most: float = 16.0) -> tuple[Figure, object]:
    """One figure, one axes without ticks, one RGB image: ``px_in`` inches per canvas pixel (capped so the
    figure is at most ``most`` inches wide), ``extra`` inches around it for labels. Every figure here is drawn
    this way: an axes costs more than all the pixels of these images, a matplotlib colour bar as much again."""
    H, W = canvas.shape[:2]
    px_in = min(px_in, (most - extra[0]) / W)
    fig = R.figure((W * px_in + extra[0], H * px_in + extra[1]))
    ax = fig.add_subplot()
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    return fig, ax


def _rgb(values: np.ndarray, cmap, norm) -> np.ndarray:
    """Values (..., h, w) -> RGB (..., h, w, 3) through ``cmap(norm(.))``; NaN (gaps) white."""
    from matplotlib import colormaps

    cm = colormaps[cmap] if isinstance(cmap, str) else cmap
    out = cm(norm(np.nan_to_num(values, nan=norm.vmin)))[..., :3]
    out[np.isnan(values)] = 1.0
    return out


def _paste(canvas: np.ndarray, block: np.ndarray, y: int, x: int) -> None:
    canvas[y:y + block.shape[0], x:x + block.shape[1]] = block


def _colour_bar(ax, cmap, norm, y: int, height: int, x: int, width: int, label: str,
                ticks: Sequence[float] | None = None, fontsize: float = 6) -> None:
    """A colour bar drawn into ``ax`` at canvas pixels (y, x) of size (height, width): a 256-step gradient image
    (largest value on top, evenly spaced in ``norm``'s scale) with text ticks and a rotated label. Keeps the
    figure at one axes: matplotlib's ``colorbar`` adds a full axis, about half the cost of these figures."""
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    values = np.asarray(norm.inverse(np.linspace(1, 0, 256)), dtype=float)[:, None]  # (256, 1), top = max
    ax.imshow(_rgb(values, cmap, norm), extent=(x - 0.5, x + width - 0.5, y + height - 0.5, y - 0.5),
              interpolation="nearest")  # default aspect: keeps the canvas' square pixels
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    lo, hi = float(norm.vmin), float(norm.vmax)
    if ticks is None:
        ticks = [lo + (hi - lo) * f for f in ((0.0, 0.05, 0.25, 1.0) if isinstance(norm, PowerNorm)
                                              else (0.0, 0.5, 1.0))]
    right = x + width - 0.5
    texts = [f" {t:.3g}" for t in ticks]
    for t, text in zip(ticks, texts):
        ax.text(right, y - 0.5 + height * (1 - float(norm(t))), text, ha="left", va="center", fontsize=fontsize)
    if label:  # clear of the widest tick text (a digit is about 0.6 em wide)
        pad = max(30.0, 4 + 0.62 * fontsize * max(len(text) for text in texts))
        ax.annotate(label, (right, y - 0.5 + height / 2), xytext=(pad, 0), textcoords="offset points", ha="left",
                    va="center", rotation=90, fontsize=fontsize + 1)


def _bare(ax, title: str = "") -> None:
    ax.set_axis_off()  # no ticks: matplotlib's tick objects cost more than the images
    if title:
        ax.set_title(title, fontsize=8)


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


def _cell_boxes(cells: Sequence[tuple[int, int, int, int, int, int]], th: int, tw: int, group: int = 0,
                dy: float = 0.0, dx: float = 0.0) -> PatchCollection:
    """White outlines of the query cell (row, col) of a (h, w) grid inside mosaic tile (i, j)."""
    rects = []
    for i, j, r, c, h, w in cells:
        ch, cw = th / h, tw / w
        rects.append(Rectangle((dx + _tile_x(j, tw, group) + c * cw - 0.5, dy + i * (th + GAP) + r * ch - 0.5),
                               cw, ch))
    return PatchCollection(rects, facecolor="none", edgecolor="white", linewidth=0.7)


def _labels_at(ax, positions: Sequence[float], labels: Sequence[str], axis: str, at: float,
               fontsize: float = 6) -> None:
    """Tick-like labels as plain texts in data pixels: along x at height ``at``, or along y left of ``at``."""
    for p, text in zip(positions, labels):
        if axis == "x":
            ax.text(p, at, text, ha="center", va="bottom" if at < 0 else "top", fontsize=fontsize)
        else:
            ax.text(at, p, text + " ", ha="right", va="center", fontsize=fontsize)


def _thin(n: int, most: int = 16) -> list[int]:
    step = max(1, -(-n // most))
    return list(range(0, n, step))


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


def _suptitle(fig: Figure, title: str) -> None:
    fig.suptitle(textwrap.fill(title, max(40, int(fig.get_figwidth() * 12))), fontsize=9)


def rollout_figure(maps: AttentionMaps, title: str = "") -> Figure:
    """Each image above its rollout overlay (patch blocks, 65% opacity over the grey image); one colour scale
    (smallest .. largest weight over all images)."""
    if maps.rollout is None:
        raise ValueError(f"no rollout: {maps.rollout_source or 'not computed'}")
    B, H, W, _ = maps.images.shape
    lo, hi = float(np.nanmin(maps.rollout)), float(np.nanmax(maps.rollout))
    norm = Normalize(lo, hi if hi > lo else lo + 1e-12)  # one scale for all images
    gap = max(2, W // 16)
    over = np.empty_like(maps.images, dtype=np.float64)
    for b in range(B):
        heat = _rgb(_resize_nearest(maps.rollout[b], (H, W)), MAP_CMAP, norm)  # (H, W, 3)
        over[b] = 0.35 * maps.images[b].mean(-1, keepdims=True) + 0.65 * heat
    top, bottom = _image_strip(maps.images, gap), _image_strip(over, gap)
    bar_w = max(2, W // 12)
    canvas = np.ones((2 * H + gap, top.shape[1] + 2 * gap + bar_w, 3))
    _paste(canvas, top, 0, 0)
    _paste(canvas, bottom, H + gap, 0)
    fig, ax = _canvas_axes(canvas, 1.15 / W, (1.3, 0.7))
    _colour_bar(ax, MAP_CMAP, norm, H + gap, H, top.shape[1] + 2 * gap, bar_w, "rollout weight")
    _labels_at(ax, [b * (W + gap) + W / 2 for b in range(B)], _image_names(maps, range(B)), "x", -1, 7)
    _suptitle(fig, title or f"Attention rollout ({maps.rollout_source})")
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
    side = heads * (tw + GAP)  # one image's heads, so each image sits above its own heads
    H, W = maps.images.shape[1:3]
    pics = np.stack([_resize_nearest(maps.images[b], (int(round(side * H / W)), side)) for b in images])
    strip = _image_strip(pics, 4)
    norm = PowerNorm(gamma, 0.0, float(np.nanmax(mos)) or 1.0)
    sep = max(2, th // 2)
    bar_w = max(1, tw // 3)
    top = strip.shape[0] + sep
    canvas = np.ones((top + mos.shape[0], max(strip.shape[1], mos.shape[1]) + 2 * GAP + bar_w + 1, 3))
    _paste(canvas, strip, 0, 0)
    _paste(canvas, _rgb(mos, MAP_CMAP, norm), top, 0)
    fig, ax = _canvas_axes(canvas, 0.42 / (tw + GAP), (1.8, 0.9))
    for r in _query_boxes(tuple(v * side / W for v in maps.query_box), n, side, 4):
        ax.add_patch(r)
    cells = [(i, k * heads + h, *maps.query_cells[i], *maps.query_maps[i].shape[2:]) for i in range(L)
             for k in range(n) for h in range(maps.query_maps[i].shape[1])]
    ax.add_collection(_cell_boxes(cells, th, tw, heads, dy=top))
    _labels_at(ax, [top + i * (th + GAP) + th / 2 for i in range(L)],
               [f"{name.removeprefix('blocks.').removesuffix('.attn')} {kind}"
                for name, kind in zip(maps.layers, maps.kinds)], "y", -0.5)
    cols = [(k, h) for k in range(n) for h in range(heads)]
    _labels_at(ax, [_tile_x(j, tw, heads) + tw / 2 for j in range(len(cols))], [f"h{h}" for _, h in cols], "x",
               canvas.shape[0], 5 if len(cols) > 24 else 6)
    _labels_at(ax, [k * (side + 4) + side / 2 for k in range(n)], _image_names(maps, images), "x", -1, 7)
    _colour_bar(ax, MAP_CMAP, norm, top, mos.shape[0], mos.shape[1] + 2, bar_w, f"attention (power {gamma:g})")
    _suptitle(fig, title or f"Attention of query patch {maps.query}: layers (rows) x heads (columns) per image")
    return fig


def gpsa_figure(maps: AttentionMaps, title: str = "", gamma: float = 0.5) -> Figure:
    """ConViT: the gates sigmoid(lambda) per GPSA layer and head (left), and each head's positional attention of
    the query patch before gating (right), on one colour scale for all positional maps."""
    if maps.gpsa_gates is None or maps.gpsa_positional is None:
        raise ValueError("no GPSA layer in these maps (not a ConViT)")
    gates, pos = maps.gpsa_gates, maps.gpsa_positional  # (L, heads), (L, heads, h, w)
    L, heads, h, w = pos.shape
    t = max(h, w)
    gate_norm = Normalize(0.0, 1.0)
    pos_norm = PowerNorm(gamma, 0.0, float(np.nanmax(pos)) or 1.0)
    left = mosaic([[np.full((t, t), g) for g in row] for row in gates], (t, t))
    right = mosaic([[pos[i, j] for j in range(heads)] for i in range(L)], (t, t))
    bar_w = max(1, t // 3)
    gx = left.shape[1] + 2                               # gate bar
    px = gx + bar_w + 2 * t + 2                           # positional mosaic, after room for the bar's ticks
    canvas = np.ones((left.shape[0], px + right.shape[1] + 2 + bar_w, 3))
    _paste(canvas, _rgb(left, "viridis", gate_norm), 0, 0)
    _paste(canvas, _rgb(right, MAP_CMAP, pos_norm), 0, px)
    fig, ax = _canvas_axes(canvas, 0.45 / (t + GAP), (1.6, 1.0))
    for i in range(L):
        for j in range(heads):
            ax.text(_tile_x(j, t) + t / 2 - 0.5, i * (t + GAP) + t / 2 - 0.5, f"{gates[i, j]:.2f}", ha="center",
                    va="center", fontsize=6, color="white" if gates[i, j] < 0.6 else "black")
    r, c = maps.query_cells[maps.kinds.index("gpsa")] if "gpsa" in maps.kinds else maps.query
    ax.add_collection(_cell_boxes([(i, j, r, c, h, w) for i in range(L) for j in range(heads)], t, t, dx=px))
    names = [f"GPSA {i}" for i in range(L)]
    _labels_at(ax, [i * (t + GAP) + t / 2 for i in range(L)], names, "y", -0.5)
    _labels_at(ax, [_tile_x(j, t) + t / 2 for j in range(heads)], [f"h{j}" for j in range(heads)], "x",
               canvas.shape[0], 6)
    _labels_at(ax, [px + _tile_x(j, t) + t / 2 for j in range(heads)], [f"h{j}" for j in range(heads)], "x",
               canvas.shape[0], 6)
    _labels_at(ax, [left.shape[1] / 2, px + right.shape[1] / 2],
               ["gate sigmoid(λ): 1 = positional", f"positional attention of patch {(r, c)}"], "x", -1, 7)
    _colour_bar(ax, "viridis", gate_norm, 0, left.shape[0], gx, bar_w, "", ticks=(0.0, 0.5, 1.0))
    _colour_bar(ax, MAP_CMAP, pos_norm, 0, right.shape[0], px + right.shape[1] + 2, bar_w,
                f"positional (power {gamma:g})")
    _suptitle(fig, title or "ConViT GPSA gates and positional attention")
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
    fig, ax = _canvas_axes(mos, 0.5 / (P * scale + GAP), (0.4, 0.6))
    expl = maps.patch_explained
    share = f"; together {100 * float(expl.sum()):.0f}% of the variance" if expl is not None else ""
    _suptitle(fig, title or f"Patch-embedding filters: first {k} principal components{share}")
    return fig


def position_similarity_figure(maps: AttentionMaps, title: str = "") -> Figure:
    """Position-embedding similarity (ViT Fig. 7 centre): tile (i, j) shows the cosine similarity of the
    embedding of patch (i, j) with every other patch's, on one scale from -1 to 1."""
    if maps.position_similarity is None or maps.position_grid is None:
        raise ValueError("no position-embedding similarity (no learned position embedding)")
    h, w = maps.position_grid
    sim = maps.position_similarity.reshape(h, w, h, w)
    mos = mosaic([[sim[i, j] for j in range(w)] for i in range(h)])
    norm = Normalize(-1.0, 1.0)
    bar_w = max(2, mos.shape[1] // 30)
    canvas = np.ones((mos.shape[0], mos.shape[1] + 2 * GAP + 2 + bar_w, 3))
    _paste(canvas, _rgb(mos, "viridis", norm), 0, 0)
    fig, ax = _canvas_axes(canvas, 3.0 / canvas.shape[1], (1.4, 0.9))
    _labels_at(ax, [j * (w + GAP) + w / 2 for j in _thin(w)], [str(j) for j in _thin(w)], "x", canvas.shape[0], 5)
    _labels_at(ax, [i * (h + GAP) + h / 2 for i in _thin(h)], [str(i) for i in _thin(h)], "y", -0.5, 5)
    ax.text(mos.shape[1] / 2, canvas.shape[0] + 0.06 * canvas.shape[0], "input patch column", ha="center",
            va="top", fontsize=8)
    ax.text(-0.08 * mos.shape[1], mos.shape[0] / 2, "input patch row", ha="right", va="center", rotation=90,
            fontsize=8)
    _colour_bar(ax, "viridis", norm, 0, mos.shape[0], mos.shape[1] + 4, bar_w, "cosine similarity",
                ticks=(-1.0, -0.5, 0.0, 0.5, 1.0))
    _suptitle(fig, title or "Position-embedding similarity")
    return fig


def save_attention_figures(maps: AttentionMaps, out_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Write every figure the maps support as PNG into ``out_dir`` (atomically): ``rollout.png``,
    ``query_maps_<i>.png`` per image, ``gpsa.png``, ``patch_embedding.png``, ``position_embedding.png``."""
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
        R.save(fig, path)
        paths.append(path)
    return paths
