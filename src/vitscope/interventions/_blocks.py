"""Enumerate the residual blocks and residual sub-layers of a model, for interventions.

A residual sub-layer computes ``z_out = post(shortcut(z) + branch(z))``. Supported block families:

- ``vit``: timm's VisionTransformer/DeiT ``Block`` (and vitscope's ``CBBlock``): two sub-layers,
  ``x + drop_path1(ls1(attn(norm1(x))))`` (kind ``msa``) and ``x + drop_path2(ls2(mlp(norm2(x))))`` (``mlp``).
- ``convit``: timm's ConViT ``Block``: ``x + drop_path(attn(norm1(x)))`` (``gpsa`` or ``msa``) and
  ``x + drop_path(mlp(norm2(x)))`` (``mlp``).
- ``resnet``: timm's ``BasicBlock``/``Bottleneck``: one sub-layer ``act(branch(x) + shortcut(x))``
  with ``shortcut = downsample`` or the identity (kind ``conv``).
- ``vitscope``: any block with a class attribute ``vitscope_kind`` in {"conv", "msa"} and submodules
  ``shortcut`` and ``drop_path``, whose forward ends ``return self.shortcut(x) + self.drop_path(branch)``
  (vitscope's AlterNet blocks): one sub-layer of that kind.
- ``table``: the blocks of capture's table (``capture.table``: Swin v1/v2, EVA/DINOv3, BEiT, CaiT, XCiT, Hiera,
  MViTv2, MaxViT/CoAtNet, PVTv2, Twins, ConvNeXt, ResNetV2/BiT, EfficientNet/MobileNet): the sub-layers its entry
  lists, removed by zeroing their branch module (``interventions._table``).

Names follow ``vitscope.capture``'s LayerInfo: a transformer sub-layer is named by its branch module
(``blocks.3.attn``, ``blocks.3.mlp``), a CNN sub-layer by its block (``layer2.1``).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from vitscope.capture.sites import attention_kind, final_activation, known_family
from vitscope.capture.table import Sub, sublayers, submodule
from vitscope.interventions._table import zero_branches

SUPPORTED = (
    "timm VisionTransformer/DeiT Block (and vitscope CBBlock), timm ConViT Block, timm ResNet "
    "BasicBlock/Bottleneck, and blocks with a `vitscope_kind` class attribute in {'conv', 'msa'} plus "
    "`shortcut` and `drop_path` submodules (vitscope AlterNet), and the blocks of capture's table "
    "(vitscope/capture/table.py: Swin, EVA, BEiT, CaiT, XCiT, Hiera, MViTv2, MaxViT, PVTv2, Twins, ConvNeXt, "
    "ResNetV2, EfficientNet)"
)


@dataclass(frozen=True)
class SubLayer:
    """One residual sub-layer: the unit removed by a sub-layer lesion.

    Attributes:
        name: Module path (``blocks.3.attn`` for a transformer branch, ``layer2.1`` for a CNN block).
        kind: ``msa``, ``gpsa``, ``mlp`` or ``conv``.
        block: Index of the residual block it belongs to (depth order).
        index: Index among all sub-layers of the model (depth order).
        module: The branch module (``attn``/``mlp``) for transformer blocks, the drop path of a table block's
            sub-layer, else the block itself.
        block_module: The block holding it.
        family: The block family (``vit``, ``convit``, ``resnet``, ``vitscope`` or ``table``).
        spec: The table entry of a ``table`` sub-layer (``capture.table.Sub``), else None.
    """

    name: str
    kind: str
    block: int
    index: int
    module: nn.Module
    block_module: nn.Module
    family: str
    spec: Sub | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ResidualBlock:
    """One residual block in depth order, with its sub-layers."""

    name: str
    index: int
    family: str
    module: nn.Module
    sublayers: tuple[SubLayer, ...]

    @property
    def kind(self) -> str:
        """The block's sub-layer kinds joined by '+': ``msa+mlp``, ``gpsa+mlp``, ``conv`` or ``msa``."""
        return "+".join(s.kind for s in self.sublayers)


