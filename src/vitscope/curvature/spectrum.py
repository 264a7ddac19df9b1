"""HDVW's Hessian eigenvalue spectrum (Park & Kim 2022, Fig. 1 and 4): top-k eigenvalues per training
minibatch, gathered into one density with the fraction of negative eigenvalues.

Protocol: for each minibatch of training data, apply the training transform (e.g. timm's ``Mixup``,
which returns soft targets: the loss is then soft-target cross entropy), run the model in an
explicit mode (eval by default: BatchNorm uses running statistics, dropout off), take
``loss = NLL + L2 term`` and its top-k eigenvalues (largest magnitude, as PyHessian's power
iteration finds them). The L2 term is ``half_sq``: ``wd/2 * sum ||p||^2`` (its Hessian is ``wd * I``: it adds
``wd`` to every eigenvalue), or ``hdvw``: ``wd * sum ||p||`` unsquared per tensor, the one L2 term HDVW's
released code computes (``ops/norm.py``, added to its loss-landscape plots); its Hessian
``wd * (I - p p^T / ||p||^2) / ||p||`` per tensor grows without bound as a tensor's norm goes to 0.
HDVW's Hessian code itself was never released (xxxnell/how-do-vits-work issue #12: PyHessian with a
``weight_decay`` argument on augmented batches, the form of the term not given), so ``half_sq``, the term
whose gradient is the weight-decay step ``wd * p``, is the default.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from vitscope.curvature.eigen import top_eigenvalues
from vitscope.curvature.hvp import HessianOperator, LossFn, cross_entropy, l2_penalty, select_params
from vitscope.distributed import Batches, all_gather_objects
from vitscope.distributed import current as dist_current
from vitscope.measures.evaluation import split_batch

_logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def block_groups(model: nn.Module, params: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Parameter names grouped by the kind of module that owns them.

    ``norm``: any normalization layer (type name containing "Norm"); ``attention``: under a module
    whose name contains "attn"/"attention" or whose type name contains "Attention"; ``mlp``: under
    "mlp"/"ffn" or an ``Mlp``; ``conv``: other convolutions (CNN blocks, the ViT patch embedding);
    ``other``: the rest (position embedding, class token, head, ...). Empty groups are dropped.
    """
    wanted = set(params) if params is not None else None
    groups: dict[str, list[str]] = {"attention": [], "mlp": [], "norm": [], "conv": [], "other": []}
    modules = dict(model.named_modules())
    for name, _ in model.named_parameters():
        if wanted is not None and name not in wanted:
            continue
        path = name.rsplit(".", 1)[0] if "." in name else ""
        owner = modules.get(path, model)
        chain = [modules[".".join(path.split(".")[:i])] for i in range(1, len(path.split(".")) + 1)] if path else []
        segs = path.lower().split(".")
        if isinstance(owner, _NORM_TYPES) or "norm" in type(owner).__name__.lower():
            kind = "norm"
        elif any("attn" in s or "attention" in s for s in segs) or any(
                "attention" in type(m).__name__.lower() for m in chain):
            kind = "attention"
        elif any(s.startswith("mlp") or "ffn" in s for s in segs) or any(type(m).__name__.lower().endswith("mlp")
                                                                          for m in chain):
            kind = "mlp"
        elif isinstance(owner, nn.modules.conv._ConvNd):
            kind = "conv"
        else:
            kind = "other"
        groups[kind].append(name)
    return {k: v for k, v in groups.items() if v}


def scott_bandwidth(values: np.ndarray) -> float:
    """Scott's rule ``std * n^(-1/5)``; a small positive width when all values coincide."""
    values = np.asarray(values, dtype=np.float64).ravel()
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return float(std * len(values) ** (-1 / 5)) if std > 0 else max(1e-3 * float(np.abs(values).max()), 1e-6)


def gaussian_kde(values: np.ndarray, grid: np.ndarray, bandwidth: float | None = None) -> np.ndarray:
    """Gaussian kernel density of ``values`` on ``grid`` (Scott's rule bandwidth by default)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    bandwidth = bandwidth or scott_bandwidth(values)
    z = (grid[:, None] - values[None, :]) / bandwidth  # (G, n)
    return np.exp(-0.5 * z ** 2).sum(1) / (len(values) * bandwidth * math.sqrt(2 * math.pi))


@dataclass
class SpectrumResult:
    """Per group: eigenvalues ``(n_batches, k)``, their density on ``grid`` and negative fraction."""

    eigenvalues: dict[str, np.ndarray]
    converged: dict[str, np.ndarray]
    grid: dict[str, np.ndarray]
    density: dict[str, np.ndarray]
    negative_fraction: dict[str, float]
    batch_sizes: list[int]
    n_hvp: int
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config, "batch_sizes": self.batch_sizes, "n_hvp": self.n_hvp,
            "groups": {g: {"eigenvalues": self.eigenvalues[g].tolist(), "converged": self.converged[g].tolist(),
                           "negative_fraction": self.negative_fraction[g], "grid": self.grid[g].tolist(),
                           "density": self.density[g].tolist()} for g in self.eigenvalues},
        }

    def to_pandas(self) -> Any:
        """Tidy ``pandas.DataFrame``: one row per group, batch and eigenvalue (``rank`` 0 = largest found)."""
        from vitscope.notebook import frame

        return frame([{"group": g, "batch": b, "rank": i, "eigenvalue": float(v), "converged": bool(c)}
                      for g, vals in self.eigenvalues.items()
                      for b, (row, conv) in enumerate(zip(vals, self.converged[g]))
                      for i, (v, c) in enumerate(zip(row, conv))])

    def plot(self, title: str = "model") -> Any:
        """The report's Hessian figure (eigenvalue density per group) as a matplotlib ``Figure``."""
        from vitscope.notebook import report_figure

        return report_figure(title, "hessian", hessian=self.to_dict())


