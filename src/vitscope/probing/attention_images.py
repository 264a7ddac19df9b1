"""Attention on the images themselves (ViT Fig. 6 and 7, RAGHU, CB, CONVIT): arrays ready to draw.

``attention_maps(model, images)`` runs one captured forward pass and returns, per image:

- **rollout** (Abnar & Zuidema 2020; ViT Fig. 6): ``measures.attention_rollout`` over every attention layer,
  read from the class token's row. Substitutes where there is no class token to read:
  pooled ViTs (``global_pool='avg'`` or no class token) read the *mean over patch queries* (the pooled
  output averages the patch tokens, so this row is the pooled output's flow); ConViT's GPSA layers hold only
  patch tokens and its class token joins before the first MHSA layer: the class token's row of the MHSA
  rollout (patch columns) is carried through the GPSA rollout, ``R_mhsa[cls, patches] @ R_gpsa``; what is
  missing from 1 is the share of the learned class token itself. EVA/DINOv3, BEiT and relative-position ViT
  blocks (capture's ``ROLLOUT_BLOCKS``) roll out like ViT's: relative position bias and RoPE are inside the maps,
  and register tokens are prefix tokens, so the class token's row over the patch columns leaves out the mass
  that flows from the registers (as from the class token). Windowed attention (AlterNet, Swin), pooled keys,
  and convolutions between attention layers admit no rollout (``rollout`` is None, ``rollout_source`` says why).
- **query maps**: per attention layer, per head, the attention row of one query patch (default the centre)
  over the layer's grid; for windowed attention the row over the query's window, zero elsewhere.
- **ConViT**: per GPSA layer the gates ``sigmoid(gating_param)`` and each head's positional attention
  ``softmax(pos_proj(r))`` of the query patch (CONVIT Fig. 5).
- **embeddings** (ViT Fig. 7): patch-embedding principal components and position-embedding similarity,
  where the model has them.

``AttentionMaps.save(path)`` writes one ``.npz`` (no pickled objects); ``load_attention_maps`` reads it back.
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from vitscope.capture import capture
from vitscope.measures.convit import gpsa_gates, gpsa_layers, gpsa_positional_attention
from vitscope.measures.embeddings import (
    patch_embedding_components,
    position_embedding_grid,
    position_embedding_similarity,
)
from vitscope.measures.evaluation import eval_mode
from vitscope.measures.rollout import attention_rollout

__all__ = ["AttentionMaps", "attention_maps", "load_attention_maps", "ATTENTION_FILE"]

ATTENTION_FILE = "attention.npz"


@dataclass
class AttentionMaps:
    """Attention of a model on a few images, as numpy arrays (see the module docstring).

    Attributes:
        images: (B, H, W, 3) float32 pixels in [0, 1] for display (de-normalised with the loader's mean/std,
            else min-max scaled per image).
        query: (row, col) of the query patch in ``query_grid``.
        query_grid: (h, w) grid of the first attention layer (the token grid of a ViT).
        query_box: (y0, x0, y1, x1) the query patch in pixels.
        layers / kinds: name and kind (``msa``, ``gpsa``) of each attention layer, depth order.
        query_maps: per layer, (B, heads, h_l, w_l) attention of the query patch over the layer's grid.
        query_cells: per layer, (row, col) of the query in that layer's grid.
        rollout: (B, h, w) rollout read-out (``rollout_source`` says which row), or None.
        gpsa_layers / gpsa_gates / gpsa_positional: ConViT GPSA layer names, (L_g, heads) gates and
            (L_g, heads, h, w) positional attention of the query patch; empty / None otherwise.
        patch_components / patch_explained: (k, C, P, P) patch-embedding components and their explained-variance
            ratios, or None; position_similarity: (n, n) cosine similarities on ``position_grid``, or None.
        meta: free-form provenance (model name, checkpoint, data, labels ...).
    """

    images: np.ndarray
    query: tuple[int, int]
    query_grid: tuple[int, int]
    query_box: tuple[float, float, float, float]
    layers: list[str]
    kinds: list[str]
    query_maps: list[np.ndarray]
    query_cells: list[tuple[int, int]]
    rollout: np.ndarray | None = None
    rollout_source: str = ""
    gpsa_layers: list[str] = field(default_factory=list)
    gpsa_gates: np.ndarray | None = None
    gpsa_positional: np.ndarray | None = None
    patch_components: np.ndarray | None = None
    patch_explained: np.ndarray | None = None
    position_similarity: np.ndarray | None = None
    position_grid: tuple[int, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_pandas(self) -> Any:
        """Tidy ``pandas.DataFrame`` of every map, as the report's CSVs: one row per figure (``attention_query_maps``,
        ``attention_rollout``, ``gpsa_positional`` ...), image, layer, head and map cell (``row``, ``col``)."""
        from vitscope.notebook import report_rows

        return report_rows(self._name(), attention=self)

    def plot(self, key: str | None = None) -> Any:
        """The report's figure ``key`` (default: the first it draws; ``attention_query_maps``, ``attention_rollout``,
        ``gpsa_positional``, ``patch_embedding_components``, ``position_embedding_similarity``) as a ``Figure``."""
        from vitscope.notebook import report_figure

        return report_figure(self._name(), key, attention=self)

    def _name(self) -> str:
        return str(self.meta.get("model_name") or self.meta.get("model") or "model")

    def save(self, path: str | os.PathLike) -> Path:
        """Write every array to one ``.npz`` (atomically; strings as unicode arrays, meta as JSON)."""
        from vitscope.io.atomic import atomic_write_bytes

        arrays: dict[str, np.ndarray] = {
            "images": self.images.astype(np.float32), "query": np.array(self.query, dtype=np.int64),
            "query_grid": np.array(self.query_grid, dtype=np.int64),
            "query_box": np.array(self.query_box, dtype=np.float64),
            "layers": np.array(self.layers, dtype=str), "kinds": np.array(self.kinds, dtype=str),
            "query_cells": np.array(self.query_cells, dtype=np.int64).reshape(-1, 2),
            "rollout_source": np.array(self.rollout_source), "gpsa_layers": np.array(self.gpsa_layers, dtype=str),
            "meta": np.array(json.dumps(self.meta, default=str)),
        }
        for i, m in enumerate(self.query_maps):
            arrays[f"query_map_{i:03d}"] = m.astype(np.float32)
        for key in ("rollout", "gpsa_gates", "gpsa_positional", "patch_components", "patch_explained",
                    "position_similarity"):
            value = getattr(self, key)
            if value is not None:
                arrays[key] = np.asarray(value, dtype=np.float32)
        if self.position_grid is not None:
            arrays["position_grid"] = np.array(self.position_grid, dtype=np.int64)
        buf = _npz_bytes(arrays)
        path = Path(path)
        atomic_write_bytes(path, buf)
        return path


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def load_attention_maps(path: str | os.PathLike) -> AttentionMaps:
    """Read an ``AttentionMaps.save`` file (``allow_pickle=False``: nothing is executed).

    Raises:
        ValueError: the file is not such an archive or lacks a field.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable attention .npz ({e}); re-create it with vitscope attention") \
            from None
    need = ("images", "query", "query_grid", "query_box", "layers", "kinds", "query_cells")
    missing = [k for k in need if k not in d]
    if missing:
        raise ValueError(f"{path} lacks {missing}; re-create it with vitscope attention")
    n = len(d["layers"])
    maps = [d.get(f"query_map_{i:03d}") for i in range(n)]
    if any(m is None or m.ndim != 4 for m in maps):
        raise ValueError(f"{path}: expected {n} query maps query_map_000.. of shape (B, heads, h, w)")
    try:
        meta = json.loads(str(d["meta"])) if "meta" in d else {}
    except json.JSONDecodeError:
        meta = {}
    pos_grid = d.get("position_grid")
    return AttentionMaps(
        images=d["images"], query=tuple(int(v) for v in d["query"]), query_grid=tuple(int(v) for v in d["query_grid"]),
        query_box=tuple(float(v) for v in d["query_box"]), layers=[str(s) for s in d["layers"]],
        kinds=[str(s) for s in d["kinds"]], query_maps=maps,
        query_cells=[(int(r), int(c)) for r, c in d["query_cells"]], rollout=d.get("rollout"),
        rollout_source=str(d.get("rollout_source", "")), gpsa_layers=[str(s) for s in d.get("gpsa_layers", [])],
        gpsa_gates=d.get("gpsa_gates"), gpsa_positional=d.get("gpsa_positional"),
        patch_components=d.get("patch_components"), patch_explained=d.get("patch_explained"),
        position_similarity=d.get("position_similarity"),
        position_grid=None if pos_grid is None else (int(pos_grid[0]), int(pos_grid[1])),
        meta=meta if isinstance(meta, dict) else {},
    )


