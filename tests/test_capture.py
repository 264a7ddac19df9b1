"""vitscope.capture against attention maps and streams computed independently in the test."""
import pytest
import torch
import torch.nn.functional as F

import vitscope
from vitscope.capture import explicit_attention

U32 = 2.0**-24


def _assert_split(shortcut, branch, z_out, act=lambda t: t, inner=None):
    """``act(shortcut + branch)`` (float32) against the recorded ``z_out = act(sum)``, where capture computed
    ``branch = fl(sum - shortcut)`` (``inner``: the true branch's exact bits, checked against it too).

    With D = sum - shortcut, branch = D (1 + d1) and fl(shortcut + branch) = (sum + D d1)(1 + d2), |d| <= u32:
    |fl(shortcut + branch) - sum| <= u32 (|D| + |shortcut + branch|), |D| <= |branch| (1 + 2 u32); a ReLU is
    1-Lipschitz and exact. The true branch c (sum = fl(c + shortcut)): |branch - c| <= u32 (|branch| +
    (1 + u32) |c + shortcut|). Sums of two float32 values in float64 are exact here (exponents close)."""
    s, b = shortcut.double(), branch.double()
    bound = U32 * ((1 + 2 * U32) * b.abs() + (s + b).abs())  # (...) elementwise
    got = act(shortcut + branch)  # float32, as a user would recompute it
    assert ((got.double() - z_out.double()).abs() <= bound).all()
    if inner is not None:
        c = inner.double()
        assert ((b - c).abs() <= U32 * (b.abs() + (1 + U32) * (c + s).abs())).all()


def _vit_attention_by_hand(model, x):
    """Post-softmax maps of every block, from each module's qkv weights (no hooks), and per map the bound on its
    distance from timm's explicit path, which scales q before the product (here: after).

    Each attention logit is a float32 dot product of hd terms: both computations are within (hd + 1) u of
    c sum_i |q_i k_i| of the exact value, so they differ by delta <= (2 hd + 2) u c |q| |k|^T. ln p_j moves by at
    most 2 max_j delta over the row, and the two float32 softmaxes (N + 3) u each: |p - p'| <= p (2 delta + 2 (N + 3)
    u) to first order."""
    maps, bounds = [], []
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for blk in model.blocks:
        a = blk.attn
        z = blk.norm1(h)
        B, N, C = z.shape
        qkv = a.qkv(z).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
        c = a.head_dim**-0.5
        maps.append(((q @ k.transpose(-2, -1)) * c).softmax(-1))  # (B, H, N, N)
        delta = (2 * a.head_dim + 2) * U32 * c * (q.double().abs() @ k.double().abs().transpose(-2, -1))
        bounds.append(2 * delta.amax(-1, keepdim=True) + 2 * (N + 3) * U32)  # (B, H, N, 1) relative
        h = blk(h)
    return maps, bounds


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", ["test_vit_cb", "test_vit_cbs", "test_vit_cifar", "vit_tiny_patch16_224"])
def test_vit_attention_equals_independent_maps(name, fused):
    kw = dict(img_size=32, depth=2) if name.startswith("vit_") else {}
    model = vitscope.create_model(name, **kw).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        with explicit_attention(model):  # the path capture switches to: the same operations, hence the same bits
            ref_out = model(x)
            expected, bounds = _vit_attention_by_hand(model, x)
        with vitscope.capture(model) as cap:
            out = model(x)
    assert all(m.fused_attn == fused for m in model.modules() if hasattr(m, "fused_attn"))  # restored
    assert torch.equal(out, ref_out)  # hooks only observe
    assert len(cap.attentions) == len(expected) == len(model.blocks)
    for got, want, bound in zip(cap.attentions, expected, bounds):
        assert ((got.double() - want.double()).abs() <= torch.maximum(got, want).double() * bound).all()
        # a float32 softmax row of N entries: each within (N + 3) u relative, summed in float32 ((N - 1) u)
        N = got.shape[-1]
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), atol=(2 * N + 2) * 2.0**-24, rtol=0)
    info = cap.attention_layout[0]
    grid = 32 // model.patch_embed.patch_size[0]
    assert (info.kind, info.num_prefix_tokens, info.grid, info.num_heads) == ("msa", 1, (grid, grid), 3)
    assert [i.name for i in cap.attention_layout] == [f"blocks.{i}.attn" for i in range(len(model.blocks))]


