"""CNN and hybrid families: CIFAR-stem ResNets, spatial-smoothing ResNets, AlterNet (HDVW)."""
import numpy as np
import pytest
import timm
import torch

import vitscope  # noqa: F401  (registers the models in timm)
from vitscope.layers.blur import Blur, SpatialSmoothing
from vitscope.layers.window_attention import WindowAttention2d
from vitscope.models.alternet import AlterNet, MSABlock, PreActBottleneck

TINY = ["test_resnet_cifar", "test_resnet_smooth", "test_alternet"]
BIG = ["resnet18_cifar", "resnet50_cifar", "resnet18_smooth_cifar", "resnet50_smooth", "alternet50",
       "alternet50_cifar"]


def _meta(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, **kw)


def _nparams(model):
    return sum(p.numel() for p in model.parameters())


def _np_blur(x):
    """2x2 box mean, stride 1, zero padding at the right/bottom (reference for ``Blur``)."""
    x = np.asarray(x, dtype=np.float64)
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, 1), (0, 1)])
    return (p[..., :-1, :-1] + p[..., 1:, :-1] + p[..., :-1, 1:] + p[..., 1:, 1:]) / 4.0


def _np_smooth(x, t=10.0):
    return _np_blur(np.maximum(t * np.tanh(np.asarray(x, dtype=np.float64) / t), 0.0))


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_grad_intermediates(name):
    model = timm.create_model(name)
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(3, 3, size, size)
    model.train()
    out = model(x)
    assert out.shape == (3, model.num_classes) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"parameters without gradient: {missing}"

    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        # the same modules on the same input in the same order: bit for bit
        assert torch.equal(final, feats)
        assert torch.equal(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (3, model.num_features)
    assert len(inter) == len(model.feature_info)
    for t, info in zip(inter, model.feature_info):
        assert t.shape[1] == info["num_chs"]
        assert t.shape[-1] == size // info["reduction"], info
    with torch.no_grad():  # as feats (autograd's kernels may round differently)
        last = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    assert torch.equal(last[0], feats)  # the last stage, with AlterNet's final BN-ReLU applied: the same operations
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model(x).shape == (3, 7)


@pytest.mark.parametrize("name", BIG)
def test_big_models_build_and_run_on_meta(name):
    model = _meta(name).eval()
    size = model.pretrained_cfg["input_size"][-1]
    assert size == (32 if "cifar" in name else 224)
    assert model.num_classes == model.pretrained_cfg["num_classes"] == (100 if "cifar" in name else 1000)
    with torch.device("meta"):  # shapes only: checks e.g. that every MSA map is whole windows
        out = model(torch.empty(2, 3, size, size))
        final, inter = model.forward_intermediates(torch.empty(2, 3, size, size))
    assert out.shape == (2, model.num_classes) and final.shape[1] == model.num_features
    assert [t.shape[-1] for t in inter] == [size // f["reduction"] for f in model.feature_info]


def test_cifar_stem_is_3x3_stride1_without_maxpool():
    for name in ("resnet18_cifar", "resnet50_cifar", "resnet18_smooth_cifar", "test_resnet_cifar"):
        m = _meta(name)
        assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.padding == (1, 1)
        assert isinstance(m.maxpool, torch.nn.Identity)
        assert [f["reduction"] for f in m.feature_info] == [1, 1, 2, 4, 8]
    # The parameter difference to timm's ImageNet ResNets is exactly the stem conv (7x7 -> 3x3).
    stem_delta = 64 * 3 * (7 * 7 - 3 * 3)
    assert _nparams(_meta("resnet18_cifar")) == _nparams(_meta("resnet18", num_classes=100)) - stem_delta
    assert _nparams(_meta("resnet50_cifar")) == _nparams(_meta("resnet50", num_classes=100)) - stem_delta
    # Smoothing has no parameters; the 224-px smoothing ResNet keeps timm's stem.
    assert _nparams(_meta("resnet50_smooth")) == _nparams(_meta("resnet50"))
    assert _nparams(_meta("resnet18_smooth_cifar")) == _nparams(_meta("resnet18_cifar"))
    assert _meta("resnet50_smooth").conv1.kernel_size == (7, 7)


def test_blur_matches_numpy_and_keeps_shape():
    x = torch.randn(2, 3, 7, 6)
    out = Blur()(x)
    assert out.shape == x.shape
    # float32 mean of 4 values: 3 additions (u = 2^-24 of the partial sums of |x| each), the division by 4 exact
    u = 2.0**-24
    assert (np.abs(out.numpy() - _np_blur(x.numpy())) <= 3 * u * _np_blur(np.abs(x.numpy()))).all()
    # t tanh(x / t): the division (u, which tanh passes on at most as u relative: tanh'(y) |y| <= |tanh y|), tanh
    # within 1 ulp (2u) and the product (u); ReLU exact; then the blur's 3u
    big = x * 30
    smooth_ref = _np_smooth(big.numpy())
    assert (np.abs(SpatialSmoothing()(big).numpy() - smooth_ref) <= 7 * u * smooth_ref).all()
    rep = Blur("replicate")(x)
    assert torch.equal(rep[..., :-1, :-1], out[..., :-1, :-1])  # the same four values inside: the same bits
    # the corner averages four copies of x: 3 additions of |x| .. 3|x| (<= 2u |x| each) over 4
    np.testing.assert_allclose(rep[..., -1, -1].numpy(), x[..., -1, -1].numpy(), rtol=3 * u, atol=0)
    assert torch.equal(SpatialSmoothing(temp=None, relu=False)(x), out)  # the blur alone: the same operations
    with pytest.raises(ValueError, match="pad_mode"):
        Blur("circular-ish")


def test_registered_in_timm_after_import():
    for name in TINY + BIG:
        assert name in vitscope.list_models() and timm.is_model(name)
    for name in TINY:  # timm >= 1.0.20 hands device/dtype to the model constructor
        assert {p.device.type for p in timm.create_model(name, device="meta").parameters()} == {"meta"}


def test_smoothing_sits_after_every_stage():
    smooth = timm.create_model("test_resnet_smooth").eval()
    plain = timm.create_model("test_resnet_cifar").eval()
    plain.load_state_dict(smooth.state_dict())  # same parameters: smoothing adds none
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = plain.act1(plain.bn1(plain.conv1(x)))
        for layer in (plain.layer1, plain.layer2, plain.layer3, plain.layer4):  # the layer itself: test above
            h = SpatialSmoothing()(layer(h))
        torch.testing.assert_close(smooth.forward_features(x), h, atol=0, rtol=0)  # the same operations
        assert not torch.equal(plain.forward_features(x), h)  # so the exact comparison above has power


@pytest.mark.parametrize("name", ["test_resnet_smooth", "test_alternet"])
def test_features_only_through_timm(name):
    m = timm.create_model(name, features_only=True, out_indices=(1, 3))
    feats = m(torch.randn(1, 3, 32, 32))
    assert [f.shape[-1] for f in feats] == [32, 8] and m.feature_info.reduction() == [1, 4]


# ---------------------------------------------------------------- AlterNet (HDVW)

def _window_attention_reference(m, x):
    """Window MSA by explicit loops over windows, with an independently built relative-position index, in float64;
    also a first-order bound E on the float64 round-off of any evaluation of the same sums (returned after the
    output and the maps). gamma_n = n u bounds a sum of n terms against the sum of their |terms|:
    q, k, v: gamma_C |W| |x|; scores q k^T / sqrt(hd) + bias (the scale is a power of two here: exact):
    gamma_hd |q| |k|^T / sqrt(hd), the inputs' errors carried, and u of |q k^T / sqrt(hd)| + |bias| for the add;
    softmax: |d p_ij| <= p_ij (2 max_l |d s_il| + (3N + 4) u) (exp, the sum of N terms, the division, and an
    online softmax's rescaling by up to N key blocks); A v: gamma_N |A| |v| and the inputs' errors; the output
    projection: gamma_(inner + 1) (|W_p| |o| + |b|) and |W_p| |d o|."""
    ws, nh, hd = m.window_size, m.num_heads, m.head_dim
    wq, bq = m.qkv.weight[:, :, 0, 0].double(), m.proj.weight[:, :, 0, 0].double()
    table = m.rel_pos.relative_position_bias_table.double()  # ((2ws-1)^2, heads or 1)
    pos = [(i, j) for i in range(ws) for j in range(ws)]
    idx = torch.tensor([[(a[0] - b[0] + ws - 1) * (2 * ws - 1) + (a[1] - b[1] + ws - 1) for b in pos] for a in pos])
    bias = table[idx].permute(2, 0, 1)  # (heads or 1, N, N)
    x = x.double()
    B, C, H, W = x.shape
    N, u = ws * ws, 2.0**-53
    out = torch.zeros(B, nh * hd, H, W, dtype=torch.float64)
    out_mag = torch.zeros_like(out)  # |A| |v|
    out_err = torch.zeros_like(out)  # the bound on |d o|
    probs, probs_err = [], []
    for i in range(0, H, ws):
        for j in range(0, W, ws):
            t = x[:, :, i:i + ws, j:j + ws].flatten(2).transpose(1, 2)  # (B, N, C)
            q, k, v = (t @ wq.T).split(nh * hd, dim=-1)
            mq, mk, mv = (t.abs() @ wq.abs().T).split(nh * hd, dim=-1)  # |W| |x| per output
            q, k, v, mq, mk, mv = (z.reshape(B, -1, nh, hd).transpose(1, 2) for z in (q, k, v, mq, mk, mv))
            eq, ek, ev = (C * u * z for z in (mq, mk, mv))  # (B, nh, N, hd)
            s0 = q @ k.transpose(-2, -1) / hd**0.5
            es = (hd * u * (mq @ mk.transpose(-2, -1)) + eq @ mk.transpose(-2, -1) + mq @ ek.transpose(-2, -1)) \
                / hd**0.5 + u * (s0.abs() + bias.abs())  # (B, nh, N, N)
            a = torch.softmax(s0 + bias, dim=-1)
            ea = a * (2 * es.amax(-1, keepdim=True) + (3 * N + 4) * u)
            probs.append(a)
            probs_err.append(ea)
            o = a @ v  # (B, nh, N, hd)
            eo = N * u * (a @ mv) + ea @ mv + a @ ev
            for dst, z in ((out, o), (out_mag, a @ mv), (out_err, eo)):
                dst[:, :, i:i + ws, j:j + ws] = z.transpose(1, 2).reshape(B, ws, ws, nh * hd).permute(0, 3, 1, 2)
    pb = m.proj.bias.double()[None, :, None, None]
    y = torch.einsum("oc,bchw->bohw", bq, out) + pb
    err = (nh * hd + 1) * u * (torch.einsum("oc,bchw->bohw", bq.abs(), out_mag) + pb.abs()) \
        + torch.einsum("oc,bchw->bohw", bq.abs(), out_err)
    return y, probs, err, probs_err


@pytest.mark.parametrize("per_head", [False, True])
def test_window_attention_matches_loop_reference_fused_and_explicit(per_head):
    m = WindowAttention2d(12, 20, num_heads=3, head_dim=4, window_size=4, rel_pos_per_head=per_head).eval()
    with torch.no_grad():
        m.rel_pos.relative_position_bias_table.normal_()  # a large bias, so a wrong index shows
    m.double()  # float64 throughout: the fused, explicit and loop evaluations each within E of the exact values
    x = torch.randn(2, 12, 8, 12, dtype=torch.float64)  # 2 x 3 windows, non-square map
    ref, ref_probs, err, probs_err = _window_attention_reference(m, x)
    seen = []
    hook = m.attn_drop.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    with torch.no_grad():
        m.fused_attn = True
        fused = m(x)
        m.fused_attn = False
        explicit = m(x)
    hook.remove()
    assert ((fused - explicit).abs() <= 2 * err).all()
    assert ((explicit - ref).abs() <= 2 * err).all()
    assert len(seen) == 1  # only the explicit path calls attn_drop
    probs = seen[0]
    assert probs.shape == (2 * 6, 3, 16, 16)  # (B * windows, heads, ws*ws, ws*ws)
    # each row: its 16 values within (16 + 4) u of the exact softmax of the computed scores, summed in 16 terms
    torch.testing.assert_close(probs.sum(-1), torch.ones(12, 3, 16, dtype=torch.float64),
                               atol=(2 * 16 + 5) * 2.0**-53, rtol=0)
    # window order is (batch, window row, window column), as in HDVW's rearrange
    got = probs.view(2, 6, 3, 16, 16).transpose(0, 1)
    assert ((got - torch.stack(ref_probs)).abs() <= 2 * torch.stack(probs_err)).all()


def test_window_attention_rejects_partial_windows():
    m = WindowAttention2d(8, num_heads=2, head_dim=4, window_size=4)
    with pytest.raises(ValueError, match="not a whole number of 4x4 windows"):
        m(torch.randn(1, 8, 6, 8))
    tiny = timm.create_model("test_alternet")
    with pytest.raises(ValueError, match="window"):
        tiny(torch.randn(1, 3, 36, 36))  # stage-3 map 9x9


def _alternet50_closed_form(num_classes=1000, stem_k=7, ws=7):
    """Parameter count of AlterNet-50 written out from the paper's description."""
    bn = lambda c: 2 * c  # noqa: E731
    total = 3 * 64 * stem_k * stem_k
    cin = 64
    for depth, m, heads, cout in zip((3, 4, 6, 4), (0, 1, 3, 2), (3, 6, 12, 24), (256, 512, 1024, 2048)):
        kinds = ["conv"] * (depth - 2 * m) + ["conv", "msa"] * m
        for j, kind in enumerate(kinds):
            if kind == "conv":
                mid = cout // 4
                total += bn(cin) + cin * mid + bn(mid) + 9 * mid * mid + bn(mid) + mid * cout
                total += cin * cout if (j == 0) else 0  # projection shortcut on the first block of a stage
            else:
                width, inner = cin // 4, heads * 64
                total += bn(cin) + cin * width + bn(width) + width * 3 * inner + (2 * ws - 1) ** 2
                total += inner * cout + cout
            cin = cout
    return total + bn(cin) + cin * num_classes + num_classes


def test_alternet50_layout_heads_and_parameter_count():
    model = _meta("alternet50")
    assert isinstance(model, AlterNet) and [len(s) for s in model.stages] == [3, 4, 6, 4]
    kinds = [[type(b).vitscope_kind for b in s] for s in model.stages]
    assert [k.count("msa") for k in kinds] == [0, 1, 3, 2]
    assert kinds[2] == ["conv", "msa", "conv", "msa", "conv", "msa"] and kinds[1] == ["conv"] * 3 + ["msa"]
    heads = [{b.attn.num_heads for b in s if isinstance(b, MSABlock)} for s in model.stages]
    assert heads == [set(), {6}, {12}, {24}]  # (3, 6, 12, 24); stage 1 has no MSA block
    for blk in (b for s in model.stages for b in s if isinstance(b, MSABlock)):
        assert blk.attn.head_dim == 64 and blk.attn.window_size == 7
        assert blk.conv.out_channels == blk.conv.in_channels // 4  # 1x1 conv to in/4 before the MSA
    assert model.stem.conv.kernel_size == (7, 7) and isinstance(model.stem.pool, torch.nn.MaxPool2d)
    assert _nparams(model) == _alternet50_closed_form()
    cifar = _meta("alternet50_cifar")
    assert cifar.stem.conv.kernel_size == (3, 3) and cifar.stem.conv.stride == (1, 1) and len(cifar.stem) == 1
    assert _nparams(cifar) == _alternet50_closed_form(num_classes=100, stem_k=3, ws=4)


def test_alternet_blocks_follow_capture_contract():
    model = timm.create_model("test_alternet", drop_path_rate=0.1).eval()
    blocks = [b for s in model.stages for b in s]
    assert {type(b).vitscope_kind for b in blocks} == {"conv", "msa"}
    # the last block's rate 0.1 k / k: a product and a quotient, within 2 u of 0.1
    assert isinstance(blocks[-1].drop_path, torch.nn.Module)
    assert abs(blocks[-1].drop_path.drop_prob - 0.1) <= 2 * 2.0**-53 * 0.1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.stem(x)
        for b in blocks:
            assert isinstance(b.shortcut, torch.nn.Module) and isinstance(b.drop_path, torch.nn.Module)
            pre = b.norm1(h)
            if isinstance(b, PreActBottleneck):
                branch = b.conv3(b.norm3(b.conv2(b.norm2(b.conv1(pre)))))
            else:
                attn = b.attn
                assert isinstance(attn.num_heads, int) and isinstance(attn.window_size, int)
                assert isinstance(attn.fused_attn, bool) and isinstance(attn.attn_drop, torch.nn.Dropout)
                branch = attn(b.norm2(b.conv(pre)))
            skip = h if isinstance(b.shortcut, torch.nn.Identity) else b.shortcut(pre)
            out = b(h)
            torch.testing.assert_close(out, skip + branch, atol=0, rtol=0)  # the block's own operations
            h = out
        torch.testing.assert_close(model.forward_features(x), model.norm(h), atol=0, rtol=0)
    with vitscope.capture(model) as cap:
        model(x)
    # conv blocks that shrink the map (stride 2: the first block of stages 1-3) are captured as "downsample"
    expected = ["downsample" if isinstance(b, PreActBottleneck) and b.conv2.stride == (2, 2) else type(b).vitscope_kind
                for b in blocks]
    assert expected.count("downsample") == 3
    assert [info.kind for info in cap.layout] == expected
    assert len(cap.attentions) == 2 and all(a.shape[-1] == 16 for a in cap.attentions)
    gelu = timm.create_model("test_alternet", msa_act_layer="gelu")  # HDVW's code uses GELU in MSA blocks
    assert type(gelu.stages[3][1].norm1.act).__name__ == "GELU"
    assert isinstance(gelu.stages[3][0].norm1.act, torch.nn.ReLU)
