"""capture's table of residual blocks (capture/table.py) against dense references on the real timm modules.

For each family a hand-written forward, built from the block's own public modules and timm's public partition
functions, computes every sub-layer's skip path and branch; capture's records must hold the same tensors. The
same modules run on the same inputs in the same order, so branches and streams agree exactly; a skip path that
capture derives (a projection: sum - branch) is checked to its round-off bound.
"""
import pytest
import timm
import torch
from timm.models import maxxvit, swin_transformer_v2
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

import vitscope
from vitscope.capture.sites import find_blocks

U = torch.finfo(torch.float32).eps / 2  # unit round-off of float32


def _swinv2(b, x):  # x (B, H, W, C)
    B, H, W, C = x.shape
    sh, ws = b.shift_size, b.window_size
    y = torch.roll(x, (-sh[0], -sh[1]), (1, 2)) if any(sh) else x
    win = swin_transformer_v2.window_partition(y, ws).view(-1, ws[0] * ws[1], C)  # (nW*B, ws*ws, C)
    y = swin_transformer_v2.window_reverse(b.attn(win, mask=b.attn_mask).view(-1, ws[0], ws[1], C), ws, (H, W))
    y = torch.roll(y, sh, (1, 2)) if any(sh) else y
    b1 = b.norm1(y)  # res-post-norm: x + norm(attn(x))
    mid = (x + b1).reshape(B, H * W, C)
    b2 = b.norm2(b.mlp(mid))

    def nchw(t):  # capture gives Swin's maps, and its tokens between sub-layers, channels-first
        return t.reshape(B, H, W, C).permute(0, 3, 1, 2)

    return [tuple(map(nchw, r)) for r in ((x, b1, x + b1), (mid, b2, mid + b2))]


def _partition(p, x):  # MaxViT block or grid attention, channels-last (B, H, W, C)
    part, rev = (maxxvit.window_partition, maxxvit.window_reverse) if p.partition_block else \
        (maxxvit.grid_partition, maxxvit.grid_reverse)
    b1 = p.ls1(rev(p.attn(part(p.norm1(x), p.partition_size)), p.partition_size, x.shape[1:3]))
    mid = x + b1
    b2 = p.ls2(p.mlp(p.norm2(mid)))
    return [tuple(t.permute(0, 3, 1, 2) for t in r) for r in ((x, b1, mid), (mid, b2, mid + b2))]  # NCHW


def _maxvit(b, x):  # x (B, C, H, W): MBConv, then block and grid attention channels-last
    c = b.conv
    y = c.conv3_1x1(c.se(c.norm2(c.conv2_kxk(c.norm1(c.conv1_1x1(c.down(c.pre_norm(x))))))))
    s = c.shortcut(x)
    out = [(s, y, s + y)]
    z = (s + y).permute(0, 2, 3, 1)
    for p in (b.attn_block, b.attn_grid):
        out += _partition(p, z)
        z = out[-1][2].permute(0, 2, 3, 1)
    return out


def _xcit(b, x, H, W):  # x (B, N, C)
    b1 = b.gamma1 * b.attn(b.norm1(x))
    x1 = x + b1
    b3 = b.gamma3 * b.local_mp(b.norm3(x1), H, W)
    x3 = x1 + b3
    b2 = b.gamma2 * b.mlp(b.norm2(x3))
    return [(x, b1, x1), (x1, b3, x3), (x3, b2, x3 + b2)]


def _hiera(b, x):  # x (B, N, C) in Hiera's unrolled token order
    xn = b.norm1(x)
    s = x
    if b.do_expand:
        p = b.proj(xn)
        s = p.view(p.shape[0], b.attn.q_stride, -1, p.shape[-1]).amax(dim=1)  # max-pool over the query stride
    b1 = b.ls1(b.attn(xn))
    b2 = b.ls2(b.mlp(b.norm2(s + b1)))
    return [(s, b1, s + b1), (s + b1, b2, s + b1 + b2)]


def _mvit(b, x, feat_size):  # x (B, N, C), no class token
    xn = b.norm1(x)
    s = x if b.shortcut_proj_attn is None else b.shortcut_proj_attn(xn)
    if b.shortcut_pool_attn is not None:
        B, L, C = s.shape
        s = s.reshape(B, *feat_size, C).permute(0, 3, 1, 2)
        s = b.shortcut_pool_attn(s).reshape(B, C, -1).transpose(1, 2)  # (B, N', C)
    b1, _ = b.attn(xn, feat_size)
    mid = s + b1
    xn2 = b.norm2(mid)
    s2 = mid if b.shortcut_proj_mlp is None else b.shortcut_proj_mlp(xn2)
    b2 = b.mlp(xn2)
    return [(s, b1, mid), (s2, b2, s2 + b2)]


def _mvit_model():
    return MultiScaleVit(MultiScaleVitCfg(depths=(1, 2, 1, 1), embed_dim=16, num_heads=1), img_size=(64, 64),
                         num_classes=10)


CASES = {  # name: (model builder, image side, reference, number of sub-layers per block)
    "swinv2": (lambda: timm.create_model("swinv2_tiny_window8_256", embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                                         window_size=4, img_size=32), 32, _swinv2),
    "maxvit": (lambda: timm.create_model("test_maxvit", img_size=64), 64, _maxvit),
    "xcit": (lambda: timm.create_model("xcit_nano_12_p8_224", embed_dim=32, depth=2, num_heads=2, img_size=32), 32,
             _xcit),
    "hiera": (lambda: timm.create_model("hiera_tiny_224", embed_dim=16, num_heads=1, stages=(1, 2, 1, 1),
                                        img_size=64), 64, _hiera),
    "mvitv2": (_mvit_model, 64, _mvit),
}


@pytest.mark.parametrize("case", list(CASES))
def test_table_sublayers_equal_a_dense_reference(case):
    build, side, reference = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    blocks = [s for s in find_blocks(model) if s.family == "table"]
    assert len(blocks) >= 2
    inputs = {}
    handles = [s.module.register_forward_pre_hook(lambda m, a, n=s.name: inputs.__setitem__(n, a))
               for s in blocks]
    with torch.no_grad(), vitscope.capture(model, attention=False) as cap:
        model(torch.randn(2, 3, side, side))
    for h in handles:
        h.remove()
    by_block = {}
    for r in cap.residual_records:
        by_block.setdefault(r.info.block, []).append(r)
    index = {s.name: i for i, s in enumerate(find_blocks(model))}
    checked = 0
    for site in blocks:
        args = inputs[site.name]
        with torch.no_grad():
            ref = reference(site.module, *args)
        recs = by_block[index[site.name]]
        assert len(recs) == len(ref)
        for r, (skip, branch, total) in zip(recs, ref):
            torch.testing.assert_close(r.branch, branch, rtol=0, atol=0)  # same modules, same inputs, same order
            torch.testing.assert_close(r.z_out, total, rtol=0, atol=0)
            # the skip path: z_in itself where it is the identity (exact), else sum - branch: the sum's rounding
            # (u |s + b|) plus the subtraction's (u |sum - b|), <= 2u (|s| + |b|) + O(u^2); 3u covers the O(u^2).
            # The same bound holds for (skip path + branch) against the output the block computed.
            bound = 3 * U * (skip.abs() + branch.abs())
            assert ((r.shortcut - skip).abs() <= bound).all()
            assert ((r.shortcut + r.branch - r.z_out).abs() <= bound).all()  # input + branch reconstructs the output
            checked += 1
    assert checked == len(cap.residual_records) >= 4
