"""AlterNet (Park & Kim 2022, "How Do Vision Transformers Work?", ICLR; HDVW).

A pre-activation ResNet whose stages end by alternating conv blocks with MSA blocks. In a stage of
``n`` blocks with ``m`` MSA blocks the layout is ``[conv] * (n - 2m) + [conv, msa] * m``. AlterNet-50:
blocks (3, 4, 6, 4), MSA blocks (0, 1, 3, 2), heads (3, 6, 12, 24), head dim 64, window 7.

- Conv block: timm's pre-activation bottleneck (BN-ReLU-1x1, BN-ReLU-3x3 (stride), BN-ReLU-1x1, x4
  expansion); a projection shortcut (1x1 conv, no norm) sees the pre-activated input.
- MSA block: BN-ReLU, 1x1 conv to ``in/4`` channels, BN, local window attention (learned 2-D relative
  position bias) projecting back to the block width, drop-path, skip.
- Stem: 7x7/2 conv + 3x3/2 max-pool (224 px) or a 3x3/1 conv (CIFAR), both without norm (pre-act);
  head: BN-ReLU, global average pool, linear.

Where the official code (github.com/xxxnell/how-do-vits-work, ``models/alternet.py``) differs from the
paper's description: its MSA block defaults to GELU after the first BN (``msa_act_layer="gelu"``
reproduces it; the default here is the described ReLU), its conv blocks ignore the drop-path rate
(here every block gets the linear drop-path schedule; the default rate is 0 so both agree), and it
shares one relative-position bias table across heads (so does vitscope, ``rel_pos_per_head=False``).
At 32 px the stage maps are 32/16/8/4, so the CIFAR model uses 4x4 windows (HDVW's CIFAR Swin uses 4).

Input sizes (by design): window attention needs stage maps made of whole windows. alternet50 (window 7
on maps of 1/8, 1/16 and 1/32 of the input) runs only at multiples of 224 px; the CIFAR models (window
4 on maps of 1/2, 1/4 and 1/8) only at multiples of 32 px. Their timm configs say
``fixed_input_size=True``, as timm's Swin configs do, and ``img_size`` is checked at construction.

Every residual block follows vitscope's capture contract: class attribute ``vitscope_kind``
(``"conv"``/``"msa"``), submodules ``shortcut`` and ``drop_path``, and a forward ending in
``return self.shortcut(x) + self.drop_path(branch)``.
"""
# no ``from __future__ import annotations``: FX code generation (then TorchScript) reads the real
# annotations of AlterNet.forward; deferred (string) ones become an unknown type name there.
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, ClassifierHead, DropPath, create_conv2d, get_act_layer
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models.resnetv2 import DownsampleConv
from timm.models.resnetv2 import PreActBottleneck as _TimmPreActBottleneck

from vitscope.layers.window_attention import WindowAttention2d
from vitscope.models._cfg import cfg
from vitscope.models._registry import register


class PreActBottleneck(_TimmPreActBottleneck):
    """timm's pre-activation bottleneck with BatchNorm-ReLU, plain convs and vitscope's block contract."""

    vitscope_kind = "conv"

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, act_layer: type[nn.Module] = nn.ReLU,
                 drop_path_rate: float = 0.0):
        needs_proj = stride != 1 or in_chs != out_chs
        super().__init__(
            in_chs, out_chs, bottle_ratio=0.25, stride=stride, act_layer=act_layer, conv_layer=create_conv2d,
            norm_layer=partial(BatchNormAct2d, act_layer=act_layer),
            proj_layer=DownsampleConv if needs_proj else None, drop_path_rate=drop_path_rate,
        )
        downsample = self.downsample
        del self.downsample  # renamed: vitscope's contract calls the skip path ``shortcut``
        self.shortcut = downsample if downsample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)  # BN-ReLU
        branch = self.conv1(x_preact)
        branch = self.conv2(self.norm2(branch))
        branch = self.conv3(self.norm3(branch))
        if not isinstance(self.shortcut, nn.Identity):
            x = x_preact  # a projection shortcut sees the pre-activated input
        return self.shortcut(x) + self.drop_path(branch)


