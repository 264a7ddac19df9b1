"""Loss landscapes along random filter-normalized directions (Li et al. 2018, "Visualizing the Loss
Landscape of Neural Nets"), with HDVW's variant (Park & Kim 2022, ``ops/loss_landscapes.py``).

Direction policy, per parameter ``w`` with Gaussian direction ``d``:

- ``normalization="filter"`` (Li et al.): each filter ``d[i]`` (slice along dim 0: an output channel
  of a conv, a row of a linear weight) is rescaled to ``||w[i]||``.
- ``normalization="hdvw"``: HDVW's code took norms *along* dim 0 (``torch.norm(w, dim=0)``), i.e.
  per input position across output filters: ``d * ||w||_dim0 / (||d||_dim0 + 1e-7)``.
- 1-D parameters (biases, norm scales/shifts, gates): ``ignore="biasbn"`` gives them a zero
  direction (Li et al.'s and HDVW's default); ``ignore=None`` normalizes them as one filter.
- Token parameters (``pos_embed``, ``cls_token``, ``dist_token``, ``reg_token``, shape ``(1, N, D)``):
  ``tokens="row"`` (default) normalizes each token's D-vector as one filter; ``tokens="filter"``
  treats the tensor like any other (its dim 0 has size 1, so it is one filter);
  ``tokens="exclude"`` gives them a zero direction. With ``normalization="hdvw"``, ``row`` and
  ``filter`` both follow HDVW's along-dim-0 rule (elementwise for these tensors), as its code did.

The loss at each grid point is averaged over every example of the loader (batches weighted by their
size), optionally plus an L2 term (``hdvw``: ``wd * sum ||p||`` over all parameters, unsquared, as
HDVW plotted it; it dominated their plots, so it is off by default). With ``shard=True`` under
torch.distributed (``torchrun ... -m vitscope landscape``) rank r evaluates the grid on the global batches
r, r + W, ... and the per-point loss sums, hit counts and example counts are summed over the ranks, so every
example counts once and every rank returns the one-process landscape (to float round-off).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from vitscope.curvature.hvp import LossFn, ParamSpec, analysis_mode, cross_entropy, l2_penalty, select_params
from vitscope.io.atomic import atomic_write

_logger = logging.getLogger(__name__)

TOKEN_PARAM_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token")
Directions = list[dict[str, torch.Tensor]]


def is_token_param(name: str) -> bool:
    """Whether a parameter holds per-token embeddings (position embedding or prefix tokens)."""
    return name.rsplit(".", 1)[-1] in TOKEN_PARAM_NAMES


def normalize_direction(d: torch.Tensor, w: torch.Tensor, name: str = "", normalization: str = "filter",
                        ignore: str | None = "biasbn", tokens: str = "row") -> torch.Tensor:
    """Rescale one parameter's random direction ``d`` to the weight ``w`` by the policy above."""
    if normalization not in ("filter", "hdvw"):
        raise ValueError(f"normalization={normalization!r} is not one of ('filter', 'hdvw')")
    if ignore not in ("biasbn", None):
        raise ValueError(f"ignore={ignore!r} is not one of ('biasbn', None)")
    if tokens not in ("row", "filter", "exclude"):
        raise ValueError(f"tokens={tokens!r} is not one of ('row', 'filter', 'exclude')")
    token = is_token_param(name)
    if (w.dim() <= 1 and ignore == "biasbn") or (token and tokens == "exclude"):
        return torch.zeros_like(d)
    if normalization == "hdvw":
        if w.dim() == 0:
            return d * w.abs() / (d.abs() + 1e-7)
        wn = torch.linalg.vector_norm(w, dim=0, keepdim=True)  # norms along dim 0
        dn = torch.linalg.vector_norm(d, dim=0, keepdim=True)
        return d * wn / (dn + 1e-7)
    if w.dim() <= 1:
        rows_d, rows_w = d.reshape(1, -1), w.reshape(1, -1)  # one filter
    elif token and tokens == "row":
        rows_d, rows_w = d.reshape(-1, d.shape[-1]), w.reshape(-1, w.shape[-1])  # (N, D): one per token
    else:
        rows_d, rows_w = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)  # (filters, fan_in)
    scale = torch.linalg.vector_norm(rows_w, dim=1, keepdim=True) / (
        torch.linalg.vector_norm(rows_d, dim=1, keepdim=True) + 1e-10)
    return (rows_d * scale).reshape(d.shape)


def random_directions(model: nn.Module, dims: int = 2, normalization: str = "filter",
                      ignore: str | None = "biasbn", tokens: str = "row", seed: int = 0,
                      params: ParamSpec = None) -> Directions:
    """``dims`` Gaussian directions over the model's trainable parameters, normalized per the policy."""
    gen = torch.Generator().manual_seed(seed)
    chosen = select_params(model, params)
    out = []
    for _ in range(dims):
        dirs = {}
        for n, p in chosen.items():
            d = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            dirs[n] = normalize_direction(d, p.detach().cpu(), n, normalization, ignore, tokens).to(p.device)
        out.append(dirs)
    return out


