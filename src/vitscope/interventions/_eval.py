"""Accuracy/NLL evaluation shared by the intervention studies, and their result records."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitscope.distributed import Batches
from vitscope.measures.evaluation import eval_loop, split_batch

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """Top-1 accuracy and mean negative log-likelihood (cross-entropy, nats) over ``num_examples``."""

    accuracy: float
    nll: float
    num_examples: int


@dataclass(frozen=True)
class UnitResult:
    """The model evaluated with one unit intervened on, and the change against the intact model.

    ``accuracy_drop = intact accuracy - accuracy``; ``nll_increase = nll - intact nll``.
    ``depth`` is the unit's position among all units of its type, normalized to [0, 1].
    """

    name: str
    kind: str
    block: int
    depth: float
    accuracy: float
    nll: float
    accuracy_drop: float
    nll_increase: float


@dataclass
class InterventionResult:
    """One study (``lesion-blocks``, ``lesion-sublayers`` or ``skip-removal``) over several units."""

    study: str
    intact: Evaluation
    units: list[UnitResult] = field(default_factory=list)

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat dict per unit (for CSV): study, name, kind, block, depth, accuracy, nll, drops, and
        the intact model's accuracy/NLL and the number of examples."""
        extra = {"intact_accuracy": self.intact.accuracy, "intact_nll": self.intact.nll,
                 "num_examples": self.intact.num_examples}
        return [{"study": self.study, **asdict(u), **extra} for u in self.units]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the study, the intact evaluation and the per-unit rows."""
        return {"study": self.study, "intact": asdict(self.intact), "rows": self.to_rows()}


def unit_result(name: str, kind: str, block: int, depth: float, ev: Evaluation, intact: Evaluation) -> UnitResult:
    return UnitResult(name, kind, block, depth, ev.accuracy, ev.nll,
                      intact.accuracy - ev.accuracy, ev.nll - intact.nll)


def normalized_depth(i: int, n: int) -> float:
    return i / (n - 1) if n > 1 else 0.0


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = split_batch(batch)
    if not torch.is_tensor(x) or not torch.is_tensor(y) or y.ndim != 1 or y.dtype.is_floating_point:
        raise ValueError("the loader must yield image tensors and 1-D integer label tensors")
    return x, y


class CachedBatches:
    """Re-iterable view of a loader limited to ``max_batches``.

    With ``max_batches`` the batches are read once (``vitscope.distributed.Batches``, the one walk over a loader)
    and kept (on CPU), so every intervention sees the same examples even from a shuffling loader; without it the
    loader is iterated anew for each evaluation and must then yield the same examples each time (no shuffling or
    random augmentation).
    """

    def __init__(self, loader: Iterable, max_batches: int | None = None):
        self.loader = loader
        self.cached = None if max_batches is None else [_split_batch(b) for _, b in Batches(loader, max_batches)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.cached is not None:
            return iter(self.cached)
        return (_split_batch(b) for b in self.loader)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):  # e.g. distilled heads in train mode
        out = out[0]
    if out.ndim != 2:
        raise ValueError(f"the model must return (batch, classes) logits, got shape {tuple(out.shape)}")
    return out


class _AccuracyNLL:
    """The interventions' reduction: top-1 hits and the cross-entropy summed in float64 over every example."""

    def __init__(self) -> None:
        self.correct, self.nll, self.n = 0, torch.zeros((), dtype=torch.float64), 0

    def update(self, out: Any, y: torch.Tensor) -> None:
        logits = _logits(out)  # (B, K)
        if logits.shape[0] != y.shape[0]:
            raise ValueError(f"{logits.shape[0]} logits for {y.shape[0]} labels")
        if y.numel() and (y.min() < 0 or y.max() >= logits.shape[1]):
            raise ValueError(f"labels must lie in [0, {logits.shape[1]}) for a {logits.shape[1]}-class model")
        self.correct += int((logits.argmax(dim=1) == y).sum())
        self.nll += F.cross_entropy(logits.double(), y, reduction="sum").cpu()
        self.n += y.shape[0]


def evaluate(model: nn.Module, batches: Iterable, device: torch.device) -> Evaluation:
    """Top-1 accuracy and mean NLL of ``model`` over ``batches`` (float64 sums over all examples), through the
    one evaluation loop (``vitscope.measures.evaluation.eval_loop``)."""
    acc = eval_loop(model, batches, _AccuracyNLL(), device)
    if acc.n == 0:
        raise ValueError("the loader yielded no examples; check the dataset path/split and max_batches")
    return Evaluation(acc.correct / acc.n, float(acc.nll) / acc.n, acc.n)

