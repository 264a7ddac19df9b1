"""Training: YAML recipes, the DeiT-style loop, checkpoints with exact resume, SAM, probes and DDP.

``train(config) -> dict`` runs a recipe; ``load_run(run_dir) -> (model, config)`` rebuilds a trained
model for analysis from its ``config.yaml`` and ``model.safetensors``::

    cfg = resolve_config("hdvw-cifar", ["epochs=100", "sam_rho=0.05"], model="vit_tiny_patch4_32",
                         data="cifar100:~/data/cifar", out="runs/vit")
    train(cfg)                        # or: vitscope train --config hdvw-cifar --model ... key=value
    train(cfg, resume=True)           # or: vitscope train --resume runs/vit
    model, cfg = load_run("runs/vit")

Recipes (``list_recipes()``): ``hdvw-cifar`` (Park & Kim 2022), ``deit`` (Touvron et al. 2021; ConViT's),
``cpu-quick`` (demo and tests). Settings: ``TrainConfig`` defaults < recipe < overrides. A run
directory holds ``config.yaml``, ``metrics.jsonl`` (one line per epoch: ``train_*``, ``val_top1`` in %,
``val_nll``, ``val_ece``, ``val_brier``, ``val_ema_*``, ``best_epoch``/``best_val_nll`` and, when
``early_stop_patience`` ended the run, ``stopped_early``), ``probes.jsonl`` (``probes: {every, measures,
num_images}``), the latest complete checkpoint (``checkpoints/epoch-N/``: ``model.safetensors``,
``state.pt``, ``checkpoint.json``) and ``model.safetensors`` (its weights). ``vitscope.io.runs.run_model_spec``
says what builds the trained network; ``--resume`` continues after a kill at any moment.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from vitscope.io.runs import load_run_model
from vitscope.training import checkpoint
from vitscope.training.builders import (
    augment_options,
    build_criterion,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
)
from vitscope.training.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    list_recipes,
    load_recipe,
    parse_overrides,
    read_yaml,
    resolve_config,
)
from vitscope.training.engine import train
from vitscope.training.loop import NonFiniteLossError, evaluate, train_one_epoch
from vitscope.training.probes import list_probes, register_probe
from vitscope.training.sam import SAM

__all__ = [
    "TrainConfig", "ConfigError", "resolve_config", "config_from_dict", "list_recipes", "load_recipe",
    "parse_overrides", "train", "train_one_epoch", "evaluate", "NonFiniteLossError", "SAM", "load_run",
    "build_model", "build_optimizer", "build_scheduler", "build_criterion", "build_mixup", "augment_options",
    "list_probes", "register_probe", "load_config",
]


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The resolved config a run wrote to ``RUN_DIR/config.yaml``."""
    path = Path(run_dir) / checkpoint.CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vitscope run directory (no {checkpoint.CONFIG_FILE})")
    return config_from_dict(read_yaml(path))


def load_run(run_dir: str | os.PathLike, ema: bool = False, device: str = "cpu") -> tuple[nn.Module, TrainConfig]:
    """``(model, config)`` of a finished or running training run, in eval mode.

    The network is rebuilt by ``vitscope.io.runs.load_run_model`` from the latest complete checkpoint
    (or, with ``ema=True``, its EMA weights in ``state.pt``, read with ``weights_only=True``).
    """
    cfg = load_config(run_dir)
    model, _ = load_run_model(run_dir, ema=ema, device=device)
    return model, cfg
