"""Early stopping on the validation loss (``EarlyStop``) and the best epoch's weights (``best.safetensors``)."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

from vitscope.distributed import barrier
from vitscope.io.runs import BEST_FILE
from vitscope.training import checkpoint as ckpt
from vitscope.training.builders import base_lr
from vitscope.training.config import TrainConfig

if TYPE_CHECKING:
    from vitscope.training.engine import TrainingRun

_logger = logging.getLogger(__name__)


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




def save_best(run: TrainingRun, epoch: int) -> None:
    """Rank 0 writes the current weights as ``best.safetensors`` (atomically; metadata: the epoch)."""
    if not run.dist.is_main:
        return
    from safetensors.torch import save_file

    from vitscope.io.atomic import atomic_write

    model = ckpt.unwrap_model(run.model)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(run.run_dir / BEST_FILE, lambda tmp: save_file(tensors, tmp, metadata={"epoch": str(epoch)}))


def restore_best(run: TrainingRun, es: EarlyStop) -> bool:
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
