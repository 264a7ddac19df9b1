"""Building a run's pieces from a ``TrainConfig``: network, optimizer, schedule, mixup, criterion, augmentation
(timm's ``create_optimizer_v2``, ``create_scheduler_v2``, ``Mixup``, ``SoftTargetCrossEntropy`` /
``LabelSmoothingCrossEntropy``)."""
from __future__ import annotations

import difflib
import logging
from typing import Any

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from vitscope.training.config import TrainConfig

_logger = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, pretrained: bool | None = None) -> nn.Module:
    """``create_model(cfg.model, num_classes, drop_path_rate, drop_rate, img_size, **model_kwargs)``.

    ``pretrained`` (default ``cfg.pretrained``) starts from timm's hub weights (fine-tuning).
    """
    return create_network(cfg, cfg.pretrained if pretrained is None else pretrained)[0]


def create_network(cfg: TrainConfig, pretrained: bool = False) -> tuple[nn.Module, dict[str, Any]]:
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
