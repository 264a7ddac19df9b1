"""Figures drawn on images (``vitscope attention`` outputs): embeddings, rollout, query maps, GPSA (ViT, ConViT)."""
from __future__ import annotations

from typing import Any

from vitscope.reports.captions import caption
from vitscope.reports.loaders import RunData
from vitscope.reports.sections._common import (
    FigureItem,
)


def _grid_rows(values: Any, **fixed: Any) -> list[dict[str, Any]]:
    """One row per cell of a (h, w) map: ``fixed`` columns, then row, col and the value."""
    h, w = values.shape
    flat = values.ravel().tolist()
    return [{**fixed, "row": i // w, "col": i % w, "value": v} for i, v in enumerate(flat)]


def attention_items(run: RunData) -> list[FigureItem]:
    """Figures of ``attention.npz`` (``vitscope attention``): ViT Fig. 6 and 7, CONVIT Fig. 5."""
    from vitscope.reports import image_figures as IF

    a, name, items = run.attention, run.name, []
    labels = a.meta.get("labels") if isinstance(a.meta.get("labels"), list) else []
    n_img = a.images.shape[0]
    img_note = f"{n_img} image{'s' * (n_img > 1)} ({', '.join(str(x) for x in labels)})" if labels else \
        f"{n_img} images"
    if a.patch_components is not None:
        fig = IF.patch_components_figure(a, f"{name}: patch-embedding filters, first {len(a.patch_components)} "
                                            "principal components")
        rows = [{"component": k, "explained_variance_ratio": float(a.patch_explained[k]), "channel": c, "y": y,
                 "x": x, "value": float(a.patch_components[k, c, y, x])}
                for k in range(a.patch_components.shape[0]) for c in range(a.patch_components.shape[1])
                for y in range(a.patch_components.shape[2]) for x in range(a.patch_components.shape[3])]
        share = float(a.patch_explained.sum())
        items.append(FigureItem("patch_embedding_components", caption("patch_embedding_components"), fig, rows,
                                f"Observed: these components explain {100 * share:.0f}% of the filters' variance"))
    if a.position_similarity is not None:
        h, w = a.position_grid
        fig = IF.position_similarity_figure(a, f"{name}: position-embedding similarity ({h}x{w} patches)")
        sim = a.position_similarity
        rows = []
        for i in range(h * w):
            rows += _grid_rows(sim[i].reshape(h, w), position=i, position_row=i // w, position_col=i % w)
        items.append(FigureItem("position_embedding_similarity", caption("position_embedding_similarity"), fig,
                                rows, _position_note(sim, h, w)))
    if a.rollout is not None:
        fig = IF.rollout_figure(a, f"{name}: attention rollout ({a.rollout_source})")
        rows = []
        for b in range(n_img):
            rows += _grid_rows(a.rollout[b], image=b, label=labels[b] if b < len(labels) else "")
        items.append(FigureItem("attention_rollout", caption("attention_rollout"), fig, rows,
                                f"{img_note}; read-out: {a.rollout_source}"))
    if a.query_maps:
        fig = IF.query_maps_figure(a, title=f"{name}: attention of query patch {a.query}, layers (rows) x heads "
                                            "(columns), per image")
        rows = []
        for layer, kind, cell, m in zip(a.layers, a.kinds, a.query_cells, a.query_maps):
            for b in range(m.shape[0]):
                for hd in range(m.shape[1]):
                    rows += _grid_rows(m[b, hd], image=b, layer=layer, kind=kind, head=hd, query_row=cell[0],
                                       query_col=cell[1])
        items.append(FigureItem("attention_query_maps", caption("attention_query_maps"), fig, rows,
                                f"{img_note}; query patch {a.query} of a {a.query_grid[0]}x{a.query_grid[1]} grid"))
    if a.gpsa_gates is not None and a.gpsa_positional is not None:
        fig = IF.gpsa_figure(a, f"{name}: GPSA gates and positional attention of patch {a.query}")
        rows = []
        for i, layer in enumerate(a.gpsa_layers or [str(i) for i in range(len(a.gpsa_gates))]):
            for hd in range(a.gpsa_gates.shape[1]):
                rows += _grid_rows(a.gpsa_positional[i, hd], layer=layer, head=hd, gate=float(a.gpsa_gates[i, hd]))
        items.append(FigureItem("gpsa_positional", caption("gpsa_positional"), fig, rows,
                                f"mean gate {float(a.gpsa_gates.mean()):.3f}"))
    return items


def _position_note(sim: Any, h: int, w: int) -> str:
    """Mean similarity of neighbours vs. of distant positions, and of same row/column vs. others (ViT Fig. 7)."""
    import numpy as np

    r, c = np.divmod(np.arange(h * w), w)
    dist = np.hypot(r[:, None] - r[None], c[:, None] - c[None])
    off = ~np.eye(h * w, dtype=bool)
    near, far = sim[(dist == 1)], sim[off & (dist > max(h, w) / 2)]
    same = sim[off & ((r[:, None] == r[None]) | (c[:, None] == c[None]))]
    other = sim[(r[:, None] != r[None]) & (c[:, None] != c[None])]
    parts = []
    if near.size and far.size:
        parts.append(f"mean similarity of adjacent patches {near.mean():.3f} vs. distant ones {far.mean():.3f}")
    if same.size and other.size:
        parts.append(f"same row or column {same.mean():.3f} vs. others {other.mean():.3f}")
    return ("Observed: " + "; ".join(parts)) if parts else ""
