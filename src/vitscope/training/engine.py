"""The training loop: ``train(config)`` with DeiT-style ``train_one_epoch()`` and ``evaluate()``.

Built from timm's pieces (``create_optimizer_v2``, ``create_scheduler_v2``, ``Mixup``,
``SoftTargetCrossEntropy`` / ``LabelSmoothingCrossEntropy``, ``ModelEmaV3``, ``dispatch_clip_grad``)
with optional SAM (Foret et al. 2021), AMP and channels-last on CUDA, ``torch.compile``, DDP, a
checkpoint at every epoch end and exact resume.

Exact resume: the shuffling of epoch ``e`` is a function of ``seed + e`` only (a ``DistributedSampler``
with ``set_epoch``, also with one process, so one process and N processes see the same global
batches), and every RNG state is saved at the epoch end; a run restarted from the checkpoint of
epoch ``e - 1`` replays epoch ``e`` exactly (bit for bit on CPU in deterministic mode).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from vitscope.data.local import collate_skipping_none
from vitscope.distributed import DistInfo, all_reduce_sum, barrier, cleanup_distributed, init_distributed
from vitscope.measures.calibration import Calibration
from vitscope.runtime import autocast, resolve_device
from vitscope.training import checkpoint as ckpt
from vitscope.training.config import TrainConfig, config_from_dict, config_to_dict, resolve_config, save_config
from vitscope.training.probes import run_probes
from vitscope.training.sam import SAM

_logger = logging.getLogger(__name__)

__all__ = [
    "train", "train_one_epoch", "evaluate", "NonFiniteLossError", "build_model", "build_optimizer",
    "build_scheduler", "build_criterion", "build_mixup", "augment_options", "ECE_BINS", "EarlyStop",
]

ECE_BINS = 10
_TIME_KEYS = ("time", "images_per_s")  # the only non-reproducible statistics
SINGLE_PROCESS = DistInfo()


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last complete checkpoint (if any) is kept."""


# ----------------------------------------------------------------------------------------------
# Building the pieces from a config.


def build_model(cfg: TrainConfig, pretrained: bool | None = None) -> nn.Module:
    """``create_model(cfg.model, num_classes, drop_path_rate, drop_rate, img_size, **model_kwargs)``.

    ``pretrained`` (default ``cfg.pretrained``) starts from timm's hub weights (fine-tuning).
    """
    return _create(cfg, cfg.pretrained if pretrained is None else pretrained)[0]


def _create(cfg: TrainConfig, pretrained: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the ``create_model`` kwargs that rebuild it for analysis (no drop rates, no download)."""
    from vitscope.models import create_model

    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    kwargs["num_classes"] = cfg.num_classes
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    train_only: dict[str, Any] = dict(drop_path_rate=cfg.drop_path or None, drop_rate=cfg.drop or None)
    if pretrained:
        train_only["pretrained"] = True
    try:
        return create_model(cfg.model, **kwargs, **train_only), kwargs  # (img_size dropped for CNNs there)
    except TypeError as e:
        raise ValueError(f"Model {cfg.model!r} rejected the options {sorted(kwargs)}: {e}") from None
    except Exception as e:
        if not pretrained or isinstance(e, ValueError):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"Cannot load timm's pretrained weights of {cfg.model!r} ({type(e).__name__}: {first}); check the "
            "model name has hub weights (timm.list_models(pretrained=True)) and the network / HF_HUB_OFFLINE "
            "cache, or drop pretrained=true"
        ) from None


def base_lr(cfg: TrainConfig) -> float:
    """The learning rate, scaled linearly with the global batch when ``lr_scale_batch`` is set (DeiT)."""
    return cfg.lr * cfg.batch_size / cfg.lr_scale_batch if cfg.lr_scale_batch else cfg.lr


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer factory; no weight decay on biases, norms and ``no_weight_decay()`` params."""
    kwargs: dict[str, Any] = {}
    if cfg.opt_eps is not None:
        kwargs["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        kwargs["betas"] = tuple(cfg.opt_betas)
    try:
        return create_optimizer_v2(
            model, opt=cfg.opt, lr=base_lr(cfg), weight_decay=cfg.weight_decay, momentum=cfg.momentum, **kwargs
        )
    except (AssertionError, ValueError) as e:
        from timm.optim import list_optimizers

        raise ValueError(f"Cannot build optimizer {cfg.opt!r} ({e}); valid choices: {', '.join(list_optimizers())}") \
            from None


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int) -> tuple[Any, int]:
    """timm's scheduler factory; returns ``(scheduler or None, total epochs incl. a warm-up prefix)``."""
    try:
        return create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_prefix=cfg.warmup_prefix, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
            step_on_epochs=not cfg.sched_on_updates, updates_per_epoch=updates_per_epoch,
        )
    except (AssertionError, ValueError) as e:
        raise ValueError(
            f"Cannot build schedule {cfg.sched!r} ({e}); valid choices: cosine, tanh, step, multistep, poly, "
            "wsd, rsqrt, constant, none"
        ) from None


