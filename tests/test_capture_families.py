"""vitscope.capture on timm's model families, against timm's own extraction.

A cheap, representative parametrization over timm's registry (timm's tiny ``test_*`` models and tiny variants
of the families with attention geometry to get right), at small inputs; the sweep over the smallest model of
every timm module (``docs/sweep_timm_families.py``, ~15 min) is recorded in ``docs/models.md``.
"""
import pytest
import timm
import torch
from timm.models.swin_transformer import window_partition
from timm.utils import AttentionExtract

import vitscope
from vitscope.capture.sites import find_blocks

# (name, kwargs, image side): the test models of timm's registry plus tiny transformers of other families
FAMILIES = [
    ("test_convnext", {}, 64),
    ("test_efficientnet", {}, 64),
    ("test_byobnet", {}, 64),
    ("test_nfnet", {}, 64),
    ("test_mambaout", {}, 64),
    ("test_coatnet", {}, 160),
    ("test_maxvit", {}, 160),
    ("test_vit_relpos", {"img_size": 64}, 64),
    ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
                                          img_size=32), 32),
    ("eva02_tiny_patch14_224", dict(embed_dim=32, depth=2, num_heads=2, img_size=28), 28),
    ("cait_xxs24_224", dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8), 32),
    ("xcit_nano_12_p8_224", dict(embed_dim=32, depth=2, num_heads=2, img_size=32), 32),
    ("pvt_v2_b0", dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), 64),
    ("resnetv2_18", {}, 64),
]


