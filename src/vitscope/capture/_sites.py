"""Where to tap each model family: its stem, blocks, their sub-layers and its attention modules.

Blocks whose residual structure vitscope knows are decomposed into sub-layers (``family``):
timm's VisionTransformer/DeiT ``Block`` (and vitscope's ``CBBlock``), ConViT's ``Block`` with GPSA/MHSA,
timm ResNet ``BasicBlock``/``Bottleneck``, any block following vitscope's contract (``vitscope_kind`` class
attribute, ``shortcut`` and ``drop_path`` submodules, forward ending in
``return self.shortcut(x) + self.drop_path(branch)``), which AlterNet's blocks do, and the spatial smoothing
layers (``SpatialSmoothing`` / ``Blur``, "Blurs Behave Like Ensembles") between ResNet stages.

Every other timm model is cut into blocks from timm's own ``feature_info`` (the stage modules timm's
``features_only`` uses) and the containers inside each stage (``generic`` family: one record per block, its
input and output, no sub-layer split).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn
from timm.models import convit, resnet, vision_transformer

from vitscope.layers.blur import Blur, SpatialSmoothing

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class BlockSite:
    """A block and what vitscope knows of it.

    Attributes:
        name: Module path (``blocks.3``, ``layer2.1``, ``layers.1.blocks.0``).
        module: The block.
        family: ``vit`` | ``convit`` | ``resnet`` | ``vitscope`` | ``smoothing`` (residual structure known:
            decomposed into sub-layers) or ``generic`` (recorded whole).
        stage: Index of the stage (resolution level) it belongs to, 0 for a single-stage (isotropic) model.
    """

    name: str
    module: nn.Module
    family: str
    stage: int = 0


def known_family(m: nn.Module) -> str | None:
    """The family of a block whose residual structure vitscope knows, else None."""
    if isinstance(m, vision_transformer.Block):
        return "vit"
    if isinstance(m, convit.Block):
        return "convit"
    if isinstance(m, (resnet.BasicBlock, resnet.Bottleneck)):
        return "resnet"
    if getattr(type(m), "vitscope_kind", None) in ("conv", "msa"):
        return "vitscope"
    if isinstance(m, (SpatialSmoothing, Blur)):
        return "smoothing"
    return None


def _inside(name: str, names: list[str]) -> bool:
    return any(name.startswith(s + ".") for s in names)


def _known_blocks(model: nn.Module) -> list[BlockSite]:
    sites: list[BlockSite] = []
    for name, m in model.named_modules():
        fam = known_family(m)
        if fam is not None and not _inside(name, [s.name for s in sites]):
            sites.append(BlockSite(name, m, fam))
    return sites


def _stage_roots(model: nn.Module) -> list[str]:
    """Module paths of the stages in timm's ``feature_info`` that exist as modules, deduplicated, in order."""
    info = getattr(model, "feature_info", None)
    names = [f.get("module") for f in info] if isinstance(info, list) and all(isinstance(f, dict) for f in info) \
        else []
    mods = dict(model.named_modules())
    return [n for n in dict.fromkeys(names) if n and n in mods]


def _assign_stages(sites: list[BlockSite], roots: list[str]) -> None:
    """Stage index of each site: the rank of the ``feature_info`` stage holding it among the stages that hold
    blocks; a site outside every stage (a smoothing layer between stages) keeps the previous site's stage.
    An isotropic model (whose ``feature_info`` lists the blocks themselves) is one stage, 0."""
    names = {s.name for s in sites}
    roots = [r for r in roots if r not in names]
    holding = [r for r in roots if any(_inside(s.name, [r]) for s in sites)]
    stage = 0
    for s in sites:
        owner = next((i for i, r in enumerate(holding) if _inside(s.name, [r])), None)
        stage = owner if owner is not None else stage
        s.stage = stage


def find_blocks(model: nn.Module) -> list[BlockSite]:
    """Blocks of ``model`` in forward order (registration order: tests check it against forward hooks).

    Known blocks anywhere in the model are found by type; a smoothing layer (``SpatialSmoothing``, or a
    ``Blur`` outside one) is a site of its own unless it sits inside a block.
    """
    sites = _known_blocks(model)
    _assign_stages(sites, _stage_roots(model))
    return sites


def is_attention_module(m: nn.Module) -> bool:
    """Attention modules whose ``attn_drop`` receives the post-softmax map in the explicit path."""
    if not isinstance(getattr(m, "attn_drop", None), nn.Module) or not hasattr(m, "num_heads"):
        return False
    return isinstance(m, (vision_transformer.Attention, convit.GPSA, convit.MHSA)) or hasattr(m, "fused_attn")


def attention_kind(m: nn.Module) -> str:
    return "gpsa" if isinstance(m, convit.GPSA) else "msa"


def final_activation(block: nn.Module) -> nn.Module:
    """The activation applied after the residual add of a timm ResNet block."""
    return block.act3 if isinstance(block, resnet.Bottleneck) else block.act2