def block_family(module: nn.Module) -> str | None:
    """The family of a residual block (see module docstring), or None if ``module`` is not one these interventions
    handle; which modules are blocks of which family is capture's table (``capture.sites.known_family``)."""
    family = known_family(module)
    if family == "vitscope":
        for sub in ("shortcut", "drop_path"):
            if not isinstance(getattr(module, sub, None), nn.Module):
                raise ValueError(
                    f"{type(module).__name__} declares vitscope_kind={type(module).vitscope_kind!r} but has no "
                    f"`{sub}` submodule; vitscope blocks must end `return self.shortcut(x) + self.drop_path(branch)`"
                )
    return family if family in ("vit", "convit", "resnet", "vitscope", "table") else None


def residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    """The residual blocks of ``model`` in registration (= depth) order; blocks inside blocks are not listed.

    Raises:
        ValueError: if the model has no block of a supported family.
    """
    found: list[tuple[str, nn.Module, str]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        family = block_family(module)
        if family is None:
            continue
        found.append((name, module, family))
        inside.append(name)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no residual block that vitscope recognizes; supported: {SUPPORTED}"
        )
    blocks: list[ResidualBlock] = []
    n_sub = 0
    for b, (name, module, family) in enumerate(found):
        if family in ("vit", "convit"):
            parts = [("attn", attention_kind(module.attn)), ("mlp", "mlp")]
            subs = tuple(
                SubLayer(f"{name}.{attr}" if name else attr, kind, b, n_sub + k, getattr(module, attr), module, family)
                for k, (attr, kind) in enumerate(parts)
            )
        elif family == "table":
            subs = tuple(
                SubLayer(f"{name}.{t.name}" if t.name else name, t.kind, b, n_sub + k, submodule(module, t.branch),
                         module, family, t)
                for k, t in enumerate(sublayers(module))
            )
        else:
            kind = "conv" if family == "resnet" else type(module).vitscope_kind
            subs = (SubLayer(name, kind, b, n_sub, module, module, family),)
        n_sub += len(subs)
        blocks.append(ResidualBlock(name, b, family, module, subs))
    return blocks


def residual_sublayers(model: nn.Module) -> list[SubLayer]:
    """All residual sub-layers of ``model`` in depth order (two per transformer block, one per CNN block)."""
    return [s for blk in residual_blocks(model) for s in blk.sublayers]


def _pick(units: Sequence[Any], key: int | str, what: str, model: nn.Module) -> Any:
    names = [u.name for u in units]
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise ValueError(f"a {what} is chosen by index (int) or module name (str), got {key!r}")
    if isinstance(key, int):
        if not -len(units) <= key < len(units):
            raise ValueError(
                f"{what} index {key} is out of range: {type(model).__name__} has {len(units)} {what}s "
                f"(0..{len(units) - 1})"
            )
        return units[key]
    if key in names:
        return units[names.index(key)]
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise ValueError(f"no {what} named {key!r} in {type(model).__name__}; its {what}s are: {shown}")


def get_block(model: nn.Module, block: int | str | ResidualBlock) -> ResidualBlock:
    """The residual block chosen by index (negative counts from the end) or module name."""
    if isinstance(block, ResidualBlock):
        return block
    return _pick(residual_blocks(model), block, "block", model)


def get_sublayer(model: nn.Module, sublayer: int | str | SubLayer) -> SubLayer:
    """The residual sub-layer chosen by index among all sub-layers or by name (``blocks.3.attn``)."""
    if isinstance(sublayer, SubLayer):
        return sublayer
    return _pick(residual_sublayers(model), sublayer, "sub-layer", model)


def select(units: Sequence[Any], keys: Sequence[int | str] | None, what: str, model: nn.Module) -> list[Any]:
    """The units chosen by indices or fnmatch patterns on their names (all when ``keys`` is None)."""
    if keys is None:
        return list(units)
    if isinstance(keys, (int, str)):
        keys = [keys]
    chosen: list[Any] = []
    for key in keys:
        if isinstance(key, str) and any(c in key for c in "*?["):
            hits = [u for u in units if fnmatch.fnmatchcase(u.name, key)]
            if not hits:
                raise ValueError(f"no {what} of {type(model).__name__} matches {key!r}")
        else:
            hits = [_pick(units, key, what, model)]
        chosen += [u for u in hits if u not in chosen]
    return chosen


