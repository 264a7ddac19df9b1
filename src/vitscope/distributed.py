"""The one layer over ``torch.distributed``: process-group set-up, rank / world size, batch sharding, sums and
gathers, for the training (DDP) and the analyses.

``torchrun --nproc_per_node N -m vitscope train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; the training joins
with ``init_distributed`` (NCCL on CUDA, gloo on CPU) and wraps its model in DDP.

``torchrun --nproc_per_node N -m vitscope probe|hessian|robustness|landscape`` (and ``reproduce``) gives each
rank the *global* batches ``rank, rank + N, rank + 2N, ...`` of the one-process loader (``shard_batches``): a
batch keeps its composition and its global index (per-batch seeds, minibatch CKA's per-batch HSIC, one Hessian spectrum
per batch), no example is counted twice (no ``DistributedSampler`` padding) and none is dropped. The
additive states are then summed over the ranks (``StreamingMeasure.sync``, ``all_reduce_sum``) or gathered
(``all_gather_objects``), and rank 0 alone writes. ``Batches`` is the one walk over a loader's batches (this
rank's share, the global indices, the progress bar on rank 0) for the analyses and the evaluation loop.
Process-group set-up: gloo on a CPU (``init_distributed``); on CUDA one group with NCCL for CUDA tensors and
gloo for CPU ones (a measure's Python-number counts live on the CPU). The CUDA path has not run yet (no GPU so far).
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

_logger = logging.getLogger(__name__)

__all__ = ["DistInfo", "init_distributed", "init_from_env", "rank_device", "cleanup_distributed", "current",
           "is_main", "shard_batches", "global_batch_count", "Batches", "all_reduce_sum", "all_gather_objects",
           "barrier"]


@dataclass(frozen=True)
class DistInfo:
    """This process' place in the process group (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process initialized the group (and must destroy it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group described by the ``torchrun`` environment (or the one already open)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    _logger.info("distributed: rank %d of %d (%s)", rank, world_size, backend)
    return DistInfo(rank, world_size, local_rank, owns_group=True)


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if this process opened it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def init_from_env(device: str | torch.device | None = None) -> DistInfo:
    """Join the ``torchrun`` process group (``WORLD_SIZE`` > 1) or the one already open; one process otherwise.

    A group opened here is destroyed when the process exits. On CUDA each rank uses ``cuda:LOCAL_RANK``.
    """
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available()
                                                                         else "cpu")
    if device_type != "cuda" or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        info = init_distributed(device_type)
    else:  # NCCL for CUDA tensors and gloo for the CPU ones (counts, Python-number states) in one group
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), \
            int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        _logger.info("distributed: rank %d of %d (gloo + nccl)", rank, world)
        info = DistInfo(rank, world, local_rank, owns_group=True)
    if info.owns_group:
        import atexit

        atexit.register(cleanup_distributed, info)
    return info


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """``cuda:LOCAL_RANK`` for a bare ``cuda`` device under torchrun (one GPU per process); ``device`` otherwise."""
    if info.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", info.local_rank)
    return device


def current() -> DistInfo:
    """Rank and world size of the open process group (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo()


def is_main() -> bool:
    """True on rank 0 (and without a process group): the process that writes outputs."""
    return current().rank == 0


class _ShardedBatches(Sampler[list[int]]):
    """Rank ``rank``'s share of a batch sampler: the global batches ``i`` with ``i % world == rank``."""

    def __init__(self, batch_sampler: Iterable[list[int]], rank: int, world: int, limit: int | None) -> None:
        self.batch_sampler, self.rank, self.world, self.limit = batch_sampler, rank, world, limit

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if self.limit is not None and i >= self.limit:
                break
            if i % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        n = len(self.batch_sampler)  # type: ignore[arg-type]
        n = min(n, self.limit) if self.limit is not None else n
        return len(range(self.rank, n, self.world))


def global_batch_count(loader: Iterable, max_batches: int | None = None) -> int | None:
    """Number of global batches a pass over ``loader`` (stopped at ``max_batches``) sees, if known."""
    n = len(loader) if isinstance(loader, Sized) else None
    if max_batches is not None:
        n = max_batches if n is None else min(n, max_batches)
    return n