def _rel_indices(side):
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], -1).float()  # (N, 2) as (x, y)
    d = pos[None, :, :] - pos[:, None, :]  # (N, N, 2) key - query
    return torch.cat([d, (d**2).sum(-1, keepdim=True)], -1)  # (N, N, 3): dx, dy, dx^2 + dy^2


def test_convit_gpsa_map_is_gated_and_renormalized():
    model = vitscope.create_model("test_convit_32").eval()
    with torch.no_grad():
        for blk in model.blocks[: model.local_up_to_layer]:
            blk.attn.gating_param.uniform_(-2, 2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vitscope.capture(model) as cap:
        model(x)
    with torch.no_grad():
        h = model.patch_embed(x) + model.pos_embed
        expected = []
        for u, blk in enumerate(model.blocks):
            if u == model.local_up_to_layer:
                h = torch.cat([model.cls_token.expand(2, -1, -1), h], 1)
            z = blk.norm1(h)
            a = blk.attn
            B, N, C = z.shape
            hd = C // a.num_heads
            if blk.use_gpsa:
                qk = a.qk(z).reshape(B, N, 2, a.num_heads, hd).permute(2, 0, 3, 1, 4)
                content = (qk[0] @ qk[1].transpose(-2, -1) * hd**-0.5).softmax(-1)
                pos = a.pos_proj(_rel_indices(int(N**0.5))).permute(2, 0, 1).softmax(-1)  # (H, N, N)
                g = torch.sigmoid(a.gating_param).view(1, -1, 1, 1)
                m = (1 - g) * content + g * pos
                expected.append(m / m.sum(-1, keepdim=True))
            else:
                qkv = a.qkv(z).reshape(B, N, 3, a.num_heads, hd).permute(2, 0, 3, 1, 4)
                expected.append((qkv[0] @ qkv[1].transpose(-2, -1) * hd**-0.5).softmax(-1))
            h = blk(h)
    kinds = [i.kind for i in cap.attention_layout]
    assert kinds == ["gpsa", "gpsa", "msa"]
    assert [i.num_prefix_tokens for i in cap.attention_layout] == [0, 0, 1]
    for got, want in zip(cap.attentions, expected):  # timm's GPSA/MHSA operations in the same order: same bits
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_convit_local_init_heads_peak_at_their_offsets():
    model = vitscope.create_model("test_convit_32", locality_strength=10.0).eval()
    with torch.no_grad():
        for blk in model.blocks[: model.local_up_to_layer]:
            blk.attn.gating_param.fill_(20.0)  # sigmoid ~ 1: positional attention only
    with torch.no_grad(), vitscope.capture(model, residual=False, branches=False) as cap:
        model(torch.randn(1, 3, 32, 32))
    attn = cap.attentions[0][0]  # (H, N, N), 8x8 grid
    side, k = 8, 2  # 4 heads -> a 2x2 grid of offsets centred at 0.5
    query = 3 * side + 3  # an interior patch (x=3, y=3)
    for h in range(4):
        h1, h2 = h % k, h // k
        key = attn[h, query].argmax().item()
        dx, dy = key % side - 3, key // side - 3
        # pos weights [2(h2-c), 2(h1-c), -1] on (dx, dy, d^2): the logit peaks at (dx, dy) = (h2-c, h1-c)
        assert (dx - (h2 - 0.5), dy - (h1 - 0.5)) in {(0.5, 0.5), (0.5, -0.5), (-0.5, 0.5), (-0.5, -0.5)}
        assert attn[h, query].max() > 0.2


def test_residual_streams_add_up_and_align():
    model = vitscope.create_model("test_vit_cb").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vitscope.capture(model, attention=False) as cap:
        model(x)
    assert [i.name for i in cap.layout] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert [i.kind for i in cap.layout] == ["msa", "mlp", "msa", "mlp"]
    # exact throughout: the recorded tensors are the block's own (z_out = z_in + f is that very float32 add), and
    # the hand forward runs the model's modules in the same order on the same bits (same kernels and threads)
    for (z_in, z_out), f in zip(cap.residuals, cap.branches):
        torch.testing.assert_close(z_in + f, z_out, rtol=0, atol=0)
    # the stream leaving one sub-layer enters the next
    for (_, z_out), (z_in, _) in zip(cap.residuals[:-1], cap.residuals[1:]):
        torch.testing.assert_close(z_out, z_in, rtol=0, atol=0)
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        torch.testing.assert_close(cap.residuals[0][0], h, rtol=0, atol=0)
        torch.testing.assert_close(cap.branches[0], model.blocks[0].attn(model.blocks[0].norm1(h)), rtol=0, atol=0)
        torch.testing.assert_close(cap.residuals[-1][1], model.blocks[1](model.blocks[0](h)), rtol=0, atol=0)


def test_on_record_streams_the_records_instead_of_keeping_them():
    model = vitscope.create_model("test_vit_cb").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vitscope.capture(model, attention=False) as kept:
        model(x)
    seen = []
    with torch.no_grad(), vitscope.capture(model, attention=False, on_record=seen.append) as streamed:
        model(x)
    assert streamed.records == [] and [r.info for r in seen] == kept.output_layout
    assert kept.output_layout[0].kind == "stem" and kept.output_layout[1:] == kept.layout
    for a, b in zip(seen, kept.records):
        for t, u in zip((a.z_in, a.branch, a.shortcut, a.z_out), (b.z_in, b.branch, b.shortcut, b.z_out)):
            if t is None or u is None:
                assert t is u is None and a.info.kind == "stem"
                continue
            torch.testing.assert_close(t, u, rtol=0, atol=0)


def test_resnet_blocks_skip_and_branch():
    # zero_init_last=False: timm's default zeroes each block's last BN scale, so every branch would be exactly 0
    model = vitscope.create_model("resnet18", num_classes=10, zero_init_last=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), vitscope.capture(model) as cap:
        model(x)
    assert len(cap.records) == 9 and len(cap.residual_records) == 8 and not cap.attentions
    # the first block of stages 2-4 halves the map: kind "downsample" (HDVW treats subsampling apart)
    assert [i.kind for i in cap.layout] == ["conv", "conv", "downsample", "conv"] * 1 + ["downsample", "conv"] * 2
    assert [i.stage for i in cap.layout] == [0, 0, 1, 1, 2, 2, 3, 3]
    for r in cap.residual_records:  # the branch is (input of act2) - shortcut: two float32 roundings, see above
        _assert_split(r.shortcut, r.branch, r.z_out, F.relu)
    blk = model.layer2[0]  # a downsampling block: shortcut = downsample(z)
    r = cap.residual_records[2]
    with torch.no_grad():
        # the block's own modules on the same input: the shortcut bit for bit, the branch within the rounding above
        torch.testing.assert_close(r.shortcut, blk.downsample(r.z_in), rtol=0, atol=0)
        _assert_split(r.shortcut, r.branch, r.z_out, F.relu,
                      inner=blk.bn2(blk.conv2(blk.act1(blk.bn1(blk.conv1(r.z_in))))))
    assert r.info.grid == (8, 8) and r.info.patch_size == 8


def test_name_filter_device_grad_and_hooks_removed_after_error():
    model = vitscope.create_model("test_vit_cb").eval()
    x = torch.randn(2, 3, 32, 32)
    with vitscope.capture(model, names="blocks.1.*", device="cpu") as cap:
        model(x)
    assert [i.name for i in cap.layout] == ["blocks.1.attn", "blocks.1.mlp"]
    assert [i.name for i in cap.attention_layout] == ["blocks.1.attn"]
    assert all(not t.requires_grad and t.grad_fn is None for t in cap.attentions + cap.branches)
    with vitscope.capture(model, grad=True) as cap:
        model(x)
    assert cap.attentions[0].requires_grad

    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    with pytest.raises(RuntimeError, match="boom"):
        with vitscope.capture(model):
            raise RuntimeError("boom")
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_unknown_model_family_gets_clear_error():
    with pytest.raises(ValueError, match="no residual block"):
        with vitscope.capture(torch.nn.Sequential(torch.nn.Linear(2, 2))):
            pass


def test_tokens_to_map():
    x = torch.randn(2, 1 + 6, 5)  # class token + 2x3 grid
    m = vitscope.tokens_to_map(x, (2, 3), num_prefix_tokens=1)
    assert m.shape == (2, 5, 2, 3)
    torch.testing.assert_close(m[:, :, 1, 2], x[:, 1 + 1 * 3 + 2], rtol=0, atol=0)  # a view: the same numbers
    fmap = torch.randn(2, 4, 3, 3)
    assert vitscope.tokens_to_map(fmap) is fmap
    with pytest.raises(ValueError, match="do not fill"):
        vitscope.tokens_to_map(x, (3, 3), num_prefix_tokens=1)


def test_stem_is_the_stream_entering_the_first_block():
    """Layer 0 (HDVW's latents[0]): the patch embedding with position embedding and class token of a ViT, the
    stem convolution and pooling of a ResNet; not x + f(x), so it has no branch and no ratio of norms."""
    vit, cnn = vitscope.create_model("test_vit_cb").eval(), vitscope.create_model("resnet18", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for model, expected in ((vit, lambda: vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))),
                                (cnn, lambda: cnn.maxpool(cnn.act1(cnn.bn1(cnn.conv1(x)))))):
            with vitscope.capture(model, attention=False) as cap:
                model(x)
            stem = cap.records[0]
            assert (stem.info.name, stem.info.kind, stem.info.block, stem.info.stage) == ("stem", "stem", -1, None)
            assert stem.branch is None and stem.shortcut is None and not stem.residual
            assert torch.equal(stem.z_in, x)  # the image
            torch.testing.assert_close(stem.z_out, expected(), rtol=0, atol=0)
            torch.testing.assert_close(cap.records[1].z_in, stem.z_out, rtol=0, atol=0)  # the first sub-layer's input
    assert cap.records[0].info.grid == (8, 8) and cap.records[0].info.patch_size == 4


