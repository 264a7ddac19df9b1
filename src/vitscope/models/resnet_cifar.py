"""ResNets at CIFAR size, and ResNets with spatial smoothing, on timm's ``ResNet`` and its blocks.

CIFAR stem (He et al. 2016, sec. 4.2; HDVW's ``stem=False`` ResNets): one 3x3 stride-1 conv, BN, ReLU,
no max-pool, so the four stages see 32, 16, 8 and 4 pixel maps. The stem conv replaces timm's
7x7 stride-2 conv and the max-pool becomes ``nn.Identity``; ``feature_info`` reductions are divided
by 4 accordingly (stem 1, stages 1/2/4/8).

Spatial smoothing (Park & Kim 2022, "Blurs Behave Like Ensembles", companion of HDVW): a
``SpatialSmoothing`` block (``blur(relu(10 * tanh(x / 10)))``, 2x2 box blur, stride 1) after every
stage, i.e. before each downsampling (the next stage's strided conv, or the global average pool
after the last stage), as the official ``resnet_dnn_smoothing`` models place ``smooth1..smooth4``.
The smoothing modules are ``smooth1..smooth4``, siblings of ``layer1..layer4`` registered right after
them (forward order: ``layer1, smooth1, layer2, ...``), so every child of a ``layerN`` is still a residual
block and module traversal meets each smoothing where it runs.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from vitscope.layers.blur import SpatialSmoothing
from vitscope.models._cfg import cfg
from vitscope.models._registry import register

_STAGES = ("layer1", "layer2", "layer3", "layer4")


class VitscopeResNet(ResNet):
    """timm's ``ResNet`` with an optional CIFAR stem and optional spatial smoothing after each stage.

    Args:
        cifar_stem: Replace the 7x7/2 conv + max-pool stem by a 3x3/1 conv (no max-pool).
        smoothing: Add a ``SpatialSmoothing`` block after each of the four stages.
        smooth_temp: Tanh temperature of the smoothing blocks (paper: 10); ``None`` blurs only.
        smooth_relu: ReLU inside the smoothing blocks (paper: yes).
        output_stride: As in timm, counted for the ImageNet stem (the CIFAR stem's true output stride
            is a quarter of it); only 32 is supported with ``cifar_stem``.
        **kwargs: timm ``ResNet`` arguments (``block``, ``layers``, ``channels``, ``stem_width``, ...).
    """

    def __init__(
        self,
        *args: Any,
        cifar_stem: bool = False,
        smoothing: bool = False,
        smooth_temp: float | None = 10.0,
        smooth_relu: bool = True,
        **kwargs: Any,
    ):
        if cifar_stem and kwargs.get("output_stride", 32) != 32:
            raise ValueError("VitscopeResNet with cifar_stem=True supports only output_stride=32 (8 pixels)")
        if cifar_stem and kwargs.get("stem_type", ""):
            raise ValueError("cifar_stem=True replaces the stem; leave stem_type empty")
        super().__init__(*args, **kwargs)
        self.cifar_stem = cifar_stem
        self.smoothing = smoothing
        if cifar_stem:
            ref = self.bn1.weight  # keep timm's device/dtype (e.g. ``device="meta"``)
            self.conv1 = nn.Conv2d(self.in_chans, self.bn1.num_features, kernel_size=3, stride=1, padding=1,
                                   bias=False, device=ref.device, dtype=ref.dtype)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
            for info in self.feature_info:
                info["reduction"] //= 4  # stem 2 -> 1 (reported 1, not 0.5), stages 4..32 -> 1..8
            self.feature_info[0]["reduction"] = 1
        if smoothing:
            for i in range(1, len(_STAGES) + 1):
                self.add_module(f"smooth{i}", SpatialSmoothing(temp=smooth_temp, relu=smooth_relu))
                self.feature_info[i]["module"] = f"smooth{i}"  # a stage's feature is taken after its blur
            self._interleave_smoothing()

    def _interleave_smoothing(self) -> None:
        """Register ``smoothN`` right after ``layerN``, so that ``named_modules()`` lists modules in forward order
        (``vitscope.capture`` numbers blocks in that order). Smoothing has no parameters or buffers, so the
        state_dict keys and weight loading are unchanged."""
        children = dict(self._modules)
        order: dict[str, nn.Module | None] = {}
        for name, module in children.items():
            if name.startswith("smooth"):
                continue
            order[name] = module
            if name in _STAGES:
                smooth = f"smooth{_STAGES.index(name) + 1}"
                order[smooth] = children[smooth]
        self._modules.clear()
        self._modules.update(order)

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` (0-based) followed by its smoothing block when present."""
        layer = getattr(self, _STAGES[i])
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(layer, x)
        else:
            x = layer(x)
        if self.smoothing:
            x = getattr(self, f"smooth{i + 1}")(x)
        return x

    @torch.jit.ignore
    def _stages_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(_STAGES)):
            x = self._stage(i, x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))  # (B, C, H, W): H = img for the CIFAR stem
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._stages_checkpointed(x)
        # Written out (no loop over names, no getattr) so that TorchScript compiles it;
        # ``hasattr`` on a module attribute is resolved when scripting.
        x = self.layer1(x)
        if hasattr(self, "smooth1"):
            x = self.smooth1(x)
        x = self.layer2(x)
        if hasattr(self, "smooth2"):
            x = self.smooth2(x)
        x = self.layer3(x)
        if hasattr(self, "smooth3"):
            x = self.smooth3(x)
        x = self.layer4(x)
        if hasattr(self, "smooth4"):
            x = self.smooth4(x)
        return x  # (B, C, H/8, W/8) with the CIFAR stem, (B, C, H/32, W/32) with the ImageNet stem

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stem output (index 0) and the output of each stage after its smoothing (indices 1-4)."""
        if output_fmt != "NCHW":
            raise ValueError(f"VitscopeResNet intermediates are NCHW maps; got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(5, indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        last = max_index if stop_early else len(_STAGES)
        for i in range(last):
            x = self._stage(i, x)
            if i + 1 in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if self.smoothing:
            _, max_index = feature_take_indices(5, indices)
            for i in range(max_index + 1, len(_STAGES) + 1):
                setattr(self, f"smooth{i}", nn.Identity())
        return take_indices


def _rcfg(img_size: int = 32, **kwargs: Any) -> dict:
    # pool_size: the final map, img / 8 with the CIFAR stem (32 px), img / 32 with the ImageNet stem (224 px)
    pool = img_size // 8 if img_size <= 64 else img_size // 32
    return cfg(img_size, first_conv="conv1", classifier="fc", pool_size=(pool, pool), **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet18_cifar": _rcfg(),
    "resnet50_cifar": _rcfg(),
    "test_resnet_cifar": _rcfg(num_classes=10),
    "resnet18_smooth_cifar": _rcfg(),
    "resnet50_smooth": _rcfg(224),
    "test_resnet_smooth": _rcfg(num_classes=10),
})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> VitscopeResNet:
    return build_model_with_cfg(
        VitscopeResNet, variant, pretrained, feature_cfg=dict(feature_cls="getter"), **kwargs
    )


_R18 = dict(block=BasicBlock, layers=(2, 2, 2, 2))
_R50 = dict(block=Bottleneck, layers=(3, 4, 6, 3))
# Tiny: one block per stage, 16-32-32-64 channels (timm's single-conv stem is always 64 wide; layer1
# projects it down). zero_init_last=False so every weight gets a gradient at init.
_TINY = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 32, 64), zero_init_last=False)


@register
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> VitscopeResNet:
    """ResNet-18 with the CIFAR stem (3x3/1 conv, no max-pool), 32 px, 100 classes."""
    return _create("resnet18_cifar", pretrained, **{**_R18, "cifar_stem": True, "num_classes": 100, **kwargs})


@register
def resnet50_cifar(pretrained: bool = False, **kwargs: Any) -> VitscopeResNet:
    """ResNet-50 with the CIFAR stem (3x3/1 conv, no max-pool), 32 px, 100 classes."""
    return _create("resnet50_cifar", pretrained, **{**_R50, "cifar_stem": True, "num_classes": 100, **kwargs})


@register
def test_resnet_cifar(pretrained: bool = False, **kwargs: Any) -> VitscopeResNet:
    """A tiny CIFAR-stem ResNet for tests: BasicBlocks (1, 1, 1, 1), 16-32-32-64 channels, 10 classes."""
    return _create("test_resnet_cifar", pretrained, **{**_TINY, "cifar_stem": True, "num_classes": 10, **kwargs})


@register
def resnet18_smooth_cifar(pretrained: bool = False, **kwargs: Any) -> VitscopeResNet:
    """ResNet-18, CIFAR stem, with spatial smoothing (tanh-ReLU-2x2 blur) after each stage."""
    args = dict(_R18, cifar_stem=True, smoothing=True, num_classes=100)
    return _create("resnet18_smooth_cifar", pretrained, **dict(args, **kwargs))


@register
def resnet50_smooth(pretrained: bool = False, **kwargs: Any) -> VitscopeResNet:
    """ResNet-50 (ImageNet stem, 224 px) with spatial smoothing after each stage."""
    return _create("resnet50_smooth", pretrained, **{**_R50, "smoothing": True, **kwargs})


@register
def test_resnet_smooth(pretrained: bool = False, **kwargs: Any) -> VitscopeResNet:
    """The tiny CIFAR-stem ResNet with spatial smoothing after each stage, 10 classes."""
    args = dict(_TINY, cifar_stem=True, smoothing=True, num_classes=10)
    return _create("test_resnet_smooth", pretrained, **dict(args, **kwargs))
