"""Lesion and skip removal on blocks of capture's table (Swin, ConvNeXt, EVA, ResNetV2), against hand-written forwards.

Each block's forward is written out from its public modules (and timm's public window functions) with a branch
zeroed or the skip paths dropped, patched in, and the model's output compared with the intervention's.
"""
import pytest
import timm
import torch
from timm.models import swin_transformer

from vitscope.interventions import remove_block, remove_skip, remove_sublayer, residual_blocks, skip_removal_study
from vitscope.interventions._blocks import patched_forward

U64 = torch.finfo(torch.float64).eps / 2


def _swin(b, lesion, no_skip):
    def window_attn(x):  # x (B, H, W, C), a map the window tiles
        B, H, W, C = x.shape
        ws, sh = b.window_size, b.shift_size
        y = torch.roll(x, (-sh[0], -sh[1]), (1, 2)) if any(sh) else x
        win = swin_transformer.window_partition(y, ws).view(-1, ws[0] * ws[1], C)  # (nW*B, ws*ws, C)
        y = swin_transformer.window_reverse(b.attn(win, mask=b.attn_mask).view(-1, *ws, C), ws, H, W)
        return torch.roll(y, sh, (1, 2)) if any(sh) else y

    def forward(x):
        B, H, W, C = x.shape
        a = 0 if "attn" in lesion else window_attn(b.norm1(x))
        x = a if no_skip else x + a
        t = x.reshape(B, -1, C)
        m = 0 if "mlp" in lesion else b.mlp(b.norm2(t))
        return (m if no_skip else t + m).reshape(B, H, W, C)

    return forward


def _eva(b, lesion, no_skip):
    def forward(x, rope=None, attn_mask=None, is_causal=False):
        a = 0 if "attn" in lesion else b.attn(b.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        a = a * b.gamma_1 if b.gamma_1 is not None else a
        x = a if no_skip else x + a
        m = 0 if "mlp" in lesion else b.mlp(b.norm2(x))
        m = m * b.gamma_2 if b.gamma_2 is not None else m
        return m if no_skip else x + m

    return forward


def _convnext(b, lesion, no_skip):
    def forward(x):
        y = b.conv_dw(x)
        y = b.mlp(b.norm(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)  # (B, C, H, W); this config: no conv MLP
        y = y.mul(b.gamma.reshape(1, -1, 1, 1)) if b.gamma is not None else y
        y = 0 if lesion else y
        return y if no_skip else y + b.shortcut(x)

    assert not b.use_conv_mlp
    return forward


def _preact(b, lesion, no_skip):
    def forward(x):
        xp = b.norm1(x)
        s = x if b.downsample is None else b.downsample(xp)
        y = 0 if lesion else b.conv2(b.norm2(b.conv1(xp)))
        return y if no_skip else y + s

    return forward


CASES = {  # name: (model, image side, hand-written forward, which block)
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2),
                                       num_heads=(1, 2), window_size=4, img_size=32), 32, _swin, 1),
    "eva": (lambda: timm.create_model("eva02_tiny_patch14_224", embed_dim=32, depth=2, num_heads=2, img_size=28),
            28, _eva, 1),
    "convnext": (lambda: timm.create_model("test_convnext"), 32, _convnext, 3),
    "resnetv2": (lambda: timm.create_model("resnetv2_18"), 32, _preact, 2),
}


def _setup(case):
    build, side, hand, which = CASES[case]
    torch.manual_seed(0)
    model = build().double().eval()
    for p in model.parameters():  # random-init zeros (layer scale, post-norm) would hide a wrong branch
        if p.ndim == 1 and bool((p == 0).all()):
            p.data.normal_(0, 0.5)
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    blk = residual_blocks(model)[which]
    return model, x, blk, hand


@pytest.mark.parametrize("case", list(CASES))
def test_lesion_of_a_table_branch_equals_the_block_with_that_branch_zeroed(case):
    model, x, blk, hand = _setup(case)
    assert blk.family == "table"
    with torch.no_grad():
        intact = model(x)
        with patched_forward(blk.module, hand(blk.module, set(), False)):  # the hand-written forward is the block's
            torch.testing.assert_close(model(x), intact, rtol=0, atol=0)
        for sub in blk.sublayers:
            lesion = {sub.name.rpartition(".")[2]} if sub.name != blk.name else {"conv"}
            with patched_forward(blk.module, hand(blk.module, lesion, False)):
                want = model(x)
            with remove_sublayer(model, sub.name):
                got = model(x)
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # x + 0 is x: the same operations run
        with patched_forward(blk.module, hand(blk.module, {"attn", "mlp", "conv"}, False)):
            want = model(x)
        with remove_block(model, blk.name):
            got = model(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.equal(got, intact)  # the lesion changed something
        torch.testing.assert_close(model(x), intact, rtol=0, atol=0)  # and was undone


@pytest.mark.parametrize("case", list(CASES))
def test_skip_removal_on_a_table_block_equals_the_block_without_skips(case):
    model, x, blk, hand = _setup(case)
    with torch.no_grad():
        intact = model(x)
        with patched_forward(blk.module, hand(blk.module, set(), True)):
            want = model(x)
        with remove_skip(model, blk.name):
            got = model(x)
        # An identity skip is cancelled as x + (branch - x): each element of the sum is branch to within
        # 2u (|x| + |branch|) (two roundings, float64 u = 1.1e-16); these tiny random networks change their
        # output by less than 1e3 times a perturbation of one block's stream (ratio of norms of order one,
        # two to four later blocks), so 1e3 * 2u * max|.| bounds the difference; a projection skip is zeroed
        # exactly.
        scale = float(max(intact.abs().max(), want.abs().max()))
        torch.testing.assert_close(got, want, rtol=0, atol=1e3 * 2 * U64 * scale)
        assert (got - intact).abs().max() > 1e-3 * scale  # the skip was really removed, and restored after
        torch.testing.assert_close(model(x), intact, rtol=0, atol=0)


def test_skip_removal_study_leaves_out_pooled_skips_by_name():
    """Hiera's stage-transition blocks without a projection pool their skip path with no module: the study leaves
    them out (by name in the log) and ``remove_skip`` on one refuses."""
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", embed_dim=16, num_heads=1, stages=(1, 2, 1, 1), img_size=64,
                              use_expand_proj=False).eval()
    blocks = residual_blocks(model)
    pooled = [b for b in blocks if b.module.do_expand]
    assert pooled and blocks[0].family == "table"
    with pytest.raises(NotImplementedError, match="pools its input"):
        with remove_skip(model, pooled[0].name):
            pass
    data = [(torch.randn(4, 3, 64, 64), torch.zeros(4, dtype=torch.long))]
    res = skip_removal_study(model, data, progress=False)
    assert [u.name for u in res.units] == [b.name for b in blocks if b not in pooled]
