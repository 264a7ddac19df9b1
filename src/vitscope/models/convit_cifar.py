"""ConViT (d'Ascoli et al. 2021) at CIFAR size: timm's ``ConVit`` at img_size 32, patch 4 (8x8 tokens).

timm's ``embed_dim`` is per head (48): Ti has 4 heads (192-d), S 9 heads (432-d). The first 10 of 12
blocks are GPSA with convolutional (local) init; the class token joins before the first MHSA block.
"""
from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.convit import ConVit

from vitscope.models._cfg import cfg
from vitscope.models._registry import register

default_cfgs = generate_default_cfgs({
    # fixed_input_size: learned position embeddings for one grid, as timm's ConViT configs say
    n: cfg(32, fixed_input_size=True) for n in ("convit_tiny_32", "convit_small_32", "test_convit_32")
})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> ConVit:
    return build_model_with_cfg(
        ConVit, variant, pretrained,
        feature_cfg=dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter"), **kwargs,
    )


_CIFAR = dict(img_size=32, patch_size=4, num_classes=100, local_up_to_layer=10, locality_strength=1.0)


@register
def convit_tiny_32(pretrained: bool = False, **kwargs: Any) -> ConVit:
    """ConViT-Ti at 32 px, patch 4: 4 heads x 48 = 192-d, 10 GPSA + 2 MHSA blocks."""
    return _create("convit_tiny_32", pretrained, **dict(_CIFAR, embed_dim=48, num_heads=4, **kwargs))


@register
def convit_small_32(pretrained: bool = False, **kwargs: Any) -> ConVit:
    """ConViT-S at 32 px, patch 4: 9 heads x 48 = 432-d, 10 GPSA + 2 MHSA blocks."""
    return _create("convit_small_32", pretrained, **dict(_CIFAR, embed_dim=48, num_heads=9, **kwargs))


@register
def test_convit_32(pretrained: bool = False, **kwargs: Any) -> ConVit:
    """A tiny ConViT for tests: 4 heads x 8 = 32-d, 2 GPSA + 1 MHSA block."""
    args = dict(_CIFAR, num_classes=10, embed_dim=8, num_heads=4, depth=3, local_up_to_layer=2, mlp_ratio=2.0)
    return _create("test_convit_32", pretrained, **dict(args, **kwargs))
