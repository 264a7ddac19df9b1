"""The evaluation loop shared by the robustness sweeps: checks, sharding, progress bar."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from vitscope.distributed import current as dist_current
from vitscope.distributed import global_batch_count, shard_batches
from vitscope.robustness._checks import check_images, check_targets


def batches(
    loader: Iterable,
    device: torch.device,
    max_batches: int | None = None,
    desc: str = "robustness",
    progress: bool | None = None,
    shard: bool = False,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(index, images, targets)`` on ``device``, checked to be pixel-space images with labels.

    ``progress=None`` shows a tqdm bar only when stderr is a terminal (on rank 0). ``shard=True``: under
    torch.distributed, this rank's share of the batches (``vitscope.distributed.shard_batches``), with
    their global indices.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches}")
    info = dist_current()
    if progress is None:
        progress = sys.stderr.isatty()
    total = global_batch_count(loader, max_batches)
    if shard:
        if total is not None:
            total = len(range(info.rank, total, info.world_size))
        items = shard_batches(loader, max_batches, info, every_rank=False)  # counts merge with zeros too
    else:
        items = enumerate(loader)
    bar = tqdm(total=total, desc=desc, disable=not progress or not info.is_main, leave=False)
    try:
        for i, batch in items:
            if max_batches is not None and i >= max_batches:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("the loader must yield (images, labels) pairs")
            images = check_images(batch[0].to(device, non_blocking=True).float())
            targets = check_targets(batch[1], images.shape[0]).to(device)
            yield i, images, targets
            bar.update(1)
    finally:
        bar.close()
