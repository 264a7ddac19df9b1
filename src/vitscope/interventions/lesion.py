"""Lesion study (Park & Kim 2022, "How Do Vision Transformers Work?", HDVW): remove one residual block,
or one sub-layer (the attention or MLP branch of a transformer block), at a time from a trained model,
keep only its skip path, and measure how much accuracy drops and NLL rises.

HDVW's claims: in a ResNet the early blocks matter most; in multi-stage (Swin/AlterNet-like) models,
removing an MLP at the start of a stage or an MSA at the end of a stage hurts most.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from vitscope.interventions._blocks import (
    remove_block,
    remove_sublayer,
    residual_blocks,
    residual_sublayers,
    select,
)
from vitscope.interventions._eval import (
    CachedBatches,
    InterventionResult,
    evaluate,
    normalized_depth,
    unit_result,
)
from vitscope.measures.evaluation import eval_mode
from vitscope.runtime import model_device

_logger = logging.getLogger(__name__)

TARGETS = ("blocks", "sublayers")


def lesion(
    model: nn.Module,
    loader: Iterable,
    targets: str = "blocks",
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    units: Sequence[int | str] | None = None,
    progress: bool | None = None,
) -> InterventionResult:
    """Evaluate ``model`` with each unit removed in turn (HDVW lesion study).

    Args:
        model: A trained model with residual blocks that ``residual_blocks`` recognizes.
        loader: Yields (images, labels); iterated once per unit (see ``max_batches``).
        targets: ``blocks`` (whole residual blocks) or ``sublayers`` (attention and MLP branches of
            transformer blocks separately; a CNN block is one sub-layer).
        device: Where to run (the model is moved there); default: the model's device.
        max_batches: Use only the first batches, read once and reused for every unit.
        units: Indices or names (fnmatch patterns allowed) of the units to remove; default all.
        progress: Show a tqdm bar (default: only on a terminal).

    Returns:
        The intact evaluation and, per removed unit, accuracy, NLL, accuracy drop and NLL increase.
        The model runs in eval mode; every module's training flag and forward are restored afterwards.
    """
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    all_units = residual_blocks(model) if targets == "blocks" else residual_sublayers(model)
    chosen = select(all_units, units, targets[:-1].replace("sublayer", "sub-layer"), model)
    remove = remove_block if targets == "blocks" else remove_sublayer
    dev = model_device(model, device, move=True)
    batches = CachedBatches(loader, max_batches)
    with eval_mode(model):
        intact = evaluate(model, batches, dev)
        _logger.info("intact model: accuracy %.4f, NLL %.4f on %d examples", intact.accuracy, intact.nll,
                     intact.num_examples)
        result = InterventionResult(f"lesion-{targets}", intact)
        for unit in tqdm(chosen, desc=f"lesion ({targets})", disable=None if progress is None else not progress):
            with remove(model, unit):
                ev = evaluate(model, batches, dev)
            kind = unit.kind
            block = unit.index if targets == "blocks" else unit.block
            depth = normalized_depth(all_units.index(unit), len(all_units))
            result.units.append(unit_result(unit.name, kind, block, depth, ev, intact))
    return result