class MSABlock(nn.Module):
    """HDVW's pre-activation MSA block: BN-act, 1x1 conv (in/4), BN, window MSA, drop-path, skip."""

    vitscope_kind = "msa"

    def __init__(self, in_chs: int, out_chs: int, num_heads: int, head_dim: int = 64, window_size: int = 7,
                 act_layer: type[nn.Module] = nn.ReLU, drop_path_rate: float = 0.0, attn_drop: float = 0.0,
                 rel_pos_per_head: bool = False):
        super().__init__()
        width = in_chs // 4
        self.norm1 = BatchNormAct2d(in_chs, act_layer=act_layer)
        self.shortcut = (nn.Conv2d(in_chs, out_chs, kernel_size=1, bias=False) if in_chs != out_chs
                         else nn.Identity())
        self.conv = nn.Conv2d(in_chs, width, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.attn = WindowAttention2d(width, out_chs, num_heads=num_heads, head_dim=head_dim,
                                      window_size=window_size, attn_drop=attn_drop,
                                      rel_pos_per_head=rel_pos_per_head)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        branch = self.attn(self.norm2(self.conv(x_preact)))  # (B, out_chs, H, W)
        if not isinstance(self.shortcut, nn.Identity):
            x = x_preact
        return self.shortcut(x) + self.drop_path(branch)


def stage_layout(depth: int, num_msa: int) -> list[str]:
    """HDVW's block kinds in one stage: ``[conv] * (n - 2m) + [conv, msa] * m``."""
    if not 0 <= 2 * num_msa <= depth:
        raise ValueError(f"a stage of {depth} blocks holds at most {depth // 2} MSA blocks, got {num_msa}")
    return ["conv"] * (depth - 2 * num_msa) + ["conv", "msa"] * num_msa


def _check_windows_fit(img_size: int | tuple[int, int], cifar_stem: bool, num_msa: tuple[int, ...],
                       window_size: int) -> None:
    """Raise unless every stage with MSA blocks sees a map of whole ``window_size`` windows at ``img_size``."""
    size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    maps = size if cifar_stem else tuple(-(-s // 4) for s in size)  # 7x7/2 conv + 3x3/2 pool (padded)
    for i, m in enumerate(num_msa):
        if i > 0:
            maps = tuple(-(-s // 2) for s in maps)  # the stage's first conv has stride 2 (padded)
        if m and any(s % window_size for s in maps):
            raise ValueError(
                f"AlterNet: at img_size={size[0]}x{size[1]} stage {i} maps are {maps[0]}x{maps[1]}, not a whole "
                f"number of {window_size}x{window_size} attention windows; use an input size whose stage "
                "maps are multiples of the window (alternet50: multiples of 224) or pass window_size="
            )


class AlterNet(nn.Module):
    """AlterNet: pre-activation bottleneck ResNet with window-MSA blocks at the end of stages.

    Args:
        layers: Blocks per stage.
        num_msa: MSA blocks per stage (each replaces the second of a conv pair at the stage's end).
        num_heads: Attention heads per stage.
        channels: Output channels per stage (4x the bottleneck width).
        stem_width: Stem output channels.
        cifar_stem: 3x3/1 conv stem (32 px inputs) instead of 7x7/2 conv + 3x3/2 max-pool.
        window_size: Attention window side.
        head_dim: Channels per attention head.
        num_classes: Classifier outputs (0 for none).
        in_chans: Input image channels.
        global_pool: Pooling type of the head (timm's names).
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth rate of the last block (linear in depth from 0).
        attn_drop_rate: Dropout on attention probabilities.
        act_layer: Activation of the conv blocks' pre-activations and of the final BN before the head.
        msa_act_layer: Activation after the MSA block's first BN (default: ``act_layer``; HDVW's code
            uses GELU there).
        rel_pos_per_head: One relative-position table per head instead of one shared table.
        img_size: Input size the model is built for (timm's ``fixed_input_size`` argument); if given,
            every stage with MSA blocks must see a map that is a whole number of windows, else
            ``ValueError``. Other inputs whose maps are whole windows also run.
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 6, 4),
        num_msa: tuple[int, ...] = (0, 1, 3, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        channels: tuple[int, ...] = (256, 512, 1024, 2048),
        stem_width: int = 64,
        cifar_stem: bool = False,
        window_size: int = 7,
        head_dim: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        act_layer: str | type[nn.Module] = "relu",
        msa_act_layer: str | type[nn.Module] | None = None,
        rel_pos_per_head: bool = False,
        img_size: int | tuple[int, int] | None = None,
    ):
        super().__init__()
        if not len(layers) == len(num_msa) == len(num_heads) == len(channels):
            raise ValueError("AlterNet: layers, num_msa, num_heads and channels need one entry per stage")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        act = get_act_layer(act_layer)
        msa_act = get_act_layer(msa_act_layer) if msa_act_layer is not None else act

        if cifar_stem:
            self.stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False)))
            reduction = 1
        else:
            self.stem = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_chans, stem_width, 7, 2, 3, bias=False),
                pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            ))
            reduction = 4
        self.feature_info = [dict(num_chs=stem_width, reduction=reduction, module="stem")]

        total = sum(layers)
        dpr = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]  # linear, as HDVW's ``sd``
        stages, in_chs, k = [], stem_width, 0
        for i, (depth, m, heads, out_chs) in enumerate(zip(layers, num_msa, num_heads, channels)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j, kind in enumerate(stage_layout(depth, m)):
                if kind == "conv":
                    blocks.append(PreActBottleneck(in_chs, out_chs, stride=stride if j == 0 else 1,
                                                   act_layer=act, drop_path_rate=dpr[k]))
                else:
                    blocks.append(MSABlock(in_chs, out_chs, heads, head_dim=head_dim, window_size=window_size,
                                           act_layer=msa_act, drop_path_rate=dpr[k], attn_drop=attn_drop_rate,
                                           rel_pos_per_head=rel_pos_per_head))
                in_chs, k = out_chs, k + 1
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        if img_size is not None:
            _check_windows_fit(img_size, cifar_stem, num_msa, window_size)
        self.img_size = img_size

        self.num_features = self.head_hidden_size = in_chs
        self.norm = BatchNormAct2d(in_chs, act_layer=act)  # pre-act nets end with BN-ReLU before the pool
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        ref = self.stem.conv.weight  # the new head joins the model's device and dtype (meta included)
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        self.head.to(device=ref.device, dtype=ref.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return self.norm(x)  # (B, C, H/32, W/32) at 224 px, (B, C, H/8, W/8) with the CIFAR stem

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stem output (index 0) and each stage's output (1..4); ``norm`` applies the final BN-ReLU to the last."""
        if output_fmt != "NCHW":
            raise ValueError(f"AlterNet intermediates are NCHW maps; got output_fmt={output_fmt!r}")
        num_stages = len(self.stages)
        take_indices, max_index = feature_take_indices(num_stages + 1, indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == num_stages else x)
        if intermediates_only:
            return intermediates
        if feat_idx == num_stages:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self.stages = self.stages[:max_index]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# fixed_input_size: the window attention needs stage maps that are whole numbers of windows, so
# alternet50 (window 7, maps 1/8, 1/16, 1/32 of the input) takes multiples of 224 px only and the CIFAR
# models (window 4, maps 1/2, 1/4, 1/8) multiples of 32 px; timm says so for Swin the same way.
_ACFG = dict(first_conv="stem.conv", classifier="head.fc", fixed_input_size=True)
default_cfgs = generate_default_cfgs({
    "alternet50": cfg(224, pool_size=(7, 7), **_ACFG),
    "alternet50_cifar": cfg(32, pool_size=(4, 4), **_ACFG),
    "test_alternet": cfg(32, pool_size=(4, 4), num_classes=10, **_ACFG),
})


def _create(variant: str, pretrained: bool, device: Any = None, dtype: torch.dtype | None = None,
            **kwargs: Any) -> AlterNet:
    # timm's create_model passes device/dtype to the model; build under the device, then cast.
    with torch.device(device) if device is not None else nullcontext():
        model = build_model_with_cfg(AlterNet, variant, pretrained, feature_cfg=dict(feature_cls="getter"),
                                     **kwargs)
    return model.to(dtype=dtype) if dtype is not None else model


_ALTERNET50 = dict(layers=(3, 4, 6, 4), num_msa=(0, 1, 3, 2), num_heads=(3, 6, 12, 24),
                   channels=(256, 512, 1024, 2048), head_dim=64)


@register
def alternet50(pretrained: bool = False, **kwargs: Any) -> AlterNet:
    """AlterNet-50 (HDVW): blocks (3, 4, 6, 4), MSA (0, 1, 3, 2), heads (3, 6, 12, 24), window 7, 224 px.

    Fixed input size: the 7x7 windows fit the stage maps only at multiples of 224 px.
    """
    return _create("alternet50", pretrained, **{**_ALTERNET50, "window_size": 7, **kwargs})


@register
def alternet50_cifar(pretrained: bool = False, **kwargs: Any) -> AlterNet:
    """AlterNet-50 for 32-px CIFAR: 3x3/1 stem (stage maps 32/16/8/4), window 4, 100 classes.

    Fixed input size: the 4x4 windows fit the stage maps only at multiples of 32 px.
    """
    args = dict(_ALTERNET50, cifar_stem=True, window_size=4, num_classes=100)
    return _create("alternet50_cifar", pretrained, **dict(args, **kwargs))


@register
def test_alternet(pretrained: bool = False, **kwargs: Any) -> AlterNet:
    """A tiny AlterNet for tests: blocks (1, 1, 2, 2), MSA (0, 0, 1, 1), head dim 8, window 4, 32 px."""
    args = dict(layers=(1, 1, 2, 2), num_msa=(0, 0, 1, 1), num_heads=(1, 1, 2, 4), channels=(32, 64, 96, 128),
                stem_width=16, head_dim=8, cifar_stem=True, window_size=4, num_classes=10)
    return _create("test_alternet", pretrained, **dict(args, **kwargs))
