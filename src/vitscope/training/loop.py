"""One epoch of training (DeiT-style ``train_one_epoch``: SAM, AMP, gradient clipping, EMA, mixup) and one evaluation
(``evaluate``: top-1, NLL, ECE, Brier through ``vitscope.measures.Calibration`` in the one evaluation loop,
``vitscope.measures.evaluation``), summed over the processes."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.utils.data import DataLoader
from tqdm import tqdm

from vitscope.distributed import DistInfo, all_reduce_sum
from vitscope.measures.calibration import Calibration
from vitscope.measures.evaluation import eval_loop
from vitscope.runtime import autocast
from vitscope.training import checkpoint as ckpt
from vitscope.training.sam import SAM

_logger = logging.getLogger(__name__)

ECE_BINS = 10
SINGLE_PROCESS = DistInfo()


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last complete checkpoint (if any) is kept."""





def nonfinite_error(what: str, epoch: int, step: int, value: float | str, run_dir: str | None) -> NonFiniteLossError:
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
                raise nonfinite_error("training loss", epoch, self.start + j, weighted / batch, run_dir)
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
    10 equal-width confidence bins with the last bin closed. NaN/inf logits raise ``ValueError``. The loop is
    ``vitscope.measures.evaluation.eval_loop`` (eval mode, each module's training flag restored after).
    """
    cal = Calibration(n_bins=ECE_BINS, max_stored=0)  # additive sums only; no adaptive-ECE store
    # the state is additive: with several processes, sync() all-reduces the sums
    eval_loop(model, loader, cal, torch.device(device), amp_dtype=amp_dtype, channels_last=channels_last,
              sync=dist_info.distributed, progress=progress)
    if cal.n == 0:
        raise ValueError("evaluate() got an empty loader; check the data spec and max_val_examples")
    stats = cal.compute()
    return {"top1": 100.0 * stats["top1"], "nll": stats["nll"], "ece": stats["ece"], "brier": stats["brier"],
            "n": stats["n"]}
