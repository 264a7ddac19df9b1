"""The table of residual blocks: per timm block type, its sub-layers ``z_out = post(skip + branch)``, each named
by the modules that carry it, read from timm's source (timm 1.0.31). A new family is an entry here, not a code
path: capture records from it, lesion zeroes its branch module, skip removal its skip path (``interventions``).

Every entry says where a sub-layer's stream is read (a *tap*: a module's input or output), which module's output
is exactly the branch added to the stream (the drop path; it is the identity in eval), which module's output is
the skip path (None: the identity) and which module, if any, is applied to the sum (ResNet's post-add activation,
Swin v2 CR's main-branch norm). What each family's blocks are, from timm's forwards:

- pre-norm transformers (ViT-like): ``x + dp1(ls1(attn(norm1(x)))); x + dp2(ls2(mlp(norm2(x))))`` (layer scale,
  gamma or none inside the branch): EVA/DINOv3 ``EvaBlock``, BEiT, CaiT ``LayerScaleBlock`` (one drop path module
  called twice), ``RelPosBlock``, PVTv2, Swin v1, Twins, MaxViT/CoAtNet ``PartitionAttention*``.
- post-norm (res-post-norm) transformers: ``x + dp1(norm1(attn(x))); x + dp2(norm2(mlp(x)))``: Swin v2
  (and Swin v2 CR, whose optional ``norm3`` acts on the sum), EVA ``EvaBlockPostNorm``, ``ResPostRelPosBlock``.
  The branch holds the norm; the skip path is the identity, so the split is a true ``x + f(x)``.
- XCiT ``XCABlock``: three sub-layers, channel attention (kind ``channel``), local patch interaction (``conv``)
  and the MLP, each ``x + dp(gamma * f(norm(x)))``.
- Hiera and MViTv2 blocks: the attention sub-layer's skip path is a projection of ``norm1(x)`` (pooled) where the
  stage changes width or resolution, else the identity (Hiera without ``proj`` pools ``x`` by max and mean:
  split, but its skip path is no module, so skip removal is refused there).
- MaxViT ``MaxxVitBlock``: MBConv, block attention, grid attention (each a table block of its own: 5 sub-layers);
  CoAtNet's ``MbConvBlock``/``ConvNeXtBlock``/``TransformerBlock2d`` (skip path: ``shortcut``, a pool + 1x1 conv
  where the block downsamples).
- conv blocks ``post(skip(x) + dp(f(x)))``: ConvNeXt, ResNetV2/BiT (``PreAct*``: skip = ``downsample`` of the
  pre-activated input; ``Bottleneck``: ``act3`` after the add), EfficientNet/MobileNet blocks when ``has_skip``.

Not in the table (recorded whole, no ``x + f(x)`` claimed): XCiT and CaiT class-attention blocks (the stream is
the class token, or the patch tokens are normed into the sum), MaxViT's parallel block, DaViT, FocalNet,
MetaFormer, DenseNet, VGG, Inception and every other family.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn
from timm.models import (
    _efficientnet_blocks,
    beit,
    cait,
    convnext,
    eva,
    hiera,
    maxxvit,
    mvitv2,
    pvt_v2,
    resnetv2,
    swin_transformer,
    swin_transformer_v2,
    swin_transformer_v2_cr,
    twins,
    vision_transformer_relpos,
    xcit,
)

Tap = tuple[str, str]  # (module path inside the block, "" = the block; "in" = its first input, "out" = its output)


def IN(path: str = "") -> Tap:
    return (path, "in")


def OUT(path: str = "") -> Tap:
    return (path, "out")


@dataclass(frozen=True)
class Sub:
    """One residual sub-layer of a block type: ``z_out = post(skip + branch)``.

    Attributes:
        name: Record name relative to the block (``attn``, ``mlp``, ``attn_block.attn``; ``""``: the block).
        kind: ``msa`` | ``mlp`` | ``conv`` (``downsample`` when the map shrinks) | ``channel`` (XCiT).
        z_in: Tap of the stream entering.
        z_out: Tap of the stream leaving (after ``post``).
        branch: Module whose output is exactly the branch added (the drop path); a module called by several
            sub-layers (CaiT's one ``drop_path``) is told apart by call order.
        skip: Module whose output is the skip path; None, or absent in the block: the identity if
            ``skip_identity(block)`` (default) else a skip path that is no module.
        post: Module applied to the sum, whose input is the sum (None: none).
        skip_identity: Whether the skip path is the identity where ``skip`` is absent (None: always).
    """

    name: str
    kind: str
    z_in: Tap
    z_out: Tap
    branch: str
    skip: str | None = None
    post: str | None = None
    skip_identity: Callable[[nn.Module], bool] | None = None

    def skip_module(self, block: nn.Module) -> nn.Module | None:
        """The module carrying the skip path in ``block``, or None."""
        m = submodule(block, self.skip) if self.skip else None
        return m if isinstance(m, nn.Module) else None

    def identity_skip(self, block: nn.Module) -> bool:
        """Whether the skip path is the identity in ``block`` (an ``nn.Identity`` module counts)."""
        m = self.skip_module(block)
        if m is not None:
            return isinstance(m, nn.Identity)
        return self.skip_identity is None or self.skip_identity(block)


def submodule(block: nn.Module, path: str) -> nn.Module | None:
    """``block``'s submodule at ``path`` (``""``: the block), or None where an attribute on the way is None."""
    m: nn.Module | None = block
    for part in path.split(".") if path else []:
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def _prenorm(skip: str | None = None) -> tuple[Sub, ...]:
    return (Sub("attn", "msa", IN(), IN("norm2"), "drop_path1", skip),
            Sub("mlp", "mlp", IN("norm2"), OUT(), "drop_path2"))


def _postnorm(post: str | None = None) -> tuple[Sub, ...]:
    return (Sub("attn", "msa", IN(), IN("mlp"), "drop_path1"),
            Sub("mlp", "mlp", IN("mlp"), OUT(), "drop_path2", post=post))


def _conv(skip: str | None = None, post: str | None = None) -> tuple[Sub, ...]:
    return (Sub("", "conv", IN(), OUT(), "drop_path", skip, post),)


_CAIT = (Sub("attn", "msa", IN(), IN("norm2"), "drop_path"), Sub("mlp", "mlp", IN("norm2"), OUT(), "drop_path"))
_XCIT = (Sub("attn", "channel", IN(), IN("norm3"), "drop_path1"), Sub("local_mp", "conv", IN("norm3"), IN("norm2"),
         "drop_path3"), Sub("mlp", "mlp", IN("norm2"), OUT(), "drop_path2"))
_HIERA = (Sub("attn", "msa", IN(), IN("norm2"), "drop_path1", "proj", skip_identity=lambda b: not b.do_expand),
          Sub("mlp", "mlp", IN("norm2"), OUT(), "drop_path2"))
_MVIT = (Sub("attn", "msa", IN(), IN("norm2"), "drop_path1", "shortcut_proj_attn",
             skip_identity=lambda b: b.shortcut_pool_attn is None),
         Sub("mlp", "mlp", IN("norm2"), OUT(), "drop_path2", "shortcut_proj_mlp"))

# block type -> its sub-layers
SUBLAYERS: dict[type, tuple[Sub, ...]] = {
    eva.EvaBlock: _prenorm(),
    beit.Block: _prenorm(),
    cait.LayerScaleBlock: _CAIT,
    vision_transformer_relpos.RelPosBlock: _prenorm(),
    pvt_v2.Block: _prenorm(),
    swin_transformer.SwinTransformerBlock: _prenorm(),
    twins.Block: _prenorm(),
    maxxvit.PartitionAttentionCl: _prenorm(),
    maxxvit.PartitionAttention2d: _prenorm(),
    maxxvit.TransformerBlock2d: _prenorm("shortcut"),
    swin_transformer_v2.SwinTransformerV2Block: _postnorm(),
    swin_transformer_v2_cr.SwinTransformerV2CrBlock: _postnorm("norm3"),
    eva.EvaBlockPostNorm: _postnorm(),
    vision_transformer_relpos.ResPostRelPosBlock: _postnorm(),
    xcit.XCABlock: _XCIT,
    hiera.HieraBlock: _HIERA,
    mvitv2.MultiScaleBlock: _MVIT,
    convnext.ConvNeXtBlock: _conv("shortcut"),
    maxxvit.ConvNeXtBlock: _conv("shortcut"),
    maxxvit.MbConvBlock: _conv("shortcut"),
    resnetv2.PreActBasic: _conv("downsample"),
    resnetv2.PreActBottleneck: _conv("downsample"),
    resnetv2.Bottleneck: _conv("downsample", "act3"),
    _efficientnet_blocks.InvertedResidual: _conv(),
    _efficientnet_blocks.DepthwiseSeparableConv: _conv(),
    _efficientnet_blocks.EdgeResidual: _conv(),
}
# blocks whose only mixing of tokens is their attention over the whole sequence (MLPs act per token; no window,
# pooled keys, depthwise convolution or talking heads): attention rollout applies across them (Abnar & Zuidema)
ROLLOUT_BLOCKS: tuple[type, ...] = (eva.EvaBlock, eva.EvaBlockPostNorm, beit.Block,
                                   vision_transformer_relpos.RelPosBlock, vision_transformer_relpos.ResPostRelPosBlock)
# block type -> children that are table blocks, in forward order (their sub-layers, prefixed, are the block's)
COMPOSITE: dict[type, tuple[str, ...]] = {
    maxxvit.MaxxVitBlock: ("conv", "attn_block", "attn_grid"),
}


def _prefixed(sub: Sub, prefix: str) -> Sub:
    def join(p: str) -> str:
        return f"{prefix}.{p}" if p else prefix

    def tap(t: Tap) -> Tap:
        return (join(t[0]), t[1])

    ident = sub.skip_identity
    return Sub(join(sub.name), sub.kind, tap(sub.z_in), tap(sub.z_out), join(sub.branch),
               join(sub.skip) if sub.skip else None, join(sub.post) if sub.post else None,
               (lambda b: ident(submodule(b, prefix))) if ident else None)


def sublayers(block: nn.Module) -> tuple[Sub, ...] | None:
    """The sub-layers of ``block`` from the table, with paths relative to it; None when it is not a table block
    (or an EfficientNet-style block without its skip)."""
    if type(block) in COMPOSITE:
        subs: list[Sub] = []
        for child in COMPOSITE[type(block)]:
            m = submodule(block, child)
            inner = sublayers(m) if m is not None else None
            if m is not None and inner is None:
                return None
            subs += [_prefixed(s, child) for s in inner or ()]
        return tuple(subs)
    subs = SUBLAYERS.get(type(block))
    if subs is None or not getattr(block, "has_skip", True):
        return None
    return subs