def save_directions(path: str | Path, directions: Directions, metadata: dict[str, Any] | None = None) -> None:
    """Save directions as safetensors (keys ``d{i}/{param}``), atomically, with JSON-able metadata."""
    from safetensors.torch import save_file

    tensors = {f"d{i}/{n}": t.detach().cpu().contiguous() for i, d in enumerate(directions) for n, t in d.items()}
    meta = {"dims": str(len(directions)), "policy": json.dumps(metadata or {})}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_directions(path: str | Path) -> tuple[Directions, dict[str, Any]]:
    """Directions and metadata saved by ``save_directions`` (safetensors: no code runs on load)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no directions file at {path}; pass the .safetensors written by a landscape run")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        dims = int(meta.get("dims", 0))
        out: Directions = [{} for _ in range(dims)]
        for key in f.keys():
            i, name = key.split("/", 1)
            out[int(i[1:])][name] = f.get_tensor(key)
    return out, json.loads(meta.get("policy", "{}"))


@dataclass
class LandscapeResult:
    """Loss (and accuracy) on a grid: 1-D arrays ``(steps,)``, 2-D arrays ``(steps_y, steps_x)``
    indexed ``[iy, ix]`` as ``matplotlib.contour(x, y, loss)`` expects."""

    x: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    y: np.ndarray | None = None
    directions: Directions = field(default_factory=list, repr=False)
    policy: dict[str, Any] = field(default_factory=dict)
    n_examples: int = 0
    world_size: int = 1  # processes that shared the batches (shard=True)
    examples_per_rank: list[int] | None = None  # set when shard=True

    def to_dict(self) -> dict[str, Any]:
        def clean(a: np.ndarray | None) -> Any:
            return None if a is None else np.where(np.isfinite(a), a, np.nan).tolist()

        out = {"x": self.x.tolist(), "y": None if self.y is None else self.y.tolist(),
               "loss": clean(self.loss), "accuracy": clean(self.accuracy),
               "policy": self.policy, "n_examples": self.n_examples}
        if self.examples_per_rank is not None:
            out.update(world_size=self.world_size, examples_per_rank=self.examples_per_rank)
        return json.loads(json.dumps(out).replace("NaN", "null"))

    def to_pandas(self) -> Any:
        """Tidy ``pandas.DataFrame``: one row per grid point (``x``, ``y`` for 2-D, ``loss``, ``accuracy``)."""
        from vitscope.notebook import frame

        acc = self.accuracy if self.accuracy is not None else np.full_like(self.loss, np.nan)
        if self.y is None:
            return frame([{"x": float(x), "loss": float(v), "accuracy": float(a)}
                          for x, v, a in zip(self.x, self.loss, acc)])
        return frame([{"x": float(x), "y": float(y), "loss": float(self.loss[j, i]), "accuracy": float(acc[j, i])}
                      for j, y in enumerate(self.y) for i, x in enumerate(self.x)])

    def plot(self, title: str = "model") -> Any:
        """The report's loss-landscape figure (curve or contour) as a matplotlib ``Figure``."""
        from vitscope.notebook import report_figure

        return report_figure(title, "landscape", landscape=self.to_dict())


def _check_directions(directions: Directions, params: dict[str, nn.Parameter], dims: int) -> Directions:
    if len(directions) != dims:
        raise ValueError(f"got {len(directions)} directions for dims={dims}; pass one per dimension")
    out = []
    for d in directions:
        missing = [n for n in d if n not in params]
        if missing:
            raise ValueError(f"directions name parameters the model lacks ({missing[:3]}...): wrong model?")
        for n, t in d.items():
            if t.shape != params[n].shape:
                raise ValueError(f"direction for {n} has shape {tuple(t.shape)}, the model's is "
                                 f"{tuple(params[n].shape)}: the directions belong to another model")
        out.append({n: t.to(device=params[n].device, dtype=params[n].dtype) for n, t in d.items()})
    return out


