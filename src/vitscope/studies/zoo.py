"""The model sizes the demo and the study recipes train, per scale.

``quick``: narrow, shallow variants of each family for a few CPU minutes at 32 px (ViT / ViT+CB / ConViT
with patch 4, i.e. an 8 x 8 token grid, 64-d, 4 blocks; a narrow ResNet-18-shaped CIFAR ResNet (2 blocks per
stage, so each stage has a conv block that keeps the map size besides its downsampling block); AlterNet).
``paper``: the papers' CIFAR-size models (HDVW's ViT-Ti with patch 2, ConViT-Ti, ResNet-50, AlterNet-50).
``test``: the registry's tiny ``test_*`` models, for the test suite.

Like for like (METHODS.md, "Judging a finding"): every comparison a study makes uses models of one patch size,
width and depth unless the paper's claim is about that difference.

- ``vit_p4``: the ViT a ConViT is compared with: ConViT's patch size (4) and width (DeiT-Ti vs ConViT-Ti,
  192-d, as in the ConViT paper). At quick scale it is the quick ViT itself (same run).
- ``vit_heads``: a ViT with enough heads for RAGHU's head-spread claim (quick: 8 heads of 8 dims instead of
  4; paper: ViT-S, 6 heads).
- ``vit_fine``: a ViT whose token maps have enough frequencies for HDVW's Fourier claims: 16 x 16 tokens (quick:
  patch 2 at 32 px, the token grid of HDVW's CIFAR ViT-Ti; paper: that ViT-Ti itself). At patch 4 and 32 px the
  map is 8 x 8 and has 4 frequencies (0, 0.25, 0.5, 0.75 pi).
- ``vit_gap``: the quick / paper ViT with global average pooling and no class token (RAGHU's GAP models, for
  the localization claim).
- ``resnet``: HDVW compares ViT and AlterNet-50 with ResNet-50 (paper zoo).
- ``vit_cbs``: the ViT+CB with CB's learned per-channel scale (CBS; ``vitscope.layers.ContextBroadcast``,
  ``scaled=True``), for CB's claim that the learned scale grows with depth.
- ``resnet_smooth``: the ResNet with spatial smoothing (a tanh-ReLU-2x2 blur after each stage; HDVW and "Blurs
  Behave Like Ensembles"), for HDVW's claim that spatial smoothing flattens the loss and helps.
- ``preact_resnet`` is AlterNet's own pre-activation ResNet backbone with no MSA block (``num_msa`` all 0):
  HDVW's like-for-like baseline for AlterNet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelSpec", "ZOOS", "model_spec", "FAMILY_LABELS"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model name plus the ``create_model`` kwargs that size it."""

    key: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return FAMILY_LABELS.get(self.key, self.key)


FAMILY_LABELS = {"vit": "ViT", "vit_cb": "ViT+CB", "convit": "ConViT", "resnet": "ResNet", "alternet": "AlterNet",
                 "preact_resnet": "pre-act ResNet", "vit_p4": "ViT (patch 4)", "vit_heads": "ViT (more heads)",
                 "vit_fine": "ViT (16 x 16 tokens)", "vit_gap": "ViT (GAP, no class token)",
                 "vit_cbs": "ViT+CBS", "resnet_smooth": "ResNet (spatial smoothing)"}

_QUICK_VIT = dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
_NO_MSA = dict(num_msa=[0, 0, 0, 0])
_GAP = dict(class_token=False, global_pool="avg")
_SMOOTH = dict(smoothing=True)
_QUICK_VIT_SPEC = ModelSpec("vit", "test_vit_cifar", _QUICK_VIT)  # also the quick "vit_p4": one run serves both

