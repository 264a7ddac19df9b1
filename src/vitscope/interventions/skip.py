"""Skip-connection removal (Raghu et al. 2021, "Do Vision Transformers See Like Convolutional Neural
Networks?", RAGHU): drop the skip connection at one block, so ``x + f(x)`` becomes ``f(x)``; RAGHU find
that representations (CKA) and accuracy collapse, most when the skip is removed early in a ViT.

``remove_skip`` is the intervention (compose it with ``vitscope.capture`` for CKA); ``skip_removal_study``
reports the accuracy with the skip removed at each chosen block.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from timm.models import convit, resnet, vision_transformer
from tqdm.auto import tqdm

from vitscope.interventions._blocks import (
    ResidualBlock,
    get_block,
    patched_child,
    patched_forward,
    residual_blocks,
    select,
)
from vitscope.interventions._eval import (
    CachedBatches,
    InterventionResult,
    evaluate,
    normalized_depth,
    unit_result,
)
from vitscope.interventions._table import check_skips, drop_skips
from vitscope.measures.evaluation import eval_mode
from vitscope.runtime import model_device

_logger = logging.getLogger(__name__)


_SUPPORTED = (
    "it knows timm's vision_transformer.Block, convit.Block, resnet.BasicBlock/Bottleneck, vitscope's CBBlock and "
    "AlterNet blocks, and the blocks of capture's table (vitscope/capture/table.py); for another block, remove the "
    "whole block instead (vitscope.interventions.remove_block or lesion)"
)


def _vit_forwards() -> tuple[Any, ...]:
    forwards: list[Any] = [vision_transformer.Block.forward]
    try:
        from vitscope.models.vit_cb import CBBlock

        forwards.append(CBBlock.forward)
    except ImportError:  # pragma: no cover
        pass
    return tuple(forwards)


def _vit_no_skip(m: nn.Module) -> Any:
    """timm ``Block`` (and vitscope ``CBBlock``) without skips: ``x = attn_branch(x); x = mlp_branch(x)``."""
    if type(m).forward not in _vit_forwards():
        raise NotImplementedError(
            f"remove_skip does not know the forward of {type(m).__name__} (it overrides timm's Block.forward); "
            + _SUPPORTED
        )
    cb_placement = getattr(m, "cb_placement", "")
    if cb_placement not in ("", "mlp_end", "mlp_mid", "mlp_front", "attn", "block"):
        raise NotImplementedError(f"remove_skip: unknown Context Broadcasting placement {cb_placement!r}")

    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        y = m.attn(m.norm1(x), attn_mask=attn_mask, is_causal=is_causal)  # (B, N, C)
        if cb_placement == "attn":
            y = m.cb(y)
        x = m.drop_path1(m.ls1(y))
        x = m.drop_path2(m.ls2(m.mlp(m.norm2(x))))
        if cb_placement == "block":
            x = m.cb(x)
        return x

    return forward


def _convit_no_skip(m: nn.Module) -> Any:
    if type(m).forward is not convit.Block.forward:
        raise NotImplementedError(f"remove_skip does not know the forward of {type(m).__name__}; " + _SUPPORTED)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = m.drop_path(m.attn(m.norm1(x)))  # (B, N, C)
        return m.drop_path(m.mlp(m.norm2(x)))

    return forward


class _ZeroShortcut(nn.Module):
    """Stands in for a ResNet block's ``downsample``: a shortcut that contributes nothing."""

    def __init__(self, downsample: nn.Module | None):
        super().__init__()
        self.inner = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x if self.inner is None else self.inner(x))


@contextmanager
def remove_skip(model: nn.Module, block: int | str | ResidualBlock) -> Iterator[ResidualBlock]:
    """Drop the skip connection at one residual block (RAGHU), restored on exit (also after an exception).

    A transformer block computes ``x = attn_branch(x); x = mlp_branch(x)`` (both sub-layers lose their
    skip; a branch is everything the block adds to the stream: norm, attention/MLP, LayerScale, CB,
    drop-path). A block of capture's table drops each sub-layer's skip path (a projection's output is zeroed;
    an identity skip is cancelled, the branch adding ``branch - x``); one whose skip pools with no module is
    refused. A ResNet block computes ``act(branch(x))`` (its identity or projection shortcut is
    dropped); a vitscope (AlterNet) block returns its branch alone (its ``shortcut`` output is zeroed).

    Args:
        model: The model.
        block: Block index (negative counts from the end) or module name (``blocks.3``, ``layer2.1``).
    """
    blk = get_block(model, block)
    m = blk.module
    if blk.family == "vit":
        ctx = patched_forward(m, _vit_no_skip(m))
    elif blk.family == "convit":
        ctx = patched_forward(m, _convit_no_skip(m))
    elif blk.family == "table":
        ctx = drop_skips(m, [s.spec for s in blk.sublayers], blk.name)
    elif blk.family == "resnet":
        if type(m).forward not in (resnet.BasicBlock.forward, resnet.Bottleneck.forward):
            raise NotImplementedError(f"remove_skip does not know the forward of {type(m).__name__}; " + _SUPPORTED)
        ctx = patched_child(m, "downsample", _ZeroShortcut(m.downsample))
    else:
        shortcut = m.shortcut
        orig = shortcut.forward
        ctx = patched_forward(shortcut, lambda x, *a, **k: torch.zeros_like(orig(x, *a, **k)))
    with ctx:
        yield blk


def skip_removal_study(
    model: nn.Module,
    loader: Iterable,
    blocks: Sequence[int | str] | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool | None = None,
) -> InterventionResult:
    """Accuracy and NLL with the skip connection removed at each chosen block, one block at a time (RAGHU).

    Args:
        model: A trained model.
        loader: Yields (images, labels).
        blocks: Block indices or names (fnmatch patterns allowed); default every block.
        device: Where to run (the model is moved there); default: the model's device.
        max_batches: Use only the first batches, read once and reused for every block.
        progress: Show a tqdm bar (default: only on a terminal).
    """
    all_blocks = residual_blocks(model)
    chosen = select(all_blocks, blocks, "block", model)
    if blocks is None:  # every block: leave out, named, those whose skip path cannot be removed (capture's table)
        refused = []
        for blk in [b for b in chosen if b.family == "table"]:
            try:
                check_skips(blk.module, [s.spec for s in blk.sublayers], blk.name)
            except NotImplementedError:
                refused.append(blk)
        if refused:
            _logger.warning("skip removal leaves out %d block(s) whose skip path pools with no module: %s",
                            len(refused), ", ".join(b.name for b in refused))
        chosen = [b for b in chosen if b not in refused]
    dev = model_device(model, device, move=True)
    batches = CachedBatches(loader, max_batches)
    with eval_mode(model):
        intact = evaluate(model, batches, dev)
        result = InterventionResult("skip-removal", intact)
        for blk in tqdm(chosen, desc="skip removal", disable=None if progress is None else not progress):
            with remove_skip(model, blk):
                ev = evaluate(model, batches, dev)
            depth = normalized_depth(blk.index, len(all_blocks))
            result.units.append(unit_result(blk.name, blk.kind, blk.index, depth, ev, intact))
    return result