def loss_landscape(
    model: nn.Module,
    loss_fn: LossFn | None,
    loader: Iterable[Sequence[torch.Tensor]],
    dims: int = 1,
    steps: int = 21,
    span: float = 1.0,
    normalization: str = "filter",
    ignore: str | None = "biasbn",
    seed: int = 0,
    max_batches: int | None = None,
    tokens: str = "row",
    weight_decay: float = 0.0,
    l2_style: str = "hdvw",
    directions: Directions | str | Path | None = None,
    params: ParamSpec = None,
    train_mode: bool = False,
    progress: bool = False,
    shard: bool = False,
) -> LandscapeResult:
    """Loss on ``w + a d_1 (+ b d_2)`` for a, b in ``linspace(-span, span, steps)``.

    Each batch is loaded once and evaluated at every grid point (so a shuffling loader shows every
    point the same examples). The weights are restored bit for bit afterwards.

    Args:
        loss_fn: mean loss ``(outputs, targets) -> scalar``; None means cross entropy (soft targets too).
        directions: reuse saved directions (list of dicts or a ``.safetensors`` path) instead of drawing.
        weight_decay, l2_style: optional L2 term over all parameters (see module docstring).
        shard: under torch.distributed, rank r takes the global batches r, r + W, ...
            (``vitscope.distributed.shard_batches``; a rank may get none) and the sums are all-reduced; the
            result records ``world_size`` and ``examples_per_rank``. The directions are drawn from a CPU
            generator seeded by ``seed``, so every rank perturbs the weights alike.
    """
    from vitscope.distributed import Batches, all_gather_objects, all_reduce_sum, current
    from vitscope.measures.evaluation import split_batch

    if dims not in (1, 2):
        raise ValueError(f"dims={dims} must be 1 or 2")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    loss_fn = loss_fn or cross_entropy
    chosen = select_params(model, params)
    policy = {"normalization": normalization, "ignore": ignore, "tokens": tokens, "seed": seed,
              "span": span, "steps": steps, "dims": dims, "weight_decay": weight_decay, "l2_style": l2_style}
    if directions is None:
        dirs = random_directions(model, dims, normalization, ignore, tokens, seed, params)
    else:
        if isinstance(directions, str | Path):
            directions, saved_policy = load_directions(directions)
            policy.update({k: v for k, v in saved_policy.items() if k in ("normalization", "ignore", "tokens", "seed")})
        dirs = _check_directions(directions, chosen, dims)
    coords = np.linspace(-span, span, steps) if steps > 1 else np.zeros(1)
    points = [(a,) for a in coords] if dims == 1 else [(a, b) for b in coords for a in coords]  # y-major
    loss_sum = np.zeros(len(points))
    correct = np.zeros(len(points))
    has_acc = True
    n_total = 0
    origin = {n: p.detach().clone() for n, p in chosen.items()}
    info = current()
    error: ValueError | None = None
    try:
        with torch.no_grad(), analysis_mode(model, train_mode, explicit=False):
            batches = Batches(loader, max_batches, shard=shard, every_rank=False,  # a rank may get none
                              desc="landscape", progress=progress, unit="eval", steps=len(points))
            for bi, batch in batches:
                x, y = split_batch(batch)
                device = next(iter(origin.values())).device
                x, y = x.to(device), y.to(device)
                n = len(x)
                for pi, coef in enumerate(points):
                    for name, p in chosen.items():
                        p.copy_(origin[name])
                        for c, d in zip(coef, dirs):
                            if c != 0.0:
                                p.add_(d[name], alpha=float(c))
                    out = model(x)
                    loss = float(loss_fn(out, y))
                    if all(c == 0.0 for c in coef) and not np.isfinite(loss):
                        error = ValueError(f"non-finite loss ({loss}) at the unperturbed weights on batch {bi}: "
                                           "check that batch's inputs and the checkpoint")
                        break
                    loss_sum[pi] += loss * n
                    if out.dim() == 2 and has_acc:
                        labels = y.argmax(-1) if y.dim() == 2 else y
                        correct[pi] += float((out.argmax(-1) == labels).sum())
                    else:
                        has_acc = False
                    batches.step()
                if error is not None:
                    break
                n_total += n
    finally:
        with torch.no_grad():
            for name, p in chosen.items():
                p.copy_(origin[name])
    per_rank = [n_total]
    if shard and info.distributed:  # every rank reaches this (an error is raised after, on every rank)
        flags = [n_total, float(not has_acc), float(error is not None)]
        sums = torch.tensor(np.concatenate([loss_sum, correct, flags]), dtype=torch.float64)  # (2 P + 3,)
        all_reduce_sum(sums)
        per_rank = [int(k) for k in all_gather_objects(n_total)]
        loss_sum, correct = sums[:len(points)].numpy(), sums[len(points):2 * len(points)].numpy()
        n_total, has_acc = int(sums[-3]), bool(sums[-2] == 0)
        if error is None and sums[-1] > 0:
            error = ValueError("another process met a non-finite loss at the unperturbed weights (see its output)")
    if error is not None:
        raise error
    if n_total == 0:
        raise ValueError("the loader yielded no examples; pass a non-empty loader (check split and max_examples)")
    loss = loss_sum / n_total
    if weight_decay:
        with torch.no_grad():
            all_params = dict(model.named_parameters())
            for pi, coef in enumerate(points):
                moved = [all_params[n].detach() + sum(float(c) * d[n] for c, d in zip(coef, dirs))
                         if n in chosen else p.detach() for n, p in all_params.items()]
                loss[pi] += float(l2_penalty(moved, weight_decay, l2_style))
    acc = correct / n_total if has_acc else None
    if not np.all(np.isfinite(loss)):
        _logger.warning("%d grid points have a non-finite loss (far from the weights); stored as null",
                        int((~np.isfinite(loss)).sum()))
    shape = (steps,) if dims == 1 else (steps, steps)
    return LandscapeResult(
        x=coords, y=coords.copy() if dims == 2 else None, loss=loss.reshape(shape),
        accuracy=None if acc is None else acc.reshape(shape), directions=dirs, policy=policy, n_examples=n_total,
        world_size=info.world_size if shard else 1, examples_per_rank=per_rank if shard else None,
    )