# ----------------------------------------------------------------------------------------------------
# Temporary patches, always undone in `finally`.


@contextmanager
def patched_forward(module: nn.Module, forward: Any) -> Iterator[None]:
    """Replace ``module.forward`` by ``forward`` (an instance attribute) and restore the original on exit.

    Hooks registered on ``module`` keep firing, now around the replacement.
    """
    had_own = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = old
        else:
            del module.forward


@contextmanager
def patched_child(module: nn.Module, name: str, value: nn.Module) -> Iterator[None]:
    """Set the attribute ``name`` of ``module`` to the module ``value``; restore it exactly on exit
    (including an attribute that was a plain ``None`` rather than a registered child)."""
    in_modules = name in module._modules
    in_dict = name in module.__dict__
    old = module._modules[name] if in_modules else module.__dict__.get(name)
    setattr(module, name, value)
    try:
        yield
    finally:
        module._modules.pop(name, None)
        if in_modules:
            module._modules[name] = old
        elif in_dict:
            object.__setattr__(module, name, old)


def _zeros_like_input(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.zeros_like(x)


def _shortcut_only(block: ResidualBlock) -> Any:
    """A forward for a ResNet block with its residual branch removed: ``act(downsample(x))``."""
    m = block.module
    act = final_activation(m)

    def forward(x: torch.Tensor) -> torch.Tensor:
        s = m.downsample(x) if m.downsample is not None else x.clone()  # clone: act may be in-place
        return act(s)

    return forward


@contextmanager
def remove_block(model: nn.Module, block: int | str | ResidualBlock) -> Iterator[ResidualBlock]:
    """Remove one residual block (HDVW lesion): keep only its skip path, restored on exit.

    Transformer blocks become the identity: both branch modules (attention, MLP) return zeros, so
    ``x + 0 + 0 = x`` exactly, and a block-level Context Broadcasting (``cb_placement="block"``) is
    bypassed too. The sub-modules still run, so ``vitscope.capture`` records zero branches consistently.
    A ResNet block becomes ``act(shortcut(x))``: for a downsampling block the projection shortcut
    (``downsample``) still applies, then the block's final activation, so shapes still match the next
    block. A vitscope (AlterNet) block keeps ``shortcut(x)`` (its ``drop_path`` output is zeroed). A block of
    capture's table keeps ``post(skip(x))`` per sub-layer: each branch (its drop path's output) is zeroed.
    """
    blk = get_block(model, block)
    with ExitStack() as stack:
        if blk.family in ("vit", "convit"):
            for sub in blk.sublayers:
                stack.enter_context(patched_forward(sub.module, _zeros_like_input))
            if getattr(blk.module, "cb_placement", "") == "block":
                stack.enter_context(patched_forward(blk.module.cb, lambda x: x))
        elif blk.family == "resnet":
            stack.enter_context(patched_forward(blk.module, _shortcut_only(blk)))
        elif blk.family == "table":
            stack.enter_context(zero_branches(blk.module, sublayers(blk.module), [s.spec for s in blk.sublayers]))
        else:
            stack.enter_context(patched_forward(blk.module.drop_path, _zeros_like_input))
        yield blk


@contextmanager
def remove_sublayer(model: nn.Module, sublayer: int | str | SubLayer) -> Iterator[SubLayer]:
    """Remove one residual sub-layer: keep only its skip path (``x + f(x)`` becomes ``x``), restored on exit.

    For a transformer block the attention or MLP module returns zeros, so the whole branch (LayerScale,
    Context Broadcasting, drop-path all map 0 to 0) vanishes and the residual add returns ``x`` exactly.
    A CNN block has a single sub-layer: removing it is ``remove_block``.
    """
    sub = get_sublayer(model, sublayer)
    if sub.family in ("vit", "convit"):
        with patched_forward(sub.module, _zeros_like_input):
            yield sub
    elif sub.family == "table":
        with zero_branches(sub.block_module, sublayers(sub.block_module), [sub.spec]):
            yield sub
    else:
        with remove_block(model, get_block(model, sub.block)):
            yield sub
