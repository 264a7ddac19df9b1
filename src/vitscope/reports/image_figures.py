"""Figures drawn on images (ViT Fig. 6 and 7, CONVIT Fig. 5): ``AttentionMaps`` in, a matplotlib ``Figure`` out.

Many small maps are packed into one mosaic array drawn by a single ``imshow`` (grey gaps between tiles), so a
figure of 12 layers x 12 heads costs one image, not 144 axes. Every mosaic of one figure shares one colour
scale, shown by its colour bar; the query patch is outlined in white on the image and on every map.
"""
from __future__ import annotations

import io
import os
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
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=8)


def _resize_nearest(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w[, c]) -> (H, W[, c]) by nearest neighbour (exact block repeats when H, W are multiples)."""
    h, w = m.shape[:2]
    rows = (np.arange(size[0]) * h // size[0]).astype(int)
    cols = (np.arange(size[1]) * w // size[1]).astype(int)
    return m[rows][:, cols]


def mosaic(tiles: Sequence[Sequence[np.ndarray]], tile: tuple[int, int] | None = None) -> np.ndarray:
    """Rows of 2-D (or RGB) tiles -> one array with NaN gaps; tiles resized (nearest) to the largest tile."""
    flat = [t for row in tiles for t in row]
    th = tile[0] if tile else max(t.shape[0] for t in flat)
    tw = tile[1] if tile else max(t.shape[1] for t in flat)
    n_rows, n_cols = len(tiles), max(len(r) for r in tiles)
    extra = flat[0].shape[2:]
    out = np.full((n_rows * (th + GAP) - GAP, n_cols * (tw + GAP) - GAP, *extra), np.nan, dtype=np.float64)
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            y, x = i * (th + GAP), j * (tw + GAP)
            out[y:y + th, x:x + tw] = _resize_nearest(np.asarray(t, dtype=np.float64), (th, tw))
    return out


def _cell_boxes(cells: Sequence[tuple[int, int, int, int, int, int]], th: int, tw: int) -> PatchCollection:
    """White outlines of the query cell (row, col) of a (h, w) grid inside mosaic tile (i, j)."""
    rects = []
    for i, j, r, c, h, w in cells:
        ch, cw = th / h, tw / w
        rects.append(Rectangle((j * (tw + GAP) + c * cw - 0.5, i * (th + GAP) + r * ch - 0.5), cw, ch))
    return PatchCollection(rects, facecolor="none", edgecolor="white", linewidth=0.7)


def _show_image(ax, img: np.ndarray, box: tuple[float, float, float, float] | None, title: str) -> None:
    ax.imshow(img, interpolation="nearest")
    if box is not None:
        y0, x0, y1, x1 = box
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, facecolor="none", edgecolor="white", lw=1.2))
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, facecolor="none", edgecolor="black", lw=0.5,
                               linestyle="--"))
    _bare(ax, title)


def _labels(maps: AttentionMaps) -> list[str]:
    labels = maps.meta.get("labels")
    return [str(v) for v in labels] if isinstance(labels, list) else []


def rollout_figure(maps: AttentionMaps, title: str = "") -> Figure:
    """Each image above its rollout overlay; one colour scale (smallest .. largest weight over all images)."""
    if maps.rollout is None:
        raise ValueError(f"no rollout: {maps.rollout_source or 'not computed'}")
    B = maps.images.shape[0]
    fig = _figure((1.15 * B + 0.9, 2.9))
    axes = fig.subplots(2, B, squeeze=False)
    lo, hi = float(np.nanmin(maps.rollout)), float(np.nanmax(maps.rollout))
    norm = Normalize(lo, hi if hi > lo else lo + 1e-12)  # one scale for all images
    labels = _labels(maps)
    H, W = maps.images.shape[1:3]
    im = None
    for b in range(B):
        _show_image(axes[0, b], maps.images[b], None, labels[b] if b < len(labels) else f"image {b}")
        grey = maps.images[b].mean(-1)
        axes[1, b].imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        im = axes[1, b].imshow(maps.rollout[b], cmap=MAP_CMAP, norm=norm, alpha=0.7, interpolation="bilinear",
                               extent=(-0.5, W - 0.5, H - 0.5, -0.5))
        _bare(axes[1, b])
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.9, label="rollout weight", pad=0.02)
    fig.suptitle(title or f"Attention rollout ({maps.rollout_source})", fontsize=9)
    return fig


def query_maps_figure(maps: AttentionMaps, image: int = 0, title: str = "", gamma: float = 0.5) -> Figure:
    """The image with its query patch beside a mosaic of every layer (rows) x head (columns) attention map of
    that patch; one power-law colour scale (``gamma``) from 0 to the largest weight, so diffuse and sharp heads
    both show."""
    heads = max(m.shape[1] for m in maps.query_maps)
    tiles = [[m[image, h] for h in range(m.shape[1])] for m in maps.query_maps]
    mos = mosaic(tiles)
    th = max(m.shape[2] for m in maps.query_maps)
    tw = max(m.shape[3] for m in maps.query_maps)
    L = len(tiles)
    fig = _figure((2.2 + 0.55 * heads + 0.8, max(2.4, 0.5 * L + 0.7)))
    ax_img, ax_map = fig.subplots(1, 2, width_ratios=[2.0, max(1.0, 0.55 * heads)])
    labels = _labels(maps)
    name = labels[image] if image < len(labels) else f"image {image}"
    _show_image(ax_img, maps.images[image], maps.query_box, f"{name}, query patch {maps.query}")
    vmax = float(np.nanmax(mos)) or 1.0
    im = ax_map.imshow(mos, cmap=MAP_CMAP, norm=PowerNorm(gamma, 0.0, vmax), interpolation="nearest")
    cells = [(i, j, *maps.query_cells[i], *maps.query_maps[i].shape[2:]) for i in range(L)
             for j in range(maps.query_maps[i].shape[1])]
    ax_map.add_collection(_cell_boxes(cells, th, tw))
    ax_map.set_yticks([i * (th + GAP) + th / 2 for i in range(L)],
                      [f"{n.removeprefix('blocks.').removesuffix('.attn')} {k}" for n, k in
                       zip(maps.layers, maps.kinds)], fontsize=6)
    ax_map.set_xticks([j * (tw + GAP) + tw / 2 for j in range(heads)], [f"h{j}" for j in range(heads)], fontsize=6)
    ax_map.tick_params(length=0)
    for s in ax_map.spines.values():
        s.set_visible(False)
    fig.colorbar(im, ax=ax_map, shrink=0.8, label=f"attention (power {gamma:g})")
    fig.suptitle(title or "Attention of the query patch, per layer and head", fontsize=9)
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
    ax_g.set_xticks(range(heads), [f"h{j}" for j in range(heads)], fontsize=6)
    ax_g.set_yticks(range(L), [f"GPSA {i}" for i in range(L)], fontsize=6)
    ax_g.set_title("gate sigmoid(λ): 1 = positional", fontsize=8)
    fig.colorbar(img, ax=ax_g, shrink=0.8)
    mos = mosaic([[pos[i, j] for j in range(heads)] for i in range(L)])
    im = ax_p.imshow(mos, cmap=MAP_CMAP, norm=PowerNorm(gamma, 0.0, float(np.nanmax(mos)) or 1.0),
                     interpolation="nearest")
    r, c = maps.query_cells[maps.kinds.index("gpsa")] if "gpsa" in maps.kinds else maps.query
    ax_p.add_collection(_cell_boxes([(i, j, r, c, h, w) for i in range(L) for j in range(heads)], h, w))
    _bare(ax_p, f"positional attention of patch {(r, c)}")
    fig.colorbar(im, ax=ax_p, shrink=0.8, label=f"softmax(pos_proj(r)) (power {gamma:g})")
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
    ax.set_xticks([j * (w + GAP) + w / 2 for j in range(w)], [str(j) for j in range(w)], fontsize=5)
    ax.set_yticks([i * (h + GAP) + h / 2 for i in range(h)], [str(i) for i in range(h)], fontsize=5)
    ax.set_xlabel("input patch column", fontsize=8)
    ax.set_ylabel("input patch row", fontsize=8)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
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
        figs.append((f"query_maps_{b}", query_maps_figure(maps, b, f"{prefix}attention of patch {maps.query}, "
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
