"""The one evaluation loop: a model over a loader's batches, each caller's reduction passed in.

``eval_batches`` iterates (``vitscope.distributed.Batches``: the first ``max_batches``, sharding over ranks,
the rank-0 progress bar; then the ``(images, labels)`` check and the moves to the device); ``eval_loop`` runs
the model on each batch in eval mode, without gradients and under autocast, hands its outputs to the caller's
reduction (``update(outputs, targets)``) and sums the reduction over the ranks (``sync()``) when asked. The
reductions differ on purpose and stay with their callers: ``vitscope.measures.Calibration`` (float64 sums) in
the training loop's ``evaluate``, a float64 cross-entropy in the interventions, a confusion matrix in the
studies' pipeline; the robustness suite, whose attacks need gradients, iterates with ``eval_batches`` and counts
hits itself.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import torch
import torch.nn as nn

from vitscope.distributed import Batches
from vitscope.runtime import autocast

__all__ = ["Reduction", "eval_batches", "eval_loop", "eval_mode", "split_batch"]

Prepare = Callable[[torch.Tensor, torch.Tensor, torch.device], "tuple[torch.Tensor, torch.Tensor]"]


class Reduction(Protocol):
    """What ``eval_loop`` feeds: ``update`` per batch; with ``sync=True`` also ``sync()`` (sum over the ranks),
    called once after the last batch (a ``StreamingMeasure`` is one)."""

    def update(self, outputs: Any, targets: torch.Tensor) -> None: ...


R = TypeVar("R", bound=Reduction)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode (no dropout/drop-path, BatchNorm running stats); restore each
    module's own training flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(images, labels)`` of a loader's batch (its first two entries); a one-line error for anything else."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            f"the loader must yield (images, labels) pairs, got {type(batch).__name__}; "
            "use vitscope.data.create_loader or a DataLoader over a TensorDataset(images, labels)"
        )
    return batch[0], batch[1]


def to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The default ``prepare`` of ``eval_batches``: both tensors moved to ``device``."""
    return images.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def eval_batches(
    loader: Iterable,
    device: torch.device,
    max_batches: int | None = None,
    *,
    shard: bool = False,
    desc: str = "eval",
    progress: bool | None = False,
    prepare: Prepare = to_device,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(index, images, targets)`` of ``loader``'s first ``max_batches`` batches, ``prepare``-d for ``device``.

    ``prepare(images, labels, device)`` checks and moves a batch (default: ``to_device``). The batches are
    ``vitscope.distributed.Batches``': ``progress=None`` shows a tqdm bar only when stderr is a terminal; only
    rank 0 shows one. ``shard=True``: under torch.distributed this rank's share of the batches (rank r takes r,
    r + W, ...; a rank may get none), with their global indices.
    """
    for i, batch in Batches(loader, max_batches, shard=shard, every_rank=False, desc=desc, progress=progress):
        images, targets = prepare(*split_batch(batch), device)
        yield i, images, targets


@torch.no_grad()
def eval_loop(
    model: nn.Module,
    loader: Iterable,
    reduction: R,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    max_batches: int | None = None,
    shard: bool = False,
    sync: bool = False,
    desc: str = "eval",
    progress: bool | None = False,
    prepare: Prepare = to_device,
) -> R:
    """Feed ``model``'s outputs on every batch of ``loader`` to ``reduction``; returns ``reduction``.

    The model runs in eval mode (each module's flag restored after), without gradients, under ``autocast(device,
    amp_dtype)`` (none for ``amp_dtype=None``), on images in channels-last layout when asked. ``reduction.update(
    outputs, targets)`` gets the model's raw outputs, so each caller keeps its own reduction (dtype, checks);
    ``sync=True`` calls ``reduction.sync()`` once after the last batch (on every rank). Batches as
    ``eval_batches`` (``max_batches``, ``shard``, ``progress``, ``prepare``).
    """
    with eval_mode(model):
        for _, images, targets in eval_batches(loader, device, max_batches, shard=shard, desc=desc,
                                               progress=progress, prepare=prepare):
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                outputs = model(images)  # (B, C) logits, or the model's own output for the reduction to read
            reduction.update(outputs, targets)
    if sync:
        reduction.sync()  # type: ignore[attr-defined]
    return reduction