# ------------------------------------------------------------------------------------------ computation


def _display_images(images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    x = images.detach().float().cpu()  # (B, C, H, W)
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        x = x * s + m
    else:  # unknown normalisation: stretch each image to [0, 1]
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    x = x.clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3].permute(0, 2, 3, 1).numpy().astype(np.float32)  # (B, H, W, 3)


@dataclass
class _Layer:
    name: str
    kind: str
    attn: torch.Tensor  # (B, heads, N, N), or (B, windows, heads, ws*ws, ws*ws) when windowed
    prefix: int
    grid: tuple[int, int]  # the layer's map over the image: token grid, or the whole feature map when windowed
    window: int | None  # window side for windowed attention
    shift: tuple[int, int] = (0, 0)  # cyclic shift of the map before windowing (Swin)


def _layers(cap, B: int, image_hw: tuple[int, int]) -> list[_Layer]:
    out = []
    for attn, info in zip(cap.attentions, cap.attention_layout):
        if not info.has_positions:  # pooled keys, channel attention ...: no query map (see LayerInfo.kind)
            continue
        heads, N = attn.shape[1], attn.shape[-1]
        if attn.shape[0] == B:  # one token sequence per image
            if info.grid is None or info.grid[0] * info.grid[1] + info.num_prefix_tokens != N:
                raise ValueError(f"{info.name}: cannot tell how its {N} tokens lie on the image; attention maps "
                                 "need a ViT with a patch_embed, a ConViT or windowed attention")
            out.append(_Layer(info.name, info.kind, attn, info.num_prefix_tokens, info.grid, None))
            continue
        ws = info.grid[0] if info.grid else None
        stride = info.patch_size
        if not ws or not stride or attn.shape[0] % B or ws * ws != N:
            raise ValueError(f"{info.name}: attention of shape {tuple(attn.shape)} is neither one map per image nor "
                             "square windows of a known feature map")
        H, W = image_hw[0] // stride, image_hw[1] // stride
        if -(-H // ws) * -(-W // ws) * B != attn.shape[0]:  # windows of the map padded to a multiple of ws
            raise ValueError(f"{info.name}: {attn.shape[0] // B} windows of {ws}x{ws} do not tile its {H}x{W} map, "
                             "even padded at the bottom and right")
        out.append(_Layer(info.name, info.kind, attn.reshape(B, -1, heads, N, N), 0, (H, W), ws,
                          info.window_shift or (0, 0)))
    return out


def _query_rows(layer: _Layer, cell: tuple[int, int]) -> torch.Tensor:
    """(B, heads, h, w) attention of the query token at ``cell`` over the layer's patch grid."""
    r, c = cell
    h, w = layer.grid
    a = layer.attn
    return a[:, :, layer.prefix + r * w + c, layer.prefix:].reshape(a.shape[0], a.shape[1], h, w)


def _rollout(layers: list[_Layer], model: nn.Module, head_fusion: str, discard_ratio: float,
             complete: bool = True) -> tuple[torch.Tensor | None, str]:
    """(B, h, w) rollout read-out and its source, or (None, why not). ``complete``: every captured attention map
    is among ``layers`` (none was left out for want of positions)."""
    if any(layer.window for layer in layers):
        return None, "none: windowed attention has no rollout across layers"
    from vitscope.capture.sites import find_blocks
    from vitscope.capture.table import ROLLOUT_BLOCKS

    sites = find_blocks(model)
    families = {b.family for b in sites} - {"vit", "convit"}
    if families == {"generic"}:
        return None, ("none: rollout assumes blocks x + attn(x) with nothing else mixing tokens, and these blocks "
                      "are not in capture's table of known residual blocks")
    if families - {"table"}:
        return None, "none: convolution blocks between the attention layers are not attention"
    if any(b.family == "table" and not isinstance(b.module, ROLLOUT_BLOCKS) for b in sites):
        return None, ("none: these blocks mix tokens outside their attention (windows, pooled keys, convolutions "
                      "or channel attention: capture.table.ROLLOUT_BLOCKS lists those without)")
    if not complete:
        return None, "none: some attention maps have no token positions (talking heads, pooled keys)"
    # Runs of consecutive layers over the same token sequence.
    groups: list[list[_Layer]] = []
    for layer in layers:
        if groups and groups[-1][0].attn.shape[-1] == layer.attn.shape[-1] and groups[-1][0].prefix == layer.prefix:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    kw = dict(head_fusion=head_fusion, discard_ratio=discard_ratio)
    pooled = getattr(model, "global_pool", "token") not in ("token", "") or getattr(model, "cls_token", None) is None
    last = groups[-1]
    p = last[0].prefix
    R = attention_rollout([g.attn for g in last], **kw)  # (B, N, N)
    if p and not pooled:
        row, source = R[:, 0, p:], "class token"  # (B, n)
    else:
        row, source = R[:, p:, p:].mean(1), "mean over patch queries"  # (B, n)
    if len(groups) == 2 and groups[0][0].prefix == 0 and groups[0][0].attn.shape[-1] == row.shape[-1]:
        row = (row.unsqueeze(1) @ attention_rollout([g.attn for g in groups[0]], **kw)).squeeze(1)  # (B, n)
        source += f" of the {last[0].kind.upper()} layers, through the {groups[0][0].kind.upper()} rollout"
    elif len(groups) > 1:
        return None, "none: the attention layers do not share one token sequence"
    h, w = last[0].grid
    return row.reshape(row.shape[0], h, w), source


def attention_maps(
    model: nn.Module,
    images: torch.Tensor,
    query: tuple[int, int] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    embeddings: bool = True,
    device: torch.device | str | None = None,
) -> AttentionMaps:
    """Rollout, per-head query-patch maps, ConViT gates and positional maps, and the embedding figures' data
    for ``images`` (see the module docstring for what is read where).

    Args:
        model: Any model ``vitscope.capture`` records attention for (timm ViT/DeiT, ConViT, AlterNet ...).
        images: (B, C, H, W) images as the model takes them (normalised).
        query: (row, col) of the query patch in the first attention layer's grid (default: its centre).
        mean, std: the normalisation the loader applied, to show the images as they were.
        head_fusion, discard_ratio: passed to ``measures.attention_rollout``.
        embeddings: also compute patch-embedding components and position-embedding similarity when present.
        device: where the model's parameters are, to send ``images`` there (default: read from the model).

    Raises:
        ValueError: the model has no attention layer, or ``query`` lies outside the grid.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    with eval_mode(model), torch.no_grad(), capture(model, residual=False, branches=False) as cap:
        model(images.to(dev))
    if not cap.attentions:
        raise ValueError(f"{type(model).__name__} has no attention layer vitscope can capture (a CNN?); "
                         "attention maps need a ViT, ConViT or AlterNet")
    B = images.shape[0]
    H_img, W_img = int(images.shape[-2]), int(images.shape[-1])
    layers = _layers(cap, B, (H_img, W_img))
    if not layers:
        kinds = sorted({i.kind for i in cap.attention_layout})
        raise ValueError(f"{type(model).__name__}'s attention maps ({', '.join(kinds)}) have no query and key "
                         "positions on the image (pooled keys, channel or talking-heads attention): no query map")
    gh, gw = layers[0].grid
    if query is None:
        query = (gh // 2, gw // 2)
    q_r, q_c = int(query[0]), int(query[1])
    if not (0 <= q_r < gh and 0 <= q_c < gw):
        raise ValueError(f"query {tuple(query)} lies outside the {gh}x{gw} patch grid; give 0 <= row < {gh}, "
                         f"0 <= col < {gw}")
    ph, pw = H_img / gh, W_img / gw
    box = (q_r * ph, q_c * pw, (q_r + 1) * ph, (q_c + 1) * pw)
    y, x = (q_r + 0.5) * ph, (q_c + 0.5) * pw  # the query's centre in pixels, located in every layer's grid
    maps, cells = [], []
    for layer in layers:
        h, w = layer.grid
        cell = (min(int(y * h / H_img), h - 1), min(int(x * w / W_img), w - 1))
        rows = _query_rows(layer, cell) if layer.window is None else _window_rows(layer, cell)
        maps.append(rows.float().cpu().numpy())  # (B, heads, h, w)
        cells.append(cell)
    roll, source = _rollout(layers, model, head_fusion, discard_ratio, len(layers) == len(cap.attentions))
    out = AttentionMaps(
        images=_display_images(images, mean, std), query=(q_r, q_c), query_grid=(gh, gw), query_box=box,
        layers=[layer.name for layer in layers], kinds=[layer.kind for layer in layers], query_maps=maps,
        query_cells=cells, rollout=None if roll is None else roll.float().cpu().numpy(), rollout_source=source,
    )
    gpsa = [layer for layer in layers if layer.kind == "gpsa"]
    if gpsa:
        h, w = gpsa[0].grid
        names = [n for n, _ in gpsa_layers(model)]
        pos = gpsa_positional_attention(model, h * w)  # per layer (heads, N, N)
        i = min(int(y * h / H_img), h - 1) * w + min(int(x * w / W_img), w - 1)
        out.gpsa_layers = names
        out.gpsa_gates = torch.stack(gpsa_gates(model)).numpy()  # (L_g, heads)
        out.gpsa_positional = torch.stack([p[:, i].reshape(-1, h, w) for p in pos]).numpy()  # (L_g, heads, h, w)
    if embeddings:
        _add_embeddings(out, model)
    return out


def _window_rows(layer: _Layer, cell: tuple[int, int]) -> torch.Tensor:
    """(B, heads, H, W): the query's row inside its window, placed on the whole feature map (zero elsewhere).
    Windows are numbered row-major over the map, positions row-major inside a window (WindowAttention2d, Swin);
    a shifted window (Swin) covers map cells shifted cyclically by ``layer.shift`` (``LayerInfo.window_shift``).
    A map the windows do not tile is padded at the bottom and right after the shift (timm's Swin v1/v2/v2-CR): the
    padding keys lie off the image and are left out, so such a row sums to less than 1."""
    ws = layer.window
    H, W = layer.grid
    sy, sx = layer.shift
    B, _, heads, n, _ = layer.attn.shape
    a = layer.attn.view(B, -(-H // ws), -(-W // ws), heads, n, n)  # (B, gh, gw, heads, n, n) over the padded map
    r, c = (cell[0] - sy) % H, (cell[1] - sx) % W  # the query's place on the shifted map (Swin rolls by -shift)
    local = (r % ws) * ws + c % ws
    row = a[:, r // ws, c // ws, :, local, :].reshape(B, -1, ws, ws)  # (B, heads, ws, ws)
    ys = r // ws * ws + torch.arange(ws)  # (ws,) rows of the window's keys on the shifted, padded map
    xs = c // ws * ws + torch.arange(ws)  # (ws,) cols
    on_y, on_x = ys < H, xs < W  # keys on the map, not padding
    out = row.new_zeros(B, row.shape[1], H, W)
    out[:, :, ((ys[on_y] + sy) % H)[:, None], ((xs[on_x] + sx) % W)[None, :]] = row[:, :, on_y][:, :, :, on_x]
    return out


def _add_embeddings(out: AttentionMaps, model: nn.Module) -> None:
    try:
        pc = patch_embedding_components(model)
        out.patch_components = pc.components.float().numpy()
        out.patch_explained = pc.explained_variance_ratio.float().numpy()
    except ValueError:
        pass  # no linear patch embedding (CNN stem): no figure
    try:
        out.position_similarity = position_embedding_similarity(model).float().numpy()
        out.position_grid = position_embedding_grid(model)
    except ValueError:
        pass  # no learned absolute position embedding