ZOOS: dict[str, dict[str, ModelSpec]] = {
    "quick": {
        "vit": _QUICK_VIT_SPEC,
        "vit_p4": _QUICK_VIT_SPEC,
        "vit_heads": ModelSpec("vit_heads", "test_vit_cifar", {**_QUICK_VIT, "num_heads": 8}),
        "vit_fine": ModelSpec("vit_fine", "test_vit_cifar", {**_QUICK_VIT, "patch_size": 2}),
        "vit_gap": ModelSpec("vit_gap", "test_vit_cifar", {**_QUICK_VIT, **_GAP}),
        "vit_cb": ModelSpec("vit_cb", "test_vit_cb", _QUICK_VIT),
        "vit_cbs": ModelSpec("vit_cbs", "test_vit_cbs", _QUICK_VIT),
        "convit": ModelSpec("convit", "test_convit_32", dict(patch_size=4, embed_dim=16, depth=4, num_heads=4,
                                                             local_up_to_layer=3, mlp_ratio=2.0)),
        "resnet": ModelSpec("resnet", "test_resnet_cifar", dict(layers=[2, 2, 2, 2])),
        "resnet_smooth": ModelSpec("resnet_smooth", "test_resnet_cifar", dict(layers=[2, 2, 2, 2], **_SMOOTH)),
        "alternet": ModelSpec("alternet", "test_alternet"),
        "preact_resnet": ModelSpec("preact_resnet", "test_alternet", _NO_MSA),
    },
    "paper": {
        "vit": ModelSpec("vit", "vit_tiny_patch2_32"),
        "vit_p4": ModelSpec("vit_p4", "vit_tiny_patch4_32"),
        "vit_heads": ModelSpec("vit_heads", "vit_small_patch2_32"),
        "vit_fine": ModelSpec("vit", "vit_tiny_patch2_32"),  # the paper zoo's "vit" (same run)
        "vit_gap": ModelSpec("vit_gap", "vit_tiny_patch2_32", _GAP),
        "vit_cb": ModelSpec("vit_cb", "vit_tiny_cb_patch2_32"),
        "vit_cbs": ModelSpec("vit_cbs", "vit_tiny_cbs_patch2_32"),
        "convit": ModelSpec("convit", "convit_tiny_32"),
        "resnet": ModelSpec("resnet", "resnet50_cifar"),
        "resnet_smooth": ModelSpec("resnet_smooth", "resnet50_cifar", _SMOOTH),
        "alternet": ModelSpec("alternet", "alternet50_cifar"),
        "preact_resnet": ModelSpec("preact_resnet", "alternet50_cifar", _NO_MSA),
    },
    "test": {  # depth 4 / a second block in stage 2: every sub-layer kind the study claims group by is present
        "vit": ModelSpec("vit", "test_vit_cifar", dict(depth=4)),
        "vit_p4": ModelSpec("vit", "test_vit_cifar", dict(depth=4)),
        "vit_heads": ModelSpec("vit", "test_vit_cifar", dict(depth=4)),
        "vit_fine": ModelSpec("vit_fine", "test_vit_cifar", dict(depth=4, patch_size=4)),  # 8 x 8: reaches 0.75 pi
        "vit_gap": ModelSpec("vit_gap", "test_vit_cifar", dict(depth=4, **_GAP)),
        "vit_cb": ModelSpec("vit_cb", "test_vit_cb"),
        "vit_cbs": ModelSpec("vit_cbs", "test_vit_cbs"),
        "convit": ModelSpec("convit", "test_convit_32", dict(depth=4, local_up_to_layer=3)),  # GPSA layers 0-2
        "resnet": ModelSpec("resnet", "test_resnet_cifar", dict(layers=[1, 2, 1, 1])),
        "resnet_smooth": ModelSpec("resnet_smooth", "test_resnet_cifar", dict(layers=[1, 2, 1, 1], **_SMOOTH)),
        "alternet": ModelSpec("alternet", "test_alternet"),
        "preact_resnet": ModelSpec("preact_resnet", "test_alternet", _NO_MSA),
    },
}


def model_spec(zoo: str, key: str) -> ModelSpec:
    """The spec of model ``key`` in ``zoo`` (vit, vit_p4, vit_heads, vit_fine, vit_gap, vit_cb, vit_cbs, convit,
    resnet, resnet_smooth, alternet, preact_resnet)."""
    if zoo not in ZOOS:
        raise ValueError(f"unknown model zoo {zoo!r}; valid: {', '.join(ZOOS)}")
    if key not in ZOOS[zoo]:
        raise ValueError(f"unknown model {key!r} in zoo {zoo!r}; valid: {', '.join(ZOOS[zoo])}")
    return ZOOS[zoo][key]