def build_mixup(cfg: TrainConfig) -> Mixup | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode, label_smoothing=cfg.smoothing, num_classes=cfg.num_classes,
    )


def build_criterion(cfg: TrainConfig) -> nn.Module:
    """Soft-target CE with mixup (smoothing folded into the targets), else label-smoothing CE, else CE."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def augment_options(cfg: TrainConfig) -> dict[str, Any] | bool:
    """The ``augment`` argument of ``vitscope.data.create_loader`` for the training split."""
    if not cfg.augment:
        return False
    opts: dict[str, Any] = {
        "crop": cfg.train_crop if cfg.train_crop != "resize" else "pad", "hflip": cfg.hflip,
        "color_jitter": cfg.color_jitter or None, "auto_augment": cfg.auto_augment,
        "interpolation": cfg.interpolation, "re_prob": cfg.reprob, "re_mode": cfg.remode, "re_count": cfg.recount,
    }
    if cfg.train_crop == "pad":
        opts["padding"] = cfg.crop_padding
    elif cfg.train_crop == "resize":
        opts["padding"] = 0
    else:
        opts["scale"] = tuple(cfg.scale)
    return opts


# ----------------------------------------------------------------------------------------------
# One epoch of training, one evaluation.


def _nonfinite(what: str, epoch: int, step: int, value: float | str, run_dir: str | None) -> NonFiniteLossError:
    where = ""
    if run_dir:
        last = ckpt.latest_checkpoint(run_dir)
        where = (f" The last good checkpoint ({last}) is kept." if last is not None
                 else " No checkpoint was written (no epoch finished).")
    return NonFiniteLossError(
        f"Non-finite {what} ({value}) at epoch {epoch}, step {step}; training stopped.{where} Lower lr, set "
        "clip_grad, or use amp=bf16 instead of fp16."
    )


NONFINITE_CHECK_EVERY = 25  # steps between the (host-syncing) checks of the training loss


class _LossWindow:
    """The training losses of the last steps, kept on the device until the next check.

    Row ``j`` holds ``(loss * B, B)`` of step ``start + j`` on this process in float64 (``loss`` the
    process's mean over its ``B`` images). :meth:`check`, called at the same steps on every process,
    sums the rows over the processes (one all-reduce) and copies them to the host (the only host sync):
    the first non-finite row names the step, the rest add to the epoch's sums. Between checks the host
    never waits for the device, so it queues the next steps' kernels while the device computes.
    """

    def __init__(self, rows: int, device: torch.device, dist_info: DistInfo):
        self.window = torch.zeros(rows, 2, dtype=torch.float64, device=device)  # (rows, [loss * B, B])
        self.dist_info = dist_info
        self.start = 0  # epoch-local index of the step in row 0
        self.n = 0  # rows filled since the last check
        self.loss_sum = 0.0  # sum over checked steps and processes of loss * B
        self.images = 0  # images of the checked steps, all processes
        self.recent = math.nan  # mean loss over the images of the last checked window

    def add(self, loss: torch.Tensor, batch: int) -> None:
        row = self.window[self.n]  # (2,) a view: no host sync below
        row[0].copy_(loss).mul_(batch)
        row[1].fill_(batch)
        self.n += 1

    @property
    def full(self) -> bool:
        return self.n == self.window.shape[0]

    def check(self, epoch: int, run_dir: str | None) -> None:
        """Raise :class:`NonFiniteLossError` naming the first non-finite step; else fold the rows into the sums."""
        if self.n == 0:
            return
        rows = all_reduce_sum(self.window[: self.n], self.dist_info).tolist()  # n x [sum loss * B, sum B]: the sync
        for j, (weighted, batch) in enumerate(rows):
            if not math.isfinite(weighted):  # NaN/inf on any process makes the sum non-finite
                raise _nonfinite("training loss", epoch, self.start + j, weighted / batch, run_dir)
        window_loss = math.fsum(w for w, _ in rows)
        window_images = int(round(sum(b for _, b in rows)))
        self.loss_sum += window_loss
        self.images += window_images
        self.recent = window_loss / max(window_images, 1)
        self.start += self.n
        self.n = 0


def _forward_backward(model: nn.Module, criterion: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                      scaler: torch.amp.GradScaler | None, autocast: contextlib.AbstractContextManager
                      ) -> torch.Tensor:
    with autocast:
        loss = criterion(model(images), targets)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    epoch: int,
    *,
    device: torch.device | str = "cpu",
    scheduler: Any = None,
    step_offset: int = 0,
    mixup_fn: Mixup | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    sam: SAM | None = None,
    ema: ModelEmaV3 | None = None,
    channels_last: bool = False,
    dist_info: DistInfo = SINGLE_PROCESS,
    run_dir: str | None = None,
    progress: bool = False,
    step_sleep: float = 0.0,
    nonfinite_check_every: int = NONFINITE_CHECK_EVERY,
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns ``{loss, lr, steps, images, time, images_per_s}``.

    ``loss`` is the mean training loss over all images of all processes. ``scheduler`` is stepped per
    update (``step_update``) with the global step ``step_offset + i + 1``; per-epoch schedules are
    stepped by the caller. Raises :class:`NonFiniteLossError` naming the first step with a NaN/inf loss.

    The losses stay on the device and are checked every ``nonfinite_check_every`` steps and at the end
    (the only host syncs of the loop, also the only progress-bar updates of the loss), at the same
    steps on every process, so all stop together. After the error the model and optimizer in memory
    may hold up to ``nonfinite_check_every`` non-finite updates; no checkpoint of the epoch exists.
    """
    if nonfinite_check_every < 1:
        raise ValueError(f"nonfinite_check_every must be >= 1, got {nonfinite_check_every}")
    device = torch.device(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    losses = _LossWindow(nonfinite_check_every, device, dist_info)
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    for i, (images, targets) in enumerate(bar):
        step = step_offset + i
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup_fn is not None:
            if images.shape[0] % 2:  # an unreadable image was dropped from the batch; timm's Mixup pairs images
                images, targets = images[:-1], targets[:-1]
            images, targets = mixup_fn(images, targets)

        optimizer.zero_grad(set_to_none=True)
        loss = _forward_backward(model, criterion, images, targets, scaler, autocast(device, amp_dtype))
        losses.add(loss, images.shape[0])  # checked below, every nonfinite_check_every steps
        if sam is not None:
            sam.ascend()
            optimizer.zero_grad(set_to_none=True)
            _forward_backward(model, criterion, images, targets, scaler, autocast(device, amp_dtype))
            sam.restore()
        if clip_grad is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            ema.update(ckpt.unwrap_model(model), step=step + 1)
        if scheduler is not None:
            scheduler.step_update(num_updates=step + 1)
        if losses.full:
            losses.check(epoch, run_dir)  # a host sync and, with several processes, an all-reduce
            if progress:
                bar.set_postfix(loss=f"{losses.recent:.4f}")
        if step_sleep:
            time.sleep(step_sleep)
    losses.check(epoch, run_dir)
    elapsed = time.perf_counter() - start
    steps = len(loader)
    n_images = losses.images
    return {
        "loss": losses.loss_sum / max(n_images, 1),
        "lr": optimizer.param_groups[0]["lr"],
        "steps": steps,
        "images": n_images,
        "time": elapsed,
        "images_per_s": n_images / max(elapsed, 1e-9),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    dist_info: DistInfo = SINGLE_PROCESS,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy (in %, as DeiT logs it), NLL, ECE and Brier score over ``loader``, summed over processes.

    The calibration statistics are vitscope's (``vitscope.measures.Calibration``, HDVW): ECE over
    10 equal-width confidence bins with the last bin closed. NaN/inf logits raise ``ValueError``.
    """
    device = torch.device(device)
    model.eval()
    cal = Calibration(n_bins=ECE_BINS, max_stored=0)  # additive sums only; no adaptive-ECE store
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress, dynamic_ncols=True):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)  # (B, C)
        cal.update(logits, targets)
    if dist_info.distributed:  # the state is additive: all-reduce the sums
        cal.sync()
    if cal.n == 0:
        raise ValueError("evaluate() got an empty loader; check the data spec and max_val_examples")
    stats = cal.compute()
    return {"top1": 100.0 * stats["top1"], "nll": stats["nll"], "ece": stats["ece"], "brier": stats["brier"],
            "n": stats["n"]}


# ----------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class _Run:
    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    dist: DistInfo
    model: nn.Module  # the plain module (saved, evaluated, probed)
    train_model: nn.Module  # DDP and/or compiled wrapper used for the training steps
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_epochs: int
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    sam: SAM | None
    ema: ModelEmaV3 | None
    criterion: nn.Module
    mixup: Mixup | None
    train_loader: DataLoader
    val_loader: DataLoader
    probe_images: torch.Tensor | None
    spec: dict[str, Any]  # what builds the network (written into every checkpoint)


def check_names(cfg: TrainConfig) -> None:
    """Fail fast on an unknown model or data set, listing the valid choices."""
    import timm

    from vitscope.data import parse_spec
    from vitscope.models import list_models
    from vitscope.models._registry import is_hub_name

    if not timm.is_model(cfg.model) and not is_hub_name(cfg.model):  # hf-hub:ORG/NAME is read when it is built
        close = difflib.get_close_matches(cfg.model, sorted(set(timm.list_models())), n=5)
        raise ValueError(
            f"Unknown model {cfg.model!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f". vitscope's models: {', '.join(list_models())}; any name of timm.list_models() also works"
        )
    parse_spec(cfg.data, **cfg.data_options)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
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


def resolve_preprocessing(cfg: TrainConfig, model: nn.Module) -> dict[str, Any]:
    """The run's preprocessing in timm's data-config keys plus ``source`` and ``overridden``.

    ``cfg.preprocess`` (resolved, see ``preprocess_mode``) ``model``: ``timm.data.resolve_data_config(model=model)``
    (interpolation, mean/std, crop_pct, crop_mode of its ``pretrained_cfg``); ``data``: the data set's statistics
    and crop (``vitscope.data.factory.data_preprocessing``). Then the config's ``mean``, ``std``, ``crop_pct`` and
    ``eval_interpolation``. The input size is ``cfg.img_size``. Validation uses all of it; training uses mean/std,
    its augmentation keeping its own crop and interpolation.
    """
    from vitscope.data.factory import data_preprocessing

    if cfg.preprocess == "model":
        from timm.data import resolve_data_config

        base = resolve_data_config(model=model)
    elif cfg.preprocess == "data":
        base = data_preprocessing(cfg.data, img_size=cfg.img_size, **cfg.data_options)
    else:
        raise ValueError(f"preprocess must be resolved to 'model' or 'data' first, got {cfg.preprocess!r}")
    overrides = {"mean": cfg.mean, "std": cfg.std, "crop_pct": cfg.crop_pct, "interpolation": cfg.eval_interpolation}
    pre = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    size = int(cfg.img_size) if cfg.img_size is not None else int(base["input_size"][-1])
    return {"input_size": [3, size, size], "interpolation": str(pre["interpolation"]),
            "mean": [float(m) for m in pre["mean"]], "std": [float(s) for s in pre["std"]],
            "crop_pct": float(pre.get("crop_pct") or 1.0), "crop_mode": str(pre.get("crop_mode") or "center"),
            "source": cfg.preprocess, "overridden": sorted(k for k, v in overrides.items() if v is not None)}


def _datasets(cfg: TrainConfig, preprocessing: dict[str, Any]) -> tuple[Dataset, Dataset]:
    from vitscope.data import create_loader

    common = dict(img_size=cfg.img_size, seed=cfg.seed, preprocessing=preprocessing, **cfg.data_options)
    train = create_loader(cfg.data, "train", batch_size=1, augment=augment_options(cfg),
                          max_examples=cfg.max_examples, fraction=cfg.data_fraction, **common)
    val = create_loader(cfg.data, "val", batch_size=1, augment=False, max_examples=cfg.max_val_examples, **common)
    return train.dataset, val.dataset


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


def _loaders(cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, info: DistInfo, device: torch.device
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
    workers = dict(num_workers=cfg.num_workers, worker_init_fn=_seed_worker if cfg.num_workers else None,
                   persistent_workers=False, pin_memory=pin,
                   collate_fn=collate_skipping_none)  # drops images an image folder could not decode
    train = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, drop_last=True,
                       generator=torch.Generator(), **workers)
    eval_bs = max((cfg.eval_batch_size or cfg.batch_size) // info.world_size, 1)
    val_shard = Subset(val_ds, range(info.rank, len(val_ds), info.world_size))
    val = DataLoader(val_shard, batch_size=eval_bs, shuffle=False, **workers)
    return train, val


def _reseed_epoch(run: _Run, epoch: int) -> None:
    """Shuffling and loader-worker seeds of ``epoch`` depend only on (seed, epoch, rank)."""
    run.train_loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    run.train_loader.generator.manual_seed(run.cfg.seed * 100_003 + epoch * 1_009 + run.dist.rank)


def _setup(cfg: TrainConfig, device: torch.device, info: DistInfo, resume: bool) -> tuple[_Run, dict | None]:
    from vitscope.data import data_info

    run_dir = Path(cfg.out)
    state, weights = None, None
    latest = ckpt.latest_checkpoint(run_dir)
    if resume and latest is not None:
        state, weights = ckpt.load_latest(run_dir)
    elif resume:
        _logger.info("%s has no checkpoint yet: starting the run from epoch 0", run_dir)
    elif latest is not None:
        raise ValueError(
            f"{run_dir} already holds a run (checkpoint {latest}); continue it with --resume {run_dir} "
            "or choose another --out"
        )
    dinfo = data_info(cfg.data, img_size=cfg.img_size, **cfg.data_options)
    cfg = dataclasses.replace(cfg, preprocess=preprocess_mode(cfg, state["config"] if state is not None else None))
    if cfg.preprocess == "data" and cfg.std is None and not all(s > 0 for s in dinfo.std):  # NaN or 0: x / 0
        raise ValueError(f"data {cfg.data!r} has per-channel std {tuple(dinfo.std)}: its images are constant in a "
                         "channel, so normalising them divides by zero; check the data set (or its spec options)")
    updates: dict[str, Any] = {}
    if cfg.num_classes is None:
        updates["num_classes"] = dinfo.num_classes
    cfg = dataclasses.replace(cfg, **updates)

    _seed_everything(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model, create_kwargs = _create(cfg, pretrained=cfg.pretrained and state is None)  # resume: no download
    if cfg.img_size is None:
        cfg = dataclasses.replace(cfg, img_size=int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]))
    spec = {"model": cfg.model, "model_kwargs": dict(cfg.model_kwargs), "img_size": cfg.img_size,
            "num_classes": cfg.num_classes, "data": cfg.data, "data_options": dict(cfg.data_options),
            "create_kwargs": create_kwargs, "pretrained": cfg.pretrained}
    preprocessing = resolve_preprocessing(cfg, model)
    spec["preprocessing"] = preprocessing  # what the analyses feed the trained network (cli._common)
    model.to(device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)

    train_ds, val_ds = _datasets(cfg, preprocessing)
    train_loader, val_loader = _loaders(cfg, train_ds, val_ds, info, device)
    optimizer = build_optimizer(model, cfg)
    scheduler, total_epochs = build_scheduler(optimizer, cfg, len(train_loader))
    amp_dtype = None
    scaler = None
    if cfg.amp != "none":
        if device.type != "cuda":
            _logger.warning("amp=%s is CUDA only; training in float32 on %s", cfg.amp, device)
        else:
            amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
            scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    spec["precision"] = str(amp_dtype or torch.float32).removeprefix("torch.")  # what it trains in, not asked for
    if cfg.channels_last and device.type != "cuda":
        _logger.warning("channels_last is used on CUDA only; ignored on %s", device)
    if cfg.sam_rho > 0 and scaler is not None:
        raise ValueError("sam_rho > 0 does not combine with amp=fp16 (gradient scaling); use amp=bf16 or amp=none")
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    sam = SAM(model.parameters(), rho=cfg.sam_rho) if cfg.sam_rho > 0 else None

    if state is not None:  # restore before wrapping
        ckpt.load_model_weights(model, weights)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            if _schedule_changed(state["config"], cfg):  # e.g. `epochs` raised to extend a run
                _logger.warning("the schedule settings changed on resume: the schedule follows the new config")
            else:
                scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])

    train_model: nn.Module = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)
    probe_images = None
    if cfg.probes and cfg.probes["measures"]:
        k = min(cfg.probes["num_images"], len(val_ds))
        probe_images = torch.stack([val_ds[i][0] for i in range(k)]).to(device)  # (k, 3, H, W) fixed batch
    run = _Run(cfg, run_dir, device, info, model, train_model, optimizer, scheduler, total_epochs, scaler,
               amp_dtype, sam, ema, build_criterion(cfg), build_mixup(cfg), train_loader, val_loader, probe_images,
               spec)
    return run, state


_SCHEDULE_KEYS = ("sched", "epochs", "warmup_epochs", "warmup_prefix", "warmup_lr", "min_lr", "lr",
                  "lr_scale_batch", "batch_size", "sched_on_updates")


def _schedule_changed(saved: dict[str, Any], cfg: TrainConfig) -> bool:
    return any(saved.get(k) != getattr(cfg, k) for k in _SCHEDULE_KEYS)


def _gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    state = ckpt.get_rng_state()
    if not info.distributed:
        return [state]
    gathered: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


@dataclasses.dataclass
class EarlyStop:
    """Early stopping on the validation loss: ``wait`` epochs since ``best`` fell by more than ``min_delta``.

    An epoch without an improvement counts against ``patience`` only once training could have converged:
    after the warm-up (``epoch >= warmup_epochs``) and once the epoch's learning rate (its last update's) has
    decayed to ``lr_fraction`` of the peak or below. A plateau at a high learning rate is not convergence:
    small ViTs on a few thousand images sit on a noisy validation-loss plateau for the first epochs and then
    improve as the cosine decays (measured on ELPV: README, "Command line"). ``lr_fraction=None`` counts from
    the first epoch (the rule before it existed). An improvement always resets ``wait`` and updates ``best``.
    With ``early_stop_restore_best`` the run ends (stopped or at the cap) with the best epoch's weights, so
    waiting for the decay costs time, not accuracy (a small-data run may overfit meanwhile).
    """

    patience: int | None
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int = -1
    wait: int = 0
    lr_fraction: float | None = None
    warmup_epochs: int = 0
    counting_from: int = -1  # the first epoch whose stall could count against patience (-1: none yet)

    def counts(self, epoch: int, lr_ratio: float | None) -> bool:
        """Whether an epoch without an improvement counts: past the warm-up and the learning rate decayed."""
        if self.lr_fraction is None:
            return True
        if epoch < self.warmup_epochs:
            return False
        return lr_ratio is None or lr_ratio <= self.lr_fraction + 1e-12

    def update(self, epoch: int, val_loss: float, lr_ratio: float | None = None) -> None:
        """Record ``epoch``'s validation loss; ``lr_ratio``: its learning rate / the peak (None: unknown)."""
        counting = self.counts(epoch, lr_ratio)
        if counting and self.counting_from < 0:
            self.counting_from = epoch
        if val_loss < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait = val_loss, epoch, 0
        elif counting:
            self.wait += 1

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.wait >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "counting_from": self.counting_from}

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> EarlyStop:
        """The rule of ``cfg``. A schedule that never decays to the fraction (``constant`` / ``none``, or a
        ``min_lr`` not below it) counts from the end of the warm-up instead of never."""
        fraction = cfg.early_stop_lr_fraction
        if fraction is not None:
            peak = base_lr(cfg)
            floor = cfg.min_lr / peak if peak > 0 else 1.0
            fraction = 1.0 if cfg.sched in ("constant", "none") or floor >= fraction else fraction
        return cls(cfg.early_stop_patience, cfg.early_stop_min_delta, lr_fraction=fraction,
                   warmup_epochs=cfg.warmup_epochs)

    @classmethod
    def restore(cls, cfg: TrainConfig, saved: dict[str, Any] | None, records: list[dict[str, Any]]
                ) -> EarlyStop:
        """From a checkpoint's state, else by replaying the metrics lines (runs saved before early stopping).

        Checkpoints written before ``counting_from`` existed restore with it unknown (-1), which only affects
        the report, not the rule (``wait`` is saved)."""
        es = cls.from_config(cfg)
        if saved is not None:
            es.best, es.best_epoch, es.wait = float(saved["best"]), int(saved["best_epoch"]), int(saved["wait"])
            es.counting_from = int(saved.get("counting_from", -1))
        else:
            peak = base_lr(cfg)
            for r in records:
                if isinstance(r.get("val_nll"), (int, float)):
                    lr = r.get("train_lr")
                    es.update(int(r["epoch"]), float(r["val_nll"]),
                              float(lr) / peak if isinstance(lr, (int, float)) and peak > 0 else None)
        return es


BEST_FILE = "best.safetensors"  # early stopping: the weights of the epoch with the lowest val_nll so far


def _save_best(run: _Run, epoch: int) -> None:
    """Rank 0 writes the current weights as ``best.safetensors`` (atomically; metadata: the epoch)."""
    if not run.dist.is_main:
        return
    from safetensors.torch import save_file

    from vitscope.io.atomic import atomic_write

    model = ckpt.unwrap_model(run.model)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(run.run_dir / BEST_FILE, lambda tmp: save_file(tensors, tmp, metadata={"epoch": str(epoch)}))


def _restore_best(run: _Run, es: EarlyStop) -> bool:
    """Load ``best.safetensors`` into the model on every rank if it holds epoch ``es.best_epoch``."""
    from safetensors import safe_open

    barrier(run.dist)
    path = run.run_dir / BEST_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            epoch = int((f.metadata() or {}).get("epoch", -1))
    except (OSError, ValueError):
        epoch = -2
    if epoch != es.best_epoch:  # a run started before best weights were kept: keep the last ones
        _logger.warning("%s does not hold the best epoch %d's weights; the run keeps its last epoch's", path,
                        es.best_epoch)
        return False
    ckpt.load_model_weights(ckpt.unwrap_model(run.model), path)
    return True


def _save(run: _Run, epoch: int, step: int, es: EarlyStop, finished: bool, keep: bool = False) -> None:
    rng = _gather_rng(run.dist)  # a collective: every rank takes part
    if not run.dist.is_main:
        return
    state = {
        "epoch": epoch,
        "step": step,
        "config": config_to_dict(run.cfg),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "rng": rng,
        "sampler": {"seed": run.cfg.seed, "epoch": epoch + 1, "generator": run.train_loader.generator.get_state()},
        "world_size": run.dist.world_size,
        "early_stop": es.state(),
    }
    info = {"total_epochs": run.total_epochs, "finished": finished or es.stop, "stopped_early": es.stop,
            "best_epoch": es.best_epoch, "best_val_nll": es.best if math.isfinite(es.best) else None}
    ckpt.save_checkpoint(run.run_dir, run.model, state, spec=run.spec, info=info, keep=keep)


def _tensorboard(run: _Run) -> Any:
    if not (run.cfg.tensorboard and run.dist.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _logger.warning("tensorboard=true but the tensorboard package is not installed; logging to "
                        "metrics.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(str(run.run_dir / "tensorboard"))


def _fit(run: _Run, state: dict | None) -> dict[str, Any]:
    cfg, info = run.cfg, run.dist
    start_epoch, step = 0, 0
    if state is not None:
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        rng = state["rng"]
        if len(rng) == info.world_size:
            ckpt.set_rng_state(rng[info.rank])
        else:
            _logger.warning("checkpoint saved by %d processes, resumed by %d: RNG streams reseeded",
                            len(rng), info.world_size)
            _seed_everything(cfg.seed + info.rank + 7919 * start_epoch)
        _logger.info("resuming %s at epoch %d (step %d)", run.run_dir, start_epoch, step)
    else:
        _seed_everything(cfg.seed + info.rank)  # augmentation / dropout streams differ per rank
    if info.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.run_dir / ckpt.CONFIG_FILE)
        # Lines are written before the checkpoint that covers them: drop those of epochs to be replayed
        # (from scratch also the probes of the initial weights, epoch -1, which are measured again).
        ckpt.truncate_jsonl(run.run_dir / ckpt.METRICS_FILE, start_epoch)
        ckpt.truncate_jsonl(run.run_dir / ckpt.PROBES_FILE, start_epoch if start_epoch > 0 else -1)
    barrier(info)
    writer = _tensorboard(run)
    progress = cfg.progress and info.is_main and sys.stderr.isatty()
    step_sleep = float(os.environ.get("VITSCOPE_TEST_STEP_SLEEP", 0) or 0)  # test hook: widen the kill window
    channels_last = cfg.channels_last and run.device.type == "cuda"
    steps_per_epoch = len(run.train_loader)
    earlier = ckpt.read_jsonl(run.run_dir / ckpt.METRICS_FILE)  # every rank: the early-stopping replay
    last: dict[str, Any] = earlier[-1] if earlier else {}  # returned as is when no epoch is left to train
    best = max((r.get("val_top1", -math.inf) for r in earlier), default=-math.inf)
    es = EarlyStop.restore(cfg, state.get("early_stop") if state is not None else None, earlier)
    peak_lr = base_lr(cfg)
    # Probes run on every rank (a forward pass may resize buffers, e.g. ConViT's rel_indices, and DDP
    # broadcasts buffers), but only rank 0 writes. Epoch -1 holds the initial weights.
    if run.probe_images is not None and start_epoch == 0:
        probes = run_probes(run.model, run.probe_images, cfg.probes["measures"], -1)
        for p in probes if info.is_main else []:
            ckpt.append_jsonl(run.run_dir / ckpt.PROBES_FILE, p)
    epoch_bar = tqdm(range(start_epoch, run.total_epochs), desc="epochs", disable=not progress,
                     initial=start_epoch, total=run.total_epochs)
    for epoch in epoch_bar:
        if es.stop:  # a run that stopped early and is resumed (e.g. requeued) has nothing left to do
            break
        _reseed_epoch(run, epoch)
        if run.scheduler is not None and not cfg.sched_on_updates:
            run.scheduler.step(epoch)
        train_stats = train_one_epoch(
            run.train_model, run.train_loader, run.optimizer, run.criterion, epoch, device=run.device,
            scheduler=run.scheduler if cfg.sched_on_updates else None, step_offset=step, mixup_fn=run.mixup,
            scaler=run.scaler, amp_dtype=run.amp_dtype, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
            sam=run.sam, ema=run.ema, channels_last=channels_last, dist_info=info, run_dir=str(run.run_dir),
            progress=progress, step_sleep=step_sleep,
        )
        step += steps_per_epoch
        eval_kw = dict(device=run.device, amp_dtype=run.amp_dtype, channels_last=channels_last,
                       dist_info=info, progress=progress)
        try:
            val_stats = evaluate(run.model, run.val_loader, **eval_kw)
        except ValueError as e:
            if "NaN" not in str(e):
                raise
            raise _nonfinite("validation logits", epoch, steps_per_epoch, "NaN/inf", str(run.run_dir)) from None
        record: dict[str, Any] = {"epoch": epoch, "step": step}
        record.update({f"train_{k}": v for k, v in train_stats.items()})
        record.update({f"val_{k}": v for k, v in val_stats.items()})
        if run.ema is not None:
            record.update({f"val_ema_{k}": v for k, v in evaluate(run.ema.module, run.val_loader, **eval_kw).items()})
        probes = []
        if run.probe_images is not None and (epoch + 1) % cfg.probes["every"] == 0:
            probes = run_probes(run.model, run.probe_images, cfg.probes["measures"], epoch)
        es.update(epoch, record["val_nll"], train_stats["lr"] / peak_lr if peak_lr > 0 else None)
        record.update(best_epoch=es.best_epoch, best_val_nll=es.best if math.isfinite(es.best) else None)
        keep_best = es.patience is not None and cfg.early_stop_restore_best
        if es.patience is not None:
            record["early_stop_wait"] = es.wait  # epochs without an improvement that counted
        if keep_best and es.best_epoch == epoch:
            _save_best(run, epoch)
        if es.stop:
            record["stopped_early"] = True
        if keep_best and (es.stop or epoch == run.total_epochs - 1) and es.best_epoch not in (-1, epoch):
            if _restore_best(run, es):  # the run ends with its best epoch's weights (checkpoint, model.safetensors)
                record["weights_epoch"] = es.best_epoch
        if info.is_main:  # the lines first, then the checkpoint that covers them
            ckpt.append_jsonl(run.run_dir / ckpt.METRICS_FILE, record)
            for p in probes:
                ckpt.append_jsonl(run.run_dir / ckpt.PROBES_FILE, p)
        finished = epoch == run.total_epochs - 1
        # keep_epochs: every N-th epoch's weights and the last epoch's (not when the best epoch's were restored)
        keep = cfg.keep_epochs > 0 and "weights_epoch" not in record and \
            (epoch % cfg.keep_epochs == 0 or finished or es.stop)
        _save(run, epoch, step, es, finished=finished, keep=keep)
        if info.is_main:
            if es.stop:
                _logger.info("early stop after epoch %d: val_nll has not improved by more than %g for %d epochs "
                             "(best %.4f at epoch %d)", epoch, es.min_delta, es.patience, es.best, es.best_epoch)
            if writer is not None:
                for k, v in record.items():
                    if k != "epoch" and isinstance(v, (int, float)):
                        writer.add_scalar(k, v, epoch)
            _logger.info("epoch %d: train loss %.4f, val top1 %.2f%%, nll %.4f, ece %.4f", epoch,
                         record["train_loss"], record["val_top1"], record["val_nll"], record["val_ece"])
        best = max(best, record["val_top1"])
        last = record
        barrier(info)
    if writer is not None:
        writer.close()
    return {**last, "best_val_top1": best if best > -math.inf else None, "run_dir": str(run.run_dir),
            "epochs": run.total_epochs, "precision": run.spec["precision"],
            "best_epoch": es.best_epoch if es.best_epoch >= 0 else None,
            "best_val_nll": es.best if es.best_epoch >= 0 else None, "stopped_early": es.stop,
            "early_stop_counting_from": es.counting_from if es.counting_from >= 0 else None}


def train(config: TrainConfig | dict[str, Any] | None = None, *, resume: bool = False, resume_epoch: int | None = None,
          **overrides: Any) -> dict[str, Any]:
    """Train ``config`` (a ``TrainConfig``, a mapping of config keys, or defaults + ``overrides``).

    Writes ``config.yaml``, ``metrics.jsonl``, ``probes.jsonl`` (when probes are scheduled) and a
    checkpoint per epoch (``checkpoints/epoch-N``, see ``vitscope.training.checkpoint``) into
    ``config.out``, which is locked meanwhile (``RunLockedError`` for a second writer); each epoch's
    lines are written before its checkpoint. With ``resume=True`` continues from the latest complete
    checkpoint there (from epoch 0 when there is none yet); ``resume_epoch=N`` resumes from the kept checkpoint
    of epoch N instead (the previous one, when the newest is damaged), removing the newer ones. Returns the last
    epoch's statistics plus
    ``best_val_top1``, ``run_dir``, ``epochs``, ``best_epoch`` / ``best_val_nll`` (lowest ``val_nll``
    by ``early_stop_min_delta`` steps), ``stopped_early`` and ``early_stop_counting_from`` (the first epoch
    whose stall could count against the patience: past the warm-up, lr <= ``early_stop_lr_fraction`` of its peak).
    """
    if isinstance(config, dict):
        config = config_from_dict(config)
    cfg = resolve_config(overrides=overrides, base=config) if overrides or config is None else config
    check_names(cfg)
    device = resolve_device(cfg.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    info = init_distributed(device.type)
    try:
        if device.type == "cuda" and info.distributed:
            device = torch.device("cuda", info.local_rank)
        with _locked(Path(cfg.out), info, device):
            _prepare_run_dir(cfg, info, device, resume, resume_epoch)
            run, state = _setup(cfg, device, info, resume)
            return _fit(run, state)
    finally:
        cleanup_distributed(info)
        torch.use_deterministic_algorithms(was_deterministic)


def _on_main(info: DistInfo, device: torch.device, fn: Any) -> None:
    """Run ``fn()`` on rank 0; if it raises, every rank raises (no rank is left waiting in a collective)."""
    error: Exception | None = None
    if info.is_main:
        try:
            fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    if info.distributed:
        failed = all_reduce_sum(torch.tensor([float(error is not None)], device=device), info)
        if failed.item() and error is None:
            error = ValueError("rank 0 could not prepare the run directory (its error is in rank 0's output)")
    if error is not None:
        raise error


@contextlib.contextmanager
def _locked(run_dir: Path, info: DistInfo, device: torch.device) -> Any:
    """Rank 0 holds the run directory's lock for the whole run; every rank fails together if it is taken."""
    with contextlib.ExitStack() as stack:
        _on_main(info, device, lambda: stack.enter_context(ckpt.lock_run(run_dir)))
        yield


def _prepare_run_dir(cfg: TrainConfig, info: DistInfo, device: torch.device, resume: bool,
                     resume_epoch: int | None = None) -> None:
    """Under the lock, before any work: refuse to overwrite a run, remove what killed writers left, and
    write ``config.yaml`` (so ``--resume`` can restart a run killed before its first checkpoint)."""
    run_dir = Path(cfg.out)

    def prepare() -> None:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None and not resume:
            raise ValueError(f"{run_dir} already holds a run (checkpoint {latest}); continue it with "
                             f"--resume {run_dir} or choose another --out")
        if resume_epoch is not None:
            if not resume:
                raise ValueError("resume_epoch goes with resume=True (--resume-epoch with --resume RUN_DIR)")
            ckpt.rewind(run_dir, resume_epoch)
        ckpt.remove_stale_files(run_dir)
        if latest is None:
            save_config(cfg, run_dir / ckpt.CONFIG_FILE)

    _on_main(info, device, prepare)


def strip_timing(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its wall-clock statistics (for comparing runs)."""
    return {k: v for k, v in record.items() if not any(k.endswith(t) for t in _TIME_KEYS)}
