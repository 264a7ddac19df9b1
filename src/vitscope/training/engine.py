"""A training run: ``train(config)`` sets it up (``builders``, ``loaders``), runs its epochs (``loop``),
checkpoints each one.

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
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm import tqdm

from vitscope.distributed import DistInfo, all_reduce_sum, barrier, cleanup_distributed, init_distributed
from vitscope.runtime import AMP_DTYPES, resolve_device
from vitscope.training import checkpoint as ckpt
from vitscope.training.builders import (
    base_lr,
    build_criterion,
    build_mixup,
    build_optimizer,
    build_scheduler,
    check_names,
    create_network,
)
from vitscope.training.config import TrainConfig, config_from_dict, config_to_dict, resolve_config, save_config
from vitscope.training.early_stop import EarlyStop, restore_best, save_best
from vitscope.training.loaders import (
    build_datasets,
    build_loaders,
    preprocess_mode,
    resolve_preprocessing,
    seed_everything,
)
from vitscope.training.loop import (
    evaluate,
    nonfinite_error,
    train_one_epoch,
)
from vitscope.training.probes import run_probes
from vitscope.training.sam import SAM

_logger = logging.getLogger(__name__)

__all__ = ["train", "strip_timing"]

_TIME_KEYS = ("time", "images_per_s")  # the only non-reproducible statistics


# ----------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class TrainingRun:
    """The assembled pieces of one training run (``_setup``), handed to the epoch loop (``_fit``)."""

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


def _reseed_epoch(run: TrainingRun, epoch: int) -> None:
    """Shuffling and loader-worker seeds of ``epoch`` depend only on (seed, epoch, rank); each sample's augmentation
    on (seed, epoch, its place in the epoch) only (``loaders.SeededSamples``)."""
    run.train_loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    run.train_loader.generator.manual_seed(run.cfg.seed * 100_003 + epoch * 1_009 + run.dist.rank)


def _setup(cfg: TrainConfig, device: torch.device, info: DistInfo, resume: bool) -> tuple[TrainingRun, dict | None]:
    from vitscope.data import data_info, parse_spec

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
    data = parse_spec(cfg.data, **cfg.data_options)  # parsed once; the data functions below take the DataSpec
    dinfo = data_info(data, img_size=cfg.img_size)
    cfg = dataclasses.replace(cfg, preprocess=preprocess_mode(cfg, state["config"] if state is not None else None))
    if cfg.preprocess == "data" and cfg.std is None and not all(s > 0 for s in dinfo.std):  # NaN or 0: x / 0
        raise ValueError(f"data {cfg.data!r} has per-channel std {tuple(dinfo.std)}: its images are constant in a "
                         "channel, so normalising them divides by zero; check the data set (or its spec options)")
    updates: dict[str, Any] = {}
    if cfg.num_classes is None:
        updates["num_classes"] = dinfo.num_classes
    cfg = dataclasses.replace(cfg, **updates)

    seed_everything(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model, create_kwargs = create_network(cfg, pretrained=cfg.pretrained and state is None)  # resume: no download
    if cfg.img_size is None:
        cfg = dataclasses.replace(cfg, img_size=int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]))
    spec = {"model": cfg.model, "model_kwargs": dict(cfg.model_kwargs), "img_size": cfg.img_size,
            "num_classes": cfg.num_classes, "data": cfg.data, "data_options": dict(cfg.data_options),
            "create_kwargs": create_kwargs, "pretrained": cfg.pretrained}
    preprocessing = resolve_preprocessing(cfg, model, data)
    spec["preprocessing"] = preprocessing  # what the analyses feed the trained network (cli._common)
    model.to(device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)

    train_ds, val_ds = build_datasets(cfg, preprocessing, data)
    train_loader, val_loader = build_loaders(cfg, train_ds, val_ds, info, device)
    optimizer = build_optimizer(model, cfg)
    scheduler, total_epochs = build_scheduler(optimizer, cfg, len(train_loader))
    amp_dtype = None
    scaler = None
    if cfg.amp != "none":
        if device.type != "cuda":
            _logger.warning("amp=%s is CUDA only; training in float32 on %s", cfg.amp, device)
        else:
            amp_dtype = AMP_DTYPES[cfg.amp]
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
    run = TrainingRun(cfg, run_dir, device, info, model, train_model, optimizer, scheduler, total_epochs, scaler,
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


def _save(run: TrainingRun, epoch: int, step: int, es: EarlyStop, finished: bool, keep: bool = False) -> None:
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


def _tensorboard(run: TrainingRun) -> Any:
    if not (run.cfg.tensorboard and run.dist.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _logger.warning("tensorboard=true but the tensorboard package is not installed; logging to "
                        "metrics.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(str(run.run_dir / "tensorboard"))


def _fit(run: TrainingRun, state: dict | None) -> dict[str, Any]:
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
            seed_everything(cfg.seed + info.rank + 7919 * start_epoch)
        _logger.info("resuming %s at epoch %d (step %d)", run.run_dir, start_epoch, step)
    else:
        seed_everything(cfg.seed + info.rank)  # augmentation / dropout streams differ per rank
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
            raise nonfinite_error("validation logits", epoch, steps_per_epoch, "NaN/inf", str(run.run_dir)) from None
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
            save_best(run, epoch)
        if es.stop:
            record["stopped_early"] = True
        if keep_best and (es.stop or epoch == run.total_epochs - 1) and es.best_epoch not in (-1, epoch):
            if restore_best(run, es):  # the run ends with its best epoch's weights (checkpoint, model.safetensors)
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
