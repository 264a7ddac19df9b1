"""Where to tap each model family: its stem, blocks, their sub-layers and its attention modules.

Blocks whose residual structure vitscope knows are decomposed into sub-layers (``family``):
timm's VisionTransformer/DeiT ``Block`` (and vitscope's ``CBBlock``), ConViT's ``Block`` with GPSA/MHSA,
timm ResNet ``BasicBlock``/``Bottleneck``, any block following vitscope's contract (``vitscope_kind`` class
attribute, ``shortcut`` and ``drop_path`` submodules, forward ending in
``return self.shortcut(x) + self.drop_path(branch)``), which AlterNet's blocks do, and the spatial smoothing
layers (``SpatialSmoothing`` / ``Blur``, "Blurs Behave Like Ensembles") between ResNet stages, and the blocks of
the table in ``capture.table`` (Swin v1/v2, EVA/DINOv3, BEiT, CaiT, XCiT, Hiera, MViTv2, MaxViT/CoAtNet, PVTv2,
Twins, ConvNeXt, ResNetV2, EfficientNet/MobileNet).

Every other timm model is cut into blocks from timm's own ``feature_info`` (the stage modules timm's
``features_only`` uses) and the containers inside each stage (``generic`` family: one record per block, its
input and output, no sub-layer split).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn
from timm.models import convit, mobilevit, resnet, vision_transformer, xcit

from vitscope.capture.table import sublayers
from vitscope.layers.blur import Blur, SpatialSmoothing

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class BlockSite:
    """A block and what vitscope knows of it.

    Attributes:
        name: Module path (``blocks.3``, ``layer2.1``, ``layers.1.blocks.0``).
        module: The block.
        family: ``vit`` | ``convit`` | ``resnet`` | ``vitscope`` | ``smoothing`` | ``table`` (residual structure
            known: decomposed into sub-layers; ``table``: from ``capture.table.SUBLAYERS``) or ``generic``
            (recorded whole, no ``x + f(x)`` claimed).
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
    if sublayers(m) is not None:
        return "table"
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


# Blocks whose inner transformer runs on unfolded patches (MobileViT: the batch times the patch area): recorded
# whole (generic); the blocks inside are no sites, their tokens being no per-image representation (CKA compares
# the same examples across layers).
UNFOLDING: tuple[type, ...] = (mobilevit.MobileVitBlock,)


def _known_blocks(model: nn.Module) -> list[BlockSite]:
    sites: list[BlockSite] = []
    unfolding = [n for n, m in model.named_modules() if isinstance(m, UNFOLDING)]
    for name, m in model.named_modules():
        fam = known_family(m)
        if fam is not None and not _inside(name, [s.name for s in sites]) and not _inside(name, unfolding):
            sites.append(BlockSite(name, m, fam))
    return sites


def _stage_roots(model: nn.Module) -> list[str]:
    """Module paths of the stages in timm's ``feature_info`` that exist as modules, deduplicated, in order."""
    info = getattr(model, "feature_info", None)
    names = [f.get("module") for f in info] if isinstance(info, list) and all(isinstance(f, dict) for f in info) \
        else []
    mods = dict(model.named_modules())
    return [n for n in dict.fromkeys(names) if n and n in mods]


