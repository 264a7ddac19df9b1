"""ViT (Dosovitskiy et al. 2021) with Context Broadcasting (Hyeon-Woo et al. 2023), and the
CIFAR-size ViTs of HDVW (Park & Kim 2022), all built on timm's ``VisionTransformer``.

CB adds the token mean (uniform attention) at one place in each block; with the default placement
``mlp_end`` it sits after the MLP's second linear layer, before the residual add. Options, passed to
``create_model(name, cb_placement=..., cb_from_block=..., cb_include_prefix=...)``:

- ``cb_placement``: ``mlp_end`` (default), ``mlp_mid`` (after the MLP activation, 4x channels),
  ``mlp_front`` (before the first MLP linear), ``attn`` (end of the attention branch) or ``block``
  (on the residual stream after the block).
- ``cb_from_block``: first block that gets CB (0 = all blocks; the paper's "deeper layers only" is k > 0).
- ``cb_include_prefix``: whether the class token joins the mean (default True, the one-line form).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

from vitscope.layers.context_broadcast import ContextBroadcast
from vitscope.models._cfg import cfg
from vitscope.models._registry import register

CB_PLACEMENTS = ("mlp_end", "mlp_mid", "mlp_front", "attn", "block")


class CBMlp(Mlp):
    """timm's ``Mlp`` with an optional Context Broadcasting at its front, middle or end."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cb: nn.Module | None = None
        self.cb_placement = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ``self.cb is not None`` first: TorchScript then skips the branches of a block without CB
        if self.cb is not None and self.cb_placement == "mlp_front":
            x = self.cb(x)
        x = self.act(self.fc1(x))  # (B, N, hidden)
        if self.cb is not None and self.cb_placement == "mlp_mid":
            x = self.cb(x)
        x = self.fc2(self.norm(self.drop1(x)))  # (B, N, C)
        if self.cb is not None and self.cb_placement == "mlp_end":
            x = self.cb(x)
        return self.drop2(x)


class CBBlock(Block):
    """timm's pre-norm ``Block`` with Context Broadcasting at ``cb_placement`` ('' for none).

    Which blocks get CB (``cb_from_block``) is decided by ``CBBlockFactory``, which numbers the blocks
    it builds: timm before 1.0.24 does not pass the block index (``depth``) to ``block_fn``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        cb_placement: str = "mlp_end",
        cb_scaled: bool = False,
        cb_include_prefix: bool = True,
        cb_num_prefix_tokens: int = 1,
        mlp_ratio: float = 4.0,
        **kwargs: Any,
    ):
        kwargs.pop("mlp_layer", None)
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, mlp_layer=CBMlp, **kwargs)
        self.cb_placement = cb_placement
        self.cb: nn.Module | None = None
        if not cb_placement:
            return
        ref = next(self.parameters())  # the CBS scale joins the block's device and dtype (meta included)
        cb_dim = int(dim * mlp_ratio) if cb_placement == "mlp_mid" else dim
        cb = ContextBroadcast(cb_dim, scaled=cb_scaled, num_prefix_tokens=cb_num_prefix_tokens,
                              include_prefix=cb_include_prefix, device=ref.device, dtype=ref.dtype)
        if cb_placement.startswith("mlp"):
            self.mlp.cb, self.mlp.cb_placement = cb, cb_placement
        else:
            self.cb = cb

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        y = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)  # (B, N, C)
        if self.cb is not None and self.cb_placement == "attn":
            y = self.cb(y)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self.cb is not None and self.cb_placement == "block":
            x = self.cb(x)
        return x


class CBBlockFactory:
    """``block_fn`` for timm's ``VisionTransformer``: block ``i`` gets CB when ``i >= cb_from_block``.

    Blocks are counted as they are built (timm builds them in order); timm >= 1.0.24 also passes the
    index as ``depth``, which is then used (and forwarded to ``Block``).
    """

    def __init__(self, cb_placement: str = "mlp_end", cb_from_block: int = 0, **cb_kwargs: Any):
        self.cb_placement = cb_placement
        self.cb_from_block = cb_from_block
        self.cb_kwargs = cb_kwargs
        self._built = 0

    def __call__(self, **kwargs: Any) -> CBBlock:
        index = kwargs.get("depth", self._built)
        self._built += 1
        placement = self.cb_placement if index >= self.cb_from_block else ""
        return CBBlock(cb_placement=placement, **self.cb_kwargs, **kwargs)


def _create_vit(variant: str, pretrained: bool = False, cb: str = "", **kwargs: Any) -> VisionTransformer:
    """Build a timm VisionTransformer; ``cb`` is '' (plain), 'cb' or 'cbs'."""
    cb_args = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("cb_")}
    if cb:
        placement = cb_args.setdefault("cb_placement", "mlp_end")
        if placement not in CB_PLACEMENTS:
            raise ValueError(f"cb_placement={placement!r} is not one of {CB_PLACEMENTS}")
        num_prefix = int(kwargs.get("class_token", True)) + int(kwargs.get("reg_tokens", 0) or 0)
        kwargs["block_fn"] = CBBlockFactory(cb_scaled=(cb == "cbs"), cb_num_prefix_tokens=num_prefix, **cb_args)
    elif cb_args:
        raise ValueError(f"{variant} has no Context Broadcasting; drop {sorted(cb_args)} or use a *_cb_* model")
    out_indices = kwargs.pop("out_indices", min(3, kwargs.get("depth", 12)))  # the last 3 blocks (or all)
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs,
    )


_SIZES = {"tiny": dict(embed_dim=192, num_heads=3), "small": dict(embed_dim=384, num_heads=6),
          "base": dict(embed_dim=768, num_heads=12)}
_CIFAR = dict(img_size=32, qkv_bias=False, num_classes=100)  # HDVW's CIFAR ViT: no qkv bias

# fixed_input_size: learned position embeddings for one grid (timm's ViT configs say the same)
default_cfgs = generate_default_cfgs({
    **{f"vit_{s}_{c}_patch16_224": cfg(224, fixed_input_size=True) for s in _SIZES for c in ("cb", "cbs")},
    **{f"vit_{s}{c}_patch{p}_32": cfg(32, fixed_input_size=True)
       for s in ("tiny", "small") for c in ("", "_cb", "_cbs") for p in (2, 4)},
    **{f"test_vit_{c}": cfg(32, fixed_input_size=True) for c in ("cb", "cbs", "cifar")},
})


def _entry(variant: str, cb: str, model_args: dict) -> None:
    def fn(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return _create_vit(variant, pretrained, cb=cb, **dict(model_args, **kwargs))

    fn.__name__ = fn.__qualname__ = variant
    fn.__module__ = __name__
    fn.__doc__ = f"{variant}: ViT{' + ' + cb.upper() if cb else ''} with {model_args}."
    globals()[variant] = register(fn)


for _size, _args in _SIZES.items():
    for _cb in ("cb", "cbs"):
        _entry(f"vit_{_size}_{_cb}_patch16_224", _cb, dict(patch_size=16, depth=12, **_args))
for _size in ("tiny", "small"):
    for _cb in ("", "cb", "cbs"):
        for _patch in (2, 4):
            name = f"vit_{_size}{'_' + _cb if _cb else ''}_patch{_patch}_32"
            _entry(name, _cb, dict(patch_size=_patch, depth=12, **_SIZES[_size], **_CIFAR))
_TEST = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=10)
_entry("test_vit_cb", "cb", _TEST)
_entry("test_vit_cbs", "cbs", _TEST)
_entry("test_vit_cifar", "", dict(_TEST, qkv_bias=False))
