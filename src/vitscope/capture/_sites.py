"""Where to tap each supported model family: residual blocks, their sub-layers, attention modules.

Supported: timm's VisionTransformer/DeiT ``Block`` (and vitscope's ``CBBlock``), ConViT's ``Block``
with GPSA/MHSA, timm ResNet ``BasicBlock``/``Bottleneck``, and any block following vitscope's
contract (``vitscope_kind`` class attribute, ``shortcut`` and ``drop_path`` submodules, forward ending
in ``return self.shortcut(x) + self.drop_path(branch)``), which AlterNet's blocks do; and the spatial
smoothing layers (``SpatialSmoothing`` / ``Blur``, "Blurs Behave Like Ensembles") between ResNet stages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from timm.models import convit, resnet, vision_transformer

from vitscope.layers.blur import Blur, SpatialSmoothing


@dataclass
class BlockSite:
    """A residual block and the hook points of its sub-layers."""

    name: str
    module: nn.Module
    family: str  # "vit" | "convit" | "resnet" | "vitscope" | "smoothing"


def _inside(name: str, sites: list[BlockSite]) -> bool:
    return any(name.startswith(s.name + ".") for s in sites)


def find_blocks(model: nn.Module) -> list[BlockSite]:
    """Residual blocks and spatial-smoothing layers of ``model`` in registration order.

    Registration order is forward order for every supported model (vitscope's smoothing ResNets register
    ``smoothN`` right after ``layerN``); tests check it against forward hooks. A smoothing layer
    (``SpatialSmoothing``, or a ``Blur`` outside one) is a site of its own unless it sits inside a block.
    """
    sites: list[BlockSite] = []
    for name, m in model.named_modules():
        if isinstance(m, (SpatialSmoothing, Blur)):
            if not _inside(name, sites):
                sites.append(BlockSite(name, m, "smoothing"))
        elif isinstance(m, vision_transformer.Block):
            sites.append(BlockSite(name, m, "vit"))
        elif isinstance(m, convit.Block):
            sites.append(BlockSite(name, m, "convit"))
        elif isinstance(m, (resnet.BasicBlock, resnet.Bottleneck)):
            sites.append(BlockSite(name, m, "resnet"))
        elif getattr(type(m), "vitscope_kind", None) in ("conv", "msa"):
            sites.append(BlockSite(name, m, "vitscope"))
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