def test_block_layers_equal_timm_forward_intermediates():
    """layers="blocks": one record per block named by its module path, equal to timm's own extraction
    (``forward_intermediates``: every block of a ViT, the last block of each ResNet stage)."""
    vit = vitscope.create_model("test_vit_cb").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with vitscope.capture(vit, attention=False, layers="blocks") as cap:
            vit(x)
        ref = vit.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True)  # prefix dropped
    assert [i.name for i in cap.output_layout] == ["stem", "blocks.0", "blocks.1"]
    assert [i.kind for i in cap.output_layout] == ["stem", "block", "block"]
    for rec, want in zip(cap.records[1:], ref):
        torch.testing.assert_close(rec.z_out[:, rec.info.num_prefix_tokens:], want, rtol=0, atol=0)
        _assert_split(rec.shortcut, rec.branch, rec.z_out)  # a ViT block is x + g(x); g recorded as z_out - z_in
    cnn = vitscope.create_model("resnet18", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with vitscope.capture(cnn, attention=False, layers="blocks", names=["stem", "layer[24].*"]) as c:
            cnn(x)
        ref = cnn.forward_intermediates(x, intermediates_only=True)  # act1, layer1 .. layer4
    assert [i.name for i in c.output_layout] == ["stem", "layer2.0", "layer2.1", "layer4.0", "layer4.1"]
    assert [i.stage for i in c.output_layout] == [None, 1, 1, 3, 3]
    torch.testing.assert_close(c.records[2].z_out, ref[2], rtol=0, atol=0)
    torch.testing.assert_close(c.records[4].z_out, ref[4], rtol=0, atol=0)
    assert c.records[4].info.grid == (2, 2) and c.records[4].info.patch_size == 32
    with pytest.raises(ValueError, match="layers must be one of sublayers, blocks"):
        with vitscope.capture(cnn, layers="heads"):
            pass
