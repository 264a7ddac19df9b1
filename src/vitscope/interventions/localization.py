"""Localization probe (Raghu et al. 2021, "Do Vision Transformers See Like Convolutional Neural Networks?",
Sec. "Localization"): how well does each spatial token still know where it is?

For each residual block's output (the residual stream; prefix tokens such as the class token dropped),
a linear classifier on frozen features predicts each spatial token's position index (0..h*w-1, row
major) from that token's feature vector alone. It is trained on the tokens of some images and scored
on the tokens of held-out images; chance is 1/(h*w) since every image has one token per position.
RAGHU find ViTs (with a class token) keep position well through depth, less so with global average
pooling. CNN feature maps (B, C, H, W) are probed the same way over their H x W locations. A variant
(``position_grid``, not the paper's): predict the cell of a coarser grid holding the token, e.g. 14 x 14 cells
on a CNN's 56 x 56 first-stage map, where one class per position (3,136) is slow on a CPU.

The probe is multinomial logistic regression (L2-regularized, features standardized with train
statistics) fit full-batch with L-BFGS on features collected once; bound memory with ``max_batches``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitscope.capture import LayerInfo, SubLayerRecord, capture
from vitscope.distributed import Batches
from vitscope.interventions._blocks import residual_blocks, select
from vitscope.interventions._eval import normalized_depth
from vitscope.measures.evaluation import eval_mode
from vitscope.runtime import model_device

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalizationLayer:
    """Held-out accuracy of the position probe at one block output."""

    name: str
    kind: str
    block: int
    depth: float
    grid_h: int
    grid_w: int
    accuracy: float
    train_accuracy: float
    chance: float
    num_train_tokens: int
    num_test_tokens: int
    cells_h: int  # the grid of position classes: grid_h x grid_w (one class per position) unless position_grid
    cells_w: int


@dataclass
class LocalizationResult:
    """Per-layer position-probe accuracies (``to_rows`` gives flat dicts for CSV/JSON)."""

    layers: list[LocalizationLayer] = field(default_factory=list)

    def to_rows(self) -> list[dict[str, Any]]:
        return [{"study": "localization", **asdict(layer)} for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {"study": "localization", "rows": self.to_rows()}


@dataclass(frozen=True)
class ProbeFit:
    accuracy: float
    train_accuracy: float
    num_train_tokens: int
    num_test_tokens: int


def position_classes(h: int, w: int, cells: tuple[int, int] | None = None) -> tuple[torch.Tensor, float]:
    """((h w,) class of each row-major position, chance) for the position probe: the position itself
    (``cells=None``), or the row-major index of the cell of a ``cells`` grid that holds it (row ``r`` falls in cell
    row ``r * cells_h // h``). Chance is the largest class's share of the positions (1 / (h w) by default)."""
    if cells is None:
        return torch.arange(h * w), 1.0 / (h * w)
    ch, cw = cells
    if not (1 <= ch <= h and 1 <= cw <= w):
        raise ValueError(f"a {ch}x{cw} position grid needs 1..{h} rows and 1..{w} columns on a {h}x{w} map")
    rows = torch.arange(h) * ch // h  # (h,) cell row of each map row
    cols = torch.arange(w) * cw // w  # (w,)
    labels = (rows[:, None] * cw + cols[None, :]).reshape(-1)  # (h w,)
    return labels, float(torch.bincount(labels).max()) / (h * w)


def fit_position_probe(
    features: torch.Tensor,
    train_fraction: float = 0.5,
    epochs: int = 100,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: torch.device | str | None = None,
    labels: torch.Tensor | None = None,
) -> ProbeFit:
    """Fit a linear probe that predicts token position from token features; score it on held-out images.

    Args:
        features: (n_images, P, D) spatial-token features; token p of every image has label p.
        train_fraction: Fraction of the images (not tokens) used for training; the rest is held out.
        epochs: L-BFGS iterations on the full training set.
        weight_decay: L2 penalty ``weight_decay / 2 * ||W||^2`` added to the mean cross-entropy.
        seed: Seed of the image split.
        device: Where to fit (default: the features' device).
        labels: (P,) class of each position instead (``position_classes``), e.g. the cell of a coarser grid.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be (n_images, positions, dim), got shape {tuple(features.shape)}")
    n, P, D = features.shape
    if n < 2:
        raise ValueError(f"the position probe needs at least 2 images (train and held out), got {n}; "
                         "raise max_batches or the batch size")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf; the model's activations overflowed")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = min(max(int(round(train_fraction * n)), 1), n - 1)
    dev = torch.device(device) if device is not None else features.device
    feats = features.to(dev, torch.float32)
    x_tr = feats[perm[:n_train].to(dev)].reshape(-1, D)  # (n_train * P, D)
    x_te = feats[perm[n_train:].to(dev)].reshape(-1, D)  # (n_test * P, D)
    labels = torch.arange(P) if labels is None else labels
    if labels.shape != (P,):
        raise ValueError(f"labels must give one class per position, shape ({P},), got {tuple(labels.shape)}")
    labels = labels.to(dev)
    n_classes = int(labels.max()) + 1
    y_tr = labels.repeat(n_train)  # token p of each image -> its position's class
    y_te = labels.repeat(n - n_train)
    mu, sd = x_tr.mean(0), x_tr.std(0)
    sd = sd.clamp_min(1e-6 * float(sd.max()) + 1e-12)
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd

    w = torch.zeros(D, n_classes, device=dev, requires_grad=True)
    b = torch.zeros(n_classes, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x_tr @ w + b, y_tr) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        acc_tr = float(((x_tr @ w + b).argmax(1) == y_tr).float().mean())
        acc_te = float(((x_te @ w + b).argmax(1) == y_te).float().mean())
    return ProbeFit(acc_te, acc_tr, len(y_tr), len(y_te))


def _spatial(out: torch.Tensor, info: LayerInfo, grid: tuple[int, int] | None, name: str
             ) -> tuple[torch.Tensor, tuple[int, int]]:
    """A block's output as capture records it (maps channels-first, Swin's channels-last ones included) ->
    ((B, P, D) spatial tokens, (h, w))."""
    if out.ndim == 4:  # map (B, C, H, W)
        B, C, H, W = out.shape
        return out.flatten(2).transpose(1, 2), (H, W)  # (B, H*W, C)
    if out.ndim != 3:
        raise ValueError(f"block {name} outputs shape {tuple(out.shape)}; expected (B, N, D) tokens or (B, C, H, W)")
    g = grid if grid is not None else info.grid
    if g is None:
        raise ValueError(f"block {name}: capture knows no row-major token grid for it (e.g. Hiera's unrolled "
                         "tokens), so token positions are unknown; pass grid=(h, w) if its tokens are row-major")
    h, w = g
    n_prefix = out.shape[1] - h * w  # class/register tokens (ConViT adds its class token late)
    if n_prefix < 0:
        raise ValueError(f"block {name} outputs {out.shape[1]} tokens, fewer than the {h}x{w} grid; "
                         "pass the right grid")
    return out[:, n_prefix:], (h, w)  # (B, h*w, D): prefix (class/register) tokens dropped


def localization_probe(
    model: nn.Module,
    loader: Iterable,
    layers: Sequence[int | str] | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    epochs: int = 100,
    seed: int = 0,
    train_fraction: float = 0.5,
    weight_decay: float = 1e-4,
    grid: tuple[int, int] | None = None,
    progress: bool | None = None,
    position_grid: int | tuple[int, int] | None = None,
) -> LocalizationResult:
    """RAGHU's localization probe at each residual block output of a ViT or CNN.

    Args:
        model: A trained model with residual blocks that ``residual_blocks`` recognizes.
        loader: Yields images or (images, labels); labels are not used.
        layers: Block indices or names (fnmatch patterns allowed); default every block.
        device: Where to run the model (it is moved there); default: the model's device.
        max_batches: Use only the first batches (features of every chosen layer are kept on CPU,
            n_images * h * w * D floats per layer; each probe is then fit on ``device``).
        epochs: L-BFGS iterations of each probe (full batch).
        seed: Seed of the train/held-out image split.
        train_fraction: Fraction of images used to train each probe.
        weight_decay: L2 penalty of the probe.
        grid: Spatial token grid (h, w) of a ViT's tokens; default: the grid capture records for each block
            (channels-last maps such as Swin's come channels-first). The number of prefix tokens is the token
            count minus h*w (so ConViT's late class token is handled).
        progress: Show a tqdm bar (default: only on a terminal).
        position_grid: A variant, not RAGHU's: predict the cell of an (h, w) (or n x n) grid holding each token
            instead of its exact position (``position_classes``); a map smaller than the grid keeps one class per
            position. Default: every position is a class, as in the paper.
    """
    if isinstance(position_grid, int):
        position_grid = (position_grid, position_grid)
    if position_grid is not None and min(position_grid) < 1:
        raise ValueError(f"position_grid must be positive, got {position_grid}")
    all_blocks = residual_blocks(model)
    chosen = select(all_blocks, layers, "block", model)
    dev = model_device(model, device, move=True)
    wanted = {blk.name: blk for blk in chosen}
    feats: dict[int, list[torch.Tensor]] = {blk.index: [] for blk in chosen}
    grids: dict[int, tuple[int, int]] = {}

    def keep(record: SubLayerRecord) -> None:  # each block's output as capture gives it, kept on the CPU
        blk = wanted[record.info.name]
        tokens, g = _spatial(record.z_out, record.info, grid, blk.name)
        feats[blk.index].append(tokens.detach().float().cpu())
        grids[blk.index] = g

    with eval_mode(model), torch.no_grad(), capture(model, attention=False, residual=True, branches=False,
                                                   names=lambda n: n in wanted, on_record=keep, layers="blocks"):
        for _, batch in Batches(loader, max_batches, desc="localization features", progress=progress):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not torch.is_tensor(x) or x.ndim != 4:
                raise ValueError("the loader must yield image batches (B, C, H, W) or (images, labels) pairs")
            model(x.to(dev))

    result = LocalizationResult()
    for blk in tqdm(chosen, desc="localization probe", disable=None if progress is None else not progress):
        if not feats[blk.index]:
            raise ValueError("the loader yielded no images (or the chosen blocks never ran)")
        f = torch.cat(feats.pop(blk.index))  # (n_images, P, D)
        h, w = grids[blk.index]
        cells = None if position_grid is None else (min(position_grid[0], h), min(position_grid[1], w))
        labels, chance = position_classes(h, w, cells)
        fit = fit_position_probe(f, train_fraction, epochs, weight_decay, seed, device=dev, labels=labels)
        ch, cw = cells or (h, w)
        result.layers.append(LocalizationLayer(
            blk.name, blk.kind, blk.index, normalized_depth(blk.index, len(all_blocks)), h, w,
            fit.accuracy, fit.train_accuracy, chance, fit.num_train_tokens, fit.num_test_tokens, ch, cw,
        ))
        _logger.info("localization %s: held-out accuracy %.3f (chance %.3f)", blk.name, fit.accuracy, chance)
    return result
