"""Training: YAML recipes, the DeiT-style loop, checkpoints with exact resume, SAM, probes and DDP.

``train(config) -> dict`` runs a recipe; ``load_run(run_dir) -> (model, config)`` rebuilds a trained
model for analysis from its ``config.yaml`` and ``model.safetensors``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from vitscope.training import checkpoint
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
from vitscope.training.engine import (
    NonFiniteLossError,
    augment_options,
    build_criterion,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
    evaluate,
    train,
    train_one_epoch,
)
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

    Weights come from ``model.safetensors`` (or, with ``ema=True``, the EMA weights in ``state.pt``,
    read with ``weights_only=True``).
    """
    cfg = load_config(run_dir)
    model = build_model(cfg)
    weights = Path(run_dir) / checkpoint.MODEL_FILE
    if ema:
        state = checkpoint.load_state(run_dir)
        if state.get("ema") is None:
            raise ValueError(f"{run_dir} was trained without EMA (model_ema=false); load it with ema=False")
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items()})
    elif not weights.is_file():
        raise FileNotFoundError(f"{run_dir} has no {checkpoint.MODEL_FILE} yet (no epoch has finished)")
    else:
        checkpoint.load_model_weights(model, weights)
    return model.to(device).eval(), cfg
