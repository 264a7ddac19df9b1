"""Every vitscope model, through the timm contract (tiny test_* variants), and CB's definition."""
import pytest
import timm
import torch

import vitscope
from vitscope.capture import explicit_attention
from vitscope.layers import ContextBroadcast

TINY = vitscope.list_models("test_*")


def _input(model, batch=2):
    size = model.pretrained_cfg["input_size"][-1]
    return torch.randn(batch, 3, size, size)


def test_registry_lists_and_builds_through_timm():
    names = vitscope.list_models()
    for required in ("vit_tiny_cb_patch16_224", "vit_small_cbs_patch16_224", "vit_base_cb_patch16_224",
                     "vit_tiny_patch2_32", "vit_small_cb_patch4_32", "convit_tiny_32", "convit_small_32"):
        assert required in names
        assert timm.is_model(required)
    assert vitscope.list_models("cbs_patch16") == [
        "vit_base_cbs_patch16_224", "vit_small_cbs_patch16_224", "vit_tiny_cbs_patch16_224"]
    assert len(TINY) >= 4


@pytest.mark.parametrize("name", vitscope.list_models())
def test_every_model_takes_timm_kwargs(name):
    with torch.device("meta"):
        model = vitscope.create_model(name, num_classes=3, drop_path_rate=0.1)
    assert model.num_classes == 3 and model.get_classifier().out_features == 3


def test_unknown_model_gets_clear_error():
    with pytest.raises(ValueError, match="Unknown model 'vit_tiny_cb_patch17'"):
        vitscope.create_model("vit_tiny_cb_patch17")


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_intermediates_capture(name):
    model = vitscope.create_model(name)
    x = _input(model)
    model.train()
    out = model(x)
    assert out.shape == (2, model.num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not no_grad, f"parameters without gradient: {no_grad}"

    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats, rtol=0, atol=0)  # timm runs the same modules in the same order
        assert len(inter) >= 1
        with explicit_attention(model):  # the attention path capture switches to: the same bits
            ref = model(x)
        with vitscope.capture(model) as cap:
            tapped = model(x)
    assert torch.equal(tapped, ref)  # hooks only observe
    assert cap.records, "no sub-layer captured"


def _params(name, **kw):
    with torch.device("meta"):
        return sum(p.numel() for p in vitscope.create_model(name, **kw).parameters())


@pytest.mark.parametrize("size,dim", [("tiny", 192), ("small", 384), ("base", 768)])
def test_cb_parameter_counts(size, dim):
    base = _params(f"vit_{size}_patch16_224")
    assert _params(f"vit_{size}_cb_patch16_224") == base
    assert _params(f"vit_{size}_cbs_patch16_224") == base + 12 * dim


def test_cifar_vit_layout():
    with torch.device("meta"):
        m = vitscope.create_model("vit_tiny_patch2_32")
    assert m.patch_embed.grid_size == (16, 16) and m.embed_dim == 192 and len(m.blocks) == 12
    assert m.blocks[0].attn.qkv.bias is None  # HDVW's ViT-Ti: qkv_bias False
    with torch.device("meta"):
        c = vitscope.create_model("convit_tiny_32")
    assert c.patch_embed.grid_size[0] >= 8 and c.embed_dim == 192
    assert sum(b.use_gpsa for b in c.blocks) == 10 and len(c.blocks) == 12


def test_context_broadcast_formula():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    # the module's float32 operations written out in the same order on the same tensor: equal bit for bit
    mean_all = x.mean(1, keepdim=True)
    torch.testing.assert_close(ContextBroadcast(4)(x), 0.5 * x + 0.5 * mean_all, rtol=0, atol=0)
    mean_spatial = x[:, 1:].mean(1, keepdim=True)
    torch.testing.assert_close(ContextBroadcast(4, include_prefix=False)(x), 0.5 * x + 0.5 * mean_spatial, rtol=0,
                               atol=0)
    cbs = ContextBroadcast(4, scaled=True)
    with torch.no_grad():
        cbs.scale.copy_(torch.tensor([0.0, 0.25, 0.5, 1.0]))
    lam = cbs.scale.detach()
    torch.testing.assert_close(cbs(x), (1 - lam) * x + lam * mean_all, rtol=0, atol=0)


@pytest.mark.parametrize("placement", ["mlp_end", "mlp_mid", "mlp_front", "attn", "block"])
def test_cb_placements_match_hand_computation(placement):
    model = vitscope.create_model("test_vit_cb", cb_placement=placement, cb_from_block=1).eval()
    plain = vitscope.create_model("test_vit_cifar", qkv_bias=True).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)

    def cb(t):
        return 0.5 * t + 0.5 * t.mean(1, keepdim=True)

    with torch.no_grad():
        h = plain.norm_pre(plain._pos_embed(plain.patch_embed(x)))
        h = plain.blocks[0](h)  # block 0 has no CB (cb_from_block=1)
        blk = plain.blocks[1]
        z = h
        if placement == "mlp_front":
            mlp = lambda t: blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(cb(t))))  # noqa: E731
        elif placement == "mlp_mid":
            mlp = lambda t: blk.mlp.fc2(cb(blk.mlp.act(blk.mlp.fc1(t))))  # noqa: E731
        elif placement == "mlp_end":
            mlp = lambda t: cb(blk.mlp(t))  # noqa: E731
        else:
            mlp = blk.mlp
        a = blk.attn(blk.norm1(z))
        z = z + (cb(a) if placement == "attn" else a)
        z = z + mlp(blk.norm2(z))
        if placement == "block":
            z = cb(z)
        expected = plain.forward_head(plain.norm(z))
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)  # the blocks' own operations: same bits
    assert model.blocks[0].cb_placement == ""


@pytest.mark.parametrize("pass_depth", [True, False])
def test_cb_from_block_with_and_without_timm_block_index(pass_depth):
    """timm >= 1.0.24 passes the block index as ``depth=``; older timm does not: the factory counts."""
    from vitscope.models.vit_cb import CBBlockFactory

    factory = CBBlockFactory(cb_placement="attn", cb_from_block=2, cb_scaled=True)
    blocks = [factory(dim=8, num_heads=2, **({"depth": i} if pass_depth else {})) for i in range(4)]
    assert [b.cb_placement for b in blocks] == ["", "", "attn", "attn"]
    assert [b.cb is None for b in blocks] == [True, True, False, False]
    assert sum(p.numel() for b in blocks for p in b.parameters()) == 4 * sum(
        p.numel() for p in blocks[0].parameters()) + 2 * 8  # a CBS scale of dim 8 in blocks 2 and 3


def test_cb_bad_placement_and_cb_kwargs_on_plain_model():
    with pytest.raises(ValueError, match="cb_placement"):
        vitscope.create_model("test_vit_cb", cb_placement="nowhere")
    with pytest.raises(ValueError, match="no Context Broadcasting"):
        vitscope.create_model("test_vit_cifar", cb_placement="mlp_end")


def test_cli_models_lists_with_counts(capsys):
    from vitscope.cli import main

    assert main(["models", "cbs_patch16"]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny_cbs_patch16_224" in out and "5,719,720 parameters" in out
    assert main([]) == 0  # help
