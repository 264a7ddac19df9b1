"""The run's data: seeding, the preprocessing a run trains and validates with, data sets and loaders (DeiT's repeated
augmentation with the run's seed mixed in; a ``DistributedSampler`` also with one process, for exact resume)."""
from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from vitscope.data.local import collate_skipping_none
from vitscope.data.specs import DataSpec, parse_spec
from vitscope.distributed import DistInfo
from vitscope.training.builders import augment_options
from vitscope.training.config import TrainConfig

_logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and python in a loader worker from its torch seed (timm's RandAugment uses both)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def preprocess_mode(cfg: TrainConfig, saved_config: dict[str, Any] | None = None) -> str:
    """``model`` or ``data``: ``cfg.preprocess`` with ``auto`` resolved (``model`` for pretrained weights, as timm's
    train.py). A run resumed from a checkpoint whose ``saved_config`` predates the key keeps the data's."""
    if cfg.preprocess != "auto":
        return cfg.preprocess
    if saved_config is not None and "preprocess" not in saved_config:
        return "data"  # written before vitscope trained with the model's preprocessing: keep what it used
    return "model" if cfg.pretrained else "data"


def resolve_preprocessing(cfg: TrainConfig, model: nn.Module, data: DataSpec | None = None) -> dict[str, Any]:
    """The run's preprocessing in timm's data-config keys plus ``source`` and ``overridden``.

    ``cfg.preprocess`` (resolved, see ``preprocess_mode``) ``model``: ``timm.data.resolve_data_config(model=model)``
    (interpolation, mean/std, crop_pct, crop_mode of its ``pretrained_cfg``); ``data``: the data set's statistics
    and crop (``vitscope.data.factory.data_preprocessing``). Then the config's ``mean``, ``std``, ``crop_pct`` and
    ``eval_interpolation``. The input size is ``cfg.img_size``. Validation uses all of it; training uses mean/std,
    its augmentation keeping its own crop and interpolation. ``data``: ``cfg.data`` with ``cfg.data_options``
    parsed once by the caller (``vitscope.data.parse_spec``); parsed here when not given.
    """
    from vitscope.data.factory import data_preprocessing
    from vitscope.data.preprocessing import resolve_preprocessing as resolve

    if cfg.preprocess not in ("model", "data"):
        raise ValueError(f"preprocess must be resolved to 'model' or 'data' first, got {cfg.preprocess!r}")
    spec = parse_spec(cfg.data, **cfg.data_options) if data is None else data
    data = data_preprocessing(spec, img_size=cfg.img_size) if cfg.preprocess == "data" else None
    pre = resolve(cfg.preprocess, model=model, data=data, img_size=cfg.img_size,
                  overrides={"mean": cfg.mean, "std": cfg.std, "crop_pct": cfg.crop_pct,
                             "interpolation": cfg.eval_interpolation})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()}  # lists: recorded in YAML/JSON


def build_datasets(cfg: TrainConfig, preprocessing: dict[str, Any], data: DataSpec | None = None
                   ) -> tuple[Dataset, Dataset]:
    """The training and validation sets; ``data``: ``cfg.data`` with its options, parsed once by the caller."""
    from vitscope.data import create_loader

    data = parse_spec(cfg.data, **cfg.data_options) if data is None else data
    common = dict(img_size=cfg.img_size, seed=cfg.seed, preprocessing=preprocessing)
    train = create_loader(data, "train", batch_size=1, augment=augment_options(cfg),
                          max_examples=cfg.max_examples, fraction=cfg.data_fraction, **common)
    val = create_loader(data, "val", batch_size=1, augment=False, max_examples=cfg.max_val_examples, **common)
    return train.dataset, val.dataset


class PositionedSampler(Sampler):
    """A training sampler's indices as ``(index, epoch, position)``: ``position`` is the sample's place in the epoch's
    global order (rank ``r`` of ``W`` takes places ``r, r + W, ...``, as ``DistributedSampler`` and timm's
    ``RepeatAugSampler`` stride the shuffled indices), so ``SeededSamples`` can seed each sample's augmentation by
    where it is used, whatever process and loader worker loads it."""

    def __init__(self, sampler: Sampler, rank: int, world_size: int) -> None:
        self.sampler, self.rank, self.world_size, self.epoch = sampler, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for k, index in enumerate(self.sampler):
            yield index, self.epoch, self.rank + k * self.world_size


class SeededSamples(Dataset):
    """``dataset[index]`` with python's, numpy's and torch's RNGs seeded from (run seed, epoch, position) for the
    call and restored after it: each sample's random augmentation is a function of where it is used, not of which
    loader worker (timm's and PyTorch's per-worker seeding make a run depend on ``num_workers``) or process draws
    it, and loading leaves the main process's streams (dropout, mixup) alone. Keys come from ``PositionedSampler``."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed) % 2**63

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        index, epoch, position = key
        torch_seed, other = np.random.SeedSequence([self.seed, epoch, position]).generate_state(2, dtype=np.uint64)
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(int(other))
            np.random.seed(int(other) % 2**32)
            torch.manual_seed(int(torch_seed))
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class SeededRepeatAugSampler(RepeatAugSampler):
    """timm's ``RepeatAugSampler`` (DeiT's repeated augmentation, Touvron et al. 2021; Hoffer et al. 2020):
    each image ``num_repeats`` times per epoch, the copies spread over the processes, an epoch as long as
    a plain one (rounded down to a multiple of 256 images, as DeiT does). timm shuffles with the epoch
    as the only seed; here the run's seed is mixed in, so runs with different seeds see different orders."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, num_repeats: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=num_repeats)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(self.seed * 1_000_003 + epoch)


def build_loaders(cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, info: DistInfo, device: torch.device
             ) -> tuple[DataLoader, DataLoader]:
    """Training batches from a DistributedSampler (also with one process: seed + epoch shuffling);
    validation split into contiguous-stride shards without padding, so every image counts once."""
    if cfg.batch_size % info.world_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} is the global batch and must divide evenly over "
            f"{info.world_size} processes; use a multiple of {info.world_size}"
        )
    per_rank = cfg.batch_size // info.world_size
    if cfg.mixup_mode == "batch" and (cfg.mixup > 0 or cfg.cutmix > 0) and per_rank % 2:
        raise ValueError(f"mixup/cutmix in batch mode need an even per-process batch, got {per_rank}")
    if len(train_ds) < cfg.batch_size:
        raise ValueError(
            f"the training set has {len(train_ds)} examples, fewer than one batch ({cfg.batch_size}); "
            "lower batch_size or raise max_examples"
        )
    if cfg.repeated_aug > 1:
        sampler = SeededRepeatAugSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                         num_repeats=cfg.repeated_aug, seed=cfg.seed)
    else:
        sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
    pin = device.type == "cuda"
    workers = dict(num_workers=cfg.num_workers, worker_init_fn=seed_worker if cfg.num_workers else None,
                   persistent_workers=False, pin_memory=pin,
                   collate_fn=collate_skipping_none)  # drops images an image folder could not decode
    train = DataLoader(SeededSamples(train_ds, cfg.seed), batch_size=per_rank,
                       sampler=PositionedSampler(sampler, info.rank, info.world_size), drop_last=True,
                       generator=torch.Generator(), **workers)
    eval_bs = max((cfg.eval_batch_size or cfg.batch_size) // info.world_size, 1)
    val_shard = Subset(val_ds, range(info.rank, len(val_ds), info.world_size))
    val = DataLoader(val_shard, batch_size=eval_bs, shuffle=False, **workers)
    return train, val