def stage_reductions(model: nn.Module, sites: list[BlockSite]) -> dict[int, int]:
    """Pixels per feature-map cell (timm's ``feature_info`` ``reduction``) of the stage holding each site, by the
    site's index, where ``feature_info`` names a module that is the site or holds it."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list):
        return {}
    stages = [(f["module"], int(f["reduction"])) for f in info if isinstance(f, dict) and f.get("module")
              and isinstance(f.get("reduction"), (int, float))]
    out = {}
    for i, s in enumerate(sites):
        owner = [r for m, r in stages if s.name == m or _inside(s.name, [m])]
        if owner:
            out[i] = owner[-1]
    return out


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


def _weight_layers(m: nn.Module) -> int:
    """How many weight layers (a parameter ``weight`` of 2+ dims: convolutions, linear maps) ``m`` holds."""
    return sum(1 for sub in m.modules() if isinstance(getattr(sub, "weight", None), nn.Parameter)
               and sub.weight.ndim >= 2)


def _is_unit(m: nn.Module) -> bool:
    """A block: at least two weight layers (a conv-norm-act layer, a patch merging or a norm is not one)."""
    return _weight_layers(m) >= 2


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def _expand(name: str, m: nn.Module, stage: bool = True) -> list[str]:
    """The blocks inside ``m``: a container's items (containers holding blocks expanded in place, layers with
    fewer than two weight layers skipped: transitions, norms); a stage module's ``blocks`` container (or its one
    container of blocks: NesT's ``transformer_encoder``), or, for a stage named by ``feature_info``, its numbered
    blocks (``b1``, ``b2`` of a RegNet stage, ``tree1`` of DLA); else ``m`` itself when it is a block."""
    if isinstance(m, _CONTAINERS):
        out: list[str] = []
        for k, c in m.named_children():
            child = _join(name, k)
            if isinstance(c, _CONTAINERS) and not any(_is_unit(g) for g in c.children()):
                out += [child] if _is_unit(c) else []
            else:
                out += _expand(child, c, stage=False)
        return out
    holders = [(k, c) for k, c in m.named_children() if isinstance(c, _CONTAINERS)
               and any(_is_unit(g) for g in c.children())]
    blocks = [(k, c) for k, c in holders if k == "blocks"] or (holders if stage and len(holders) == 1 else [])
    if blocks:
        return _expand(f"{name}.{blocks[0][0]}", blocks[0][1])
    units = [k for k, c in m.named_children() if _is_unit(c) and re.fullmatch(r"(b|tree)\d+", k)]
    if stage and len(units) >= 2:
        return [f"{name}.{k}" for k in units]
    return [name] if _is_unit(m) else []


def _stage_key(root: str, mods: dict[str, nn.Module]) -> str:
    """Where the blocks of a ``feature_info`` stage are: the container that holds it (a ViT's ``blocks`` for
    ``blocks.3``, a Swin's ``layers`` for ``layers.1``, DenseNet's ``features`` for ``features.denseblock2``;
    ``feature_info`` may list only some of its items, or a layer inside an item), else the stage itself."""
    parts = root.split(".")
    for n in range(1, len(parts) + 1):
        parent = ".".join(parts[: n - 1])
        if parent and isinstance(mods.get(parent), _CONTAINERS):
            return parent
    return root


def _generic_blocks(model: nn.Module) -> list[str]:
    """Block paths of any timm model, from its ``feature_info`` stages, in registration order.

    Each stage is expanded within the container holding it (``_stage_key``); the model's own children between
    the first and the last top-level stage are added (Inception's ``Mixed_*`` blocks, of which
    ``feature_info`` lists some); a sibling container whose name says blocks (CaiT's ``blocks_token_only``,
    XCiT's ``cls_attn_blocks``) follows its sibling. Stems are no blocks. Without ``feature_info`` stages, the
    ``blocks`` / ``stages`` / ``layers`` containers are expanded; when nothing is a block (VGG: single
    convolutions), the ``feature_info`` modules themselves are (their outputs: timm's stage features).
    """
    mods = dict(model.named_modules())
    roots = [r for r in _stage_roots(model) if not any(p.startswith("stem") for p in r.split("."))]
    names: list[str] = []
    keys = list(dict.fromkeys(_stage_key(r, mods) for r in roots))
    top = [k for k in keys if "." not in k]
    children = [k for k, _ in model.named_children()]
    if len(top) >= 2:
        first, last = children.index(top[0]), children.index(top[-1])
        keys += [k for k in children[first:last + 1] if k not in keys and "stem" not in k]
    for key in keys:
        names += _expand(key, mods[key])
        parent = key.rpartition(".")[0]
        siblings = mods[parent].named_children() if parent else model.named_children()
        for k, c in siblings:
            path = _join(parent, k)
            if path not in keys and path != key and "block" in k and isinstance(c, _CONTAINERS):
                names += _expand(path, c)
    if not names:
        found = [n for n, m in mods.items() if n.rpartition(".")[2] in ("blocks", "stages", "layers")
                 and isinstance(m, _CONTAINERS)]
        for n in found:
            if not _inside(n, found):
                names += _expand(n, mods[n])
    if not names:
        names = [r for r in _stage_roots(model) if _weight_layers(mods[r]) > 0 or r in roots]
    order = {n: i for i, n in enumerate(mods)}
    return sorted(dict.fromkeys(names), key=order.__getitem__)


def find_blocks(model: nn.Module) -> list[BlockSite]:
    """Blocks of ``model`` in forward order (registration order: tests check it against forward hooks).

    Known blocks anywhere in the model are found by type; a smoothing layer (``SpatialSmoothing``, or a
    ``Blur`` outside one) is a site of its own unless it sits inside a block. The blocks of every other timm
    model come from ``feature_info`` (``generic``); one that holds or lies in a known block is left out.
    """
    sites = _known_blocks(model)
    known = [s.name for s in sites]
    mods = dict(model.named_modules())
    for name in _generic_blocks(model):
        if name in known or _inside(name, known) or any(_inside(k, [name]) for k in known):
            continue
        sites.append(BlockSite(name, mods[name], "generic"))
    if len(sites) > len(known) > 0:
        order = {n: i for i, n in enumerate(mods)}
        sites.sort(key=lambda s: order[s.name])
    _assign_stages(sites, _stage_roots(model))
    return sites


def is_attention_module(m: nn.Module) -> bool:
    """Attention modules: those with an ``attn_drop`` (what timm's ``AttentionExtract`` hooks; it receives the
    post-softmax map in the explicit path)."""
    return isinstance(getattr(m, "attn_drop", None), nn.Module)


def attention_kind(m: nn.Module) -> str:
    """``gpsa`` (ConViT), ``channel`` (XCiT's cross-covariance attention: over channels, not positions),
    ``mixed`` (CaiT's talking heads: the map ``attn_drop`` sees is mixed across heads after the softmax), else
    ``msa`` (refined by the map's shape when captured)."""
    if isinstance(m, convit.GPSA):
        return "gpsa"
    if isinstance(m, xcit.XCA):
        return "channel"
    if isinstance(getattr(m, "proj_w", None), nn.Linear):  # CaiT's talking heads: heads mixed after the softmax
        return "mixed"
    return "msa"


def final_activation(block: nn.Module) -> nn.Module:
    """The activation applied after the residual add of a timm ResNet block."""
    return block.act3 if isinstance(block, resnet.Bottleneck) else block.act2