def shard_batches(loader: Iterable, max_batches: int | None = None, info: DistInfo | None = None,
                  every_rank: bool = True) -> Iterator[tuple[int, Any]]:
    """Yield ``(global batch index, batch)`` for this rank's share of ``loader``'s first ``max_batches``.

    With one process: every batch. With ``W`` ranks: rank ``r`` gets batches ``r, r + W, ...``. A
    ``DataLoader`` with a batch sampler is rebuilt around a sharded copy of it, so a rank loads only its own
    batches; any other iterable is walked in full and the other ranks' batches are skipped.

    Raises:
        ValueError: fewer global batches than ranks when ``every_rank`` (a measure whose merge needs every rank
            to have seen a batch, as ``StreamingMeasure.sync`` does); ``every_rank=False`` lets a rank get none.
    """
    info = info or current()
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches}")
    if not info.distributed:
        yield from enumerate(itertools.islice(loader, max_batches))  # loads no batch past max_batches
        return
    rank, world = info.rank, info.world_size
    n = global_batch_count(loader, max_batches)
    if every_rank and n is not None and n < world:
        raise ValueError(f"{n} batch(es) for {world} processes: every process needs at least one batch; "
                         f"use at most {n} processes (--nproc_per_node) or a smaller --batch-size")
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
        sharded = DataLoader(
            loader.dataset, batch_sampler=_ShardedBatches(loader.batch_sampler, rank, world, max_batches),
            num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn, generator=loader.generator, timeout=loader.timeout,
            multiprocessing_context=loader.multiprocessing_context,
            prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        )
        for j, batch in enumerate(sharded):
            yield rank + j * world, batch
        return
    for i, batch in enumerate(itertools.islice(loader, max_batches)):
        if i % world == rank:
            yield i, batch


class Batches:
    """The one walk over a loader's batches: ``(global batch index, batch)`` for this rank's share of ``loader``'s
    first ``max_batches``, with a progress bar on rank 0.

    ``shard=False``: every batch, on every rank (one process, or a caller that shards itself). ``shard=True``:
    ``shard_batches`` (rank r takes r, r + W, ...; ``every_rank`` as there). A ``max_batches`` below 1 is an error
    (raised when the iteration starts). The batch is given as the loader yields it (labels or not). The bar
    (``desc``, ``unit``) shows on rank 0 when ``progress`` is true (``None``: when stderr is a terminal); it counts
    ``steps`` per batch of this rank: after each batch it has advanced ``steps``, of which the caller may advance
    some within the batch with ``step`` (the loss landscape: one per grid point). Nothing is loaded or checked
    before the iteration starts.
    """

    def __init__(self, loader: Iterable, max_batches: int | None = None, *, shard: bool = False,
                 every_rank: bool = True, desc: str = "batches", progress: bool | None = False, unit: str = "batch",
                 steps: int = 1) -> None:
        self.loader, self.max_batches, self.shard, self.every_rank = loader, max_batches, shard, every_rank
        self.desc, self.progress, self.unit, self.steps = desc, progress, unit, steps
        self._bar: Any = None
        self._stepped = 0

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches must be a positive integer or None, got {self.max_batches}")
        info = current()
        if self.shard:
            items = shard_batches(self.loader, self.max_batches, info, self.every_rank)
            total = global_batch_count(self.loader, self.max_batches)
            total = None if total is None else len(range(info.rank, total, info.world_size))
        else:
            items = enumerate(itertools.islice(self.loader, self.max_batches))  # loads no batch past max_batches
            total = global_batch_count(self.loader, self.max_batches)
        progress = sys.stderr.isatty() if self.progress is None else self.progress
        bar = tqdm(total=None if total is None else total * self.steps, desc=self.desc, unit=self.unit,
                   disable=not progress or not info.is_main, leave=False, dynamic_ncols=True)
        self._bar, self._stepped = bar, 0
        try:
            for i, batch in items:
                yield i, batch
                bar.update(max(self.steps - self._stepped, 0))
                self._stepped = 0
        finally:
            bar.close()

    def step(self, n: int = 1) -> None:
        """Advance the bar ``n`` of the current batch's ``steps``."""
        self._stepped += n
        self._bar.update(n)


def all_reduce_sum(values: torch.Tensor, info: DistInfo | None = None) -> torch.Tensor:
    """Sum of ``values`` over the ranks, in place (identity without a process group, or when ``info`` says this
    process runs alone)."""
    if not (info or current()).distributed:
        return values
    if dist.get_backend() == "nccl" and values.device.type != "cuda":  # NCCL reduces CUDA tensors only
        reduced = values.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        values.copy_(reduced.cpu())
    else:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    info = current()
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo | None = None) -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if (info or current()).distributed:
        dist.barrier()