@pytest.mark.parametrize("name,kwargs,side", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_capture_blocks_in_forward_order_and_attention_equals_timm(name, kwargs, side):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, side, side)
    sites = find_blocks(model)
    fired = []
    handles = [s.module.register_forward_hook(lambda m, i, o, n=s.name: fired.append(n)) for s in sites]
    with torch.no_grad():
        with vitscope.explicit_attention(model):  # as capture runs attention (fused attention rounds otherwise)
            ref = model(x)
        fired.clear()
        with vitscope.capture(model, layers="blocks") as cap:
            out = model(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # hooks only observe
    names = [r.info.name for r in cap.records]
    assert len(sites) >= 2 and names[0] == "stem" and names[1:] == list(dict.fromkeys(fired))  # forward order
    for r in cap.records:  # tokens (B, N, D) or channels-first maps (B, C, h, w) whose grid the info gives
        if r.z_out.ndim == 4:
            assert tuple(r.z_out.shape[-2:]) == r.info.grid
    with torch.no_grad(), vitscope.explicit_attention(model):
        try:
            timm_maps = AttentionExtract(model, method="hook")(x)  # hooks on *attn_drop
        except RuntimeError:  # "No module names found": a model without attention
            timm_maps = {}
    mine = {f"{i.name}.attn_drop": a for i, a in zip(cap.attention_layout, cap.attentions)}
    assert mine.keys() == timm_maps.keys()
    for k, v in timm_maps.items():
        torch.testing.assert_close(mine[k], v, rtol=0, atol=0)


def test_attention_kinds_say_where_positions_are_unknown():
    """Channel (XCiT), talking-heads (CaiT) and pooled-key (PVT, class attention) maps are named as such, and
    the probe's attention measures skip by name those whose keys capture cannot place (not PVT's: its spatially
    reduced keys have positions, capture/geometry.py)."""
    from torch.utils.data import DataLoader, TensorDataset

    cases = {"xcit_nano_12_p8_224": ({"channel", "pooled"}, FAMILIES[11][1], 32),
             "cait_xxs24_224": ({"mixed", "pooled"}, FAMILIES[10][1], 32),
             "pvt_v2_b0": ({"pooled", "msa"}, FAMILIES[12][1], 64)}
    for name, (kinds, kwargs, side) in cases.items():
        model = timm.create_model(name, **kwargs).eval()
        with torch.no_grad(), vitscope.capture(model, residual=False, branches=False) as cap:
            model(torch.randn(1, 3, side, side))
        assert {i.kind for i in cap.attention_layout} == kinds
        ds = TensorDataset(torch.randn(4, 3, side, side), torch.zeros(4, dtype=torch.long))
        res = vitscope.probe(model, DataLoader(ds, batch_size=4), ["attention_entropy", "ratio_of_norms"],
                             progress=False)
        skipped = res.meta.get("not_applicable", {}).get("attention_entropy", {})
        assert {r["layer"] for r in res["attention_entropy"]}.isdisjoint(skipped)
        assert all(i.name in skipped for i in cap.attention_layout if not i.has_key_positions)
        assert (name == "pvt_v2_b0") == any(r["kind"] == "pooled" for r in res["attention_entropy"])
        unsplit = res.meta.get("not_applicable", {}).get("ratio_of_norms", {})  # blocks not split as z + f(z): no ratio
        assert {r["layer"] for r in res["ratio_of_norms"]}.isdisjoint(unsplit)
        assert res["ratio_of_norms"]  # every family here has table blocks
        if name != "pvt_v2_b0":  # the class-attention blocks (CaiT, XCiT) are not split: no ratio, named
            assert any(n.startswith(("blocks_token_only", "cls_attn_blocks")) for n in unsplit)


def test_swin_shifted_window_query_maps_follow_timm_partition():
    """A query map of a shifted-window block lies on the cells of the query's (cyclically shifted) window,
    located with timm's own roll + window_partition, and carries the captured row."""
    torch.manual_seed(0)
    model = timm.create_model(FAMILIES[8][0], **FAMILIES[8][1]).eval()
    x = torch.randn(1, 3, 32, 32)
    maps = vitscope.attention_maps(model, x, query=(1, 6), embeddings=False)
    with torch.no_grad(), vitscope.capture(model, residual=False, branches=False) as cap:
        model(x)
    info, attn = cap.attention_layout[1], cap.attentions[1]  # layers.0.blocks.1: shifted by 2 on an 8x8 map
    assert info.window_shift == (2, 2) and info.grid == (4, 4) and info.patch_size == 4
    H = W = 8
    idx = torch.roll(torch.arange(H * W).view(1, H, W, 1), shifts=(-2, -2), dims=(1, 2))
    cells = window_partition(idx, (4, 4)).reshape(-1, 16)  # (windows, 16): map cell of each window position
    q = 1 * W + 6  # query cell (1, 6) of the 8x8 map
    w, p = (cells == q).nonzero()[0].tolist()
    want = torch.zeros(attn.shape[1], H * W)
    want[:, cells[w]] = attn[w, :, p, :]  # (heads, 64)
    assert maps.query_cells[1] == (1, 6)
    # the captured rows placed on the map: the same forward on the same input, so the same bits
    torch.testing.assert_close(torch.from_numpy(maps.query_maps[1][0]).reshape(-1, H * W), want, rtol=0, atol=0)


SPLIT = [FAMILIES[i] for i in (0, 8, 9, 13)] + [("mobilenetv3_small_050", {}, 64)]  # EfficientNet-style blocks


@pytest.mark.parametrize("name,kwargs,side", SPLIT, ids=[f[0] for f in SPLIT])
def test_table_blocks_split_as_z_plus_f(name, kwargs, side):
    """Blocks of capture's table (pre-norm transformers: Swin, EVA; conv blocks: ConvNeXt, EfficientNet, BiT's
    pre-activation ResNetV2) are split into sub-layers z_out = shortcut + branch, the stream chained from one to
    the next, and the first attention branch equals the block's own modules applied to its input."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad(), vitscope.capture(model, attention=False) as cap:
        model(torch.randn(2, 3, side, side))
    res = cap.residual_records
    assert len(res) >= 2 and "table" in {s.family for s in find_blocks(model)}
    for r in res:  # float32: z_out = s + b with b recorded, or b = z_out - s derived: two roundings at most
        bound = 2 * 2.0**-24 * (r.z_out.abs() + r.branch.abs())
        assert ((r.shortcut + r.branch - r.z_out).abs() <= bound).all(), r.info.name
    if name.startswith("eva"):
        blk = model.blocks[0]
        with torch.no_grad():
            want = blk.attn(blk.norm1(res[0].z_in), rope=model.rope.get_embed() if model.rope is not None else None)
            want = want * blk.gamma_1 if blk.gamma_1 is not None else want
        assert res[0].info.name == "blocks.0.attn" and res[0].info.kind == "msa"
        torch.testing.assert_close(res[0].branch, want, rtol=0, atol=0)  # the block's own operations: same bits


def test_mobilevit_blocks_recorded_whole_so_cka_compares_the_same_examples():
    """MobileViT's inner transformer runs on unfolded patches (batch x patch area): its blocks are recorded whole
    (capture.sites.UNFOLDING), so every record holds the images of the batch and CKA runs."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs").eval()
    sites = find_blocks(model)
    assert not any(".transformer." in s.name for s in sites) and any(s.name == "stages.2.1" for s in sites)
    with torch.no_grad(), vitscope.capture(model, attention=False) as cap:
        model(torch.randn(4, 3, 64, 64))
    assert all(r.z_out.shape[0] == 4 for r in cap.records)
    ds = TensorDataset(torch.randn(8, 3, 64, 64), torch.zeros(8, dtype=torch.long))
    res = vitscope.probe(model, DataLoader(ds, batch_size=4), ["cka"], progress=False)
    assert len(res["cka"]) == len(cap.records) ** 2