def eigenvalue_spectrum(
    model: nn.Module,
    loader: Iterable[Sequence[torch.Tensor]],
    k: int = 5,
    transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    weight_decay: float = 0.0,
    l2_style: str = "half_sq",
    max_batches: int | None = None,
    groups: str | Mapping[str, Sequence[str | nn.Parameter]] | None = None,
    train_mode: bool = False,
    loss_fn: LossFn | None = None,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    grid_size: int = 400,
    backend: str = "auto",
    progress: bool = False,
    start: str = "gradient",
    shard: bool = False,
    memory_budget: int | str | None = None,
) -> SpectrumResult:
    """HDVW's Hessian eigenvalue spectrum over minibatches of ``loader``.

    Args:
        transform: applied to each batch as ``x, y = transform(x, y)`` (timm's ``Mixup`` fits).
        weight_decay, l2_style: the L2 term over the differentiated parameters (its Hessian block only
            involves them): ``half_sq`` or ``hdvw`` (see module docstring).
        groups: None (all trainable parameters), ``"block"`` (``block_groups``), or name -> parameters.
        loss_fn: default cross entropy (hard or soft targets).
        method, tol, max_iter, seed, backend, start, memory_budget: see ``top_eigenvalues`` (seed + batch
            index per batch).
        shard: under torch.distributed, each rank takes the global batches r, r + W, ...
            (``vitscope.distributed.shard_batches``); the per-batch eigenvalues of all ranks are gathered in
            the global batch order, so every rank returns the one-process result.

    Batches are moved to the device of the model's first parameter.
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if l2_style not in ("half_sq", "hdvw"):
        raise ValueError(f"l2_style={l2_style!r} is not one of ('half_sq', 'hdvw')")
    loss_fn = loss_fn or cross_entropy
    trainable = select_params(model)
    if groups is None:
        group_params: dict[str, list[str]] = {"all": list(trainable)}
    elif groups == "block":
        group_params = block_groups(model, trainable)
    elif isinstance(groups, Mapping):
        group_params = {g: list(select_params(model, ps)) for g, ps in groups.items()}
    else:
        raise ValueError(f"groups={groups!r}: pass None, 'block' or a dict name -> parameters")

    def extra(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return l2_penalty(p.values(), weight_decay, l2_style)

    named = dict(model.named_parameters())
    for g, names in group_params.items():
        dim = sum(named[n].numel() for n in names)
        if k > dim:
            raise ValueError(f"k={k} exceeds the {dim} parameters of group {g!r}: a Hessian of that size has at "
                             f"most {dim} eigenvalues; use k <= {dim}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    info = dist_current()
    fallbacks: set[str] = set()
    records = []  # (global batch index, batch size, {group: eigenvalues (k,)}, {group: converged (k,)}, n_hvp)
    for bi, batch in Batches(loader, max_batches, shard=shard, every_rank=False, desc="hessian",
                             progress=progress):  # under shard a rank may get no batch
        x, y = (t.to(device) for t in split_batch(batch))
        if transform is not None:
            x, y = transform(x, y)
        vals, convs, n_hvp_batch = {}, {}, 0
        for g, names in group_params.items():
            op = HessianOperator(model, loss_fn, (x, y), params=names, train_mode=train_mode, backend=backend,
                                 extra=extra if weight_decay else None, batch_index=[bi])
            res = top_eigenvalues(model, loss_fn, (x, y), k=k, method=method, tol=tol, max_iter=max_iter,
                                  seed=seed + bi, operator=op, start=start, memory_budget=memory_budget)
            vals[g], convs[g] = res.eigenvalues.numpy(), np.array(res.converged)
            n_hvp_batch += res.n_hvp
            fallbacks.update(res.notes)
        records.append((bi, len(x), vals, convs, n_hvp_batch))
    if shard and info.distributed:
        records = sorted((r for part in all_gather_objects(records) for r in part), key=lambda r: r[0])
    if not records:
        raise ValueError("the loader yielded no batches; pass a non-empty loader (check split and max_examples)")
    sizes = [r[1] for r in records]
    n_hvp = sum(r[4] for r in records)
    eig = {g: np.stack([r[2][g] for r in records]) for g in group_params}  # (n_batches, k)
    converged = {g: np.stack([r[3][g] for r in records]) for g in group_params}
    grid, dens, neg = {}, {}, {}
    for g, v in eig.items():
        lo, hi = float(v.min()), float(v.max())
        bw = scott_bandwidth(v)
        pad = max(0.05 * (hi - lo), 4 * bw)
        grid[g] = np.linspace(lo - pad, hi + pad, grid_size)
        dens[g] = gaussian_kde(v, grid[g], bw)
        neg[g] = float((v < 0).mean())
    config = {"k": k, "weight_decay": weight_decay, "l2_style": l2_style, "train_mode": train_mode,
              "method": method, "tol": tol, "max_iter": max_iter, "seed": seed, "start": start,
              "transform": None if transform is None else type(transform).__name__,
              "groups": {g: len(n) for g, n in group_params.items()}}
    if shard:
        config.update(world_size=info.world_size,
                      batches_per_rank=[len(range(r, len(records), info.world_size)) for r in range(info.world_size)],
                      examples_per_rank=[sum(sizes[r::info.world_size]) for r in range(info.world_size)])
    if fallbacks:
        config["notes"] = sorted(fallbacks)
    return SpectrumResult(eig, converged, grid, dens, neg, sizes, n_hvp, config)
