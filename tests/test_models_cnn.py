"""CNN and hybrid families: CIFAR-stem ResNets, spatial-smoothing ResNets, AlterNet (HDVW)."""
import numpy as np
import pytest
import timm
import torch

import vitscope  # noqa: F401  (registers the models in timm)
from vitscope.layers.blur import Blur, SpatialSmoothing

TINY = ["test_resnet_cifar", "test_resnet_smooth"]
BIG = ["resnet18_cifar", "resnet50_cifar", "resnet18_smooth_cifar", "resnet50_smooth"]


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
        torch.testing.assert_close(final, feats)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (3, model.num_features)
    assert len(inter) == len(model.feature_info)
    for t, info in zip(inter, model.feature_info):
        assert t.shape[1] == info["num_chs"]
        assert t.shape[-1] == size // info["reduction"], info
    torch.testing.assert_close(inter[-1], feats)
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model(x).shape == (3, 7)


@pytest.mark.parametrize("name", BIG)
def test_big_models_build_on_meta(name):
    model = _meta(name)
    assert model.num_classes == model.pretrained_cfg["num_classes"]
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) if name == "resnet50_smooth" else (3, 32, 32)


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
    np.testing.assert_allclose(out.numpy(), _np_blur(x.numpy()), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(SpatialSmoothing()(x * 30).numpy(), _np_smooth(x.numpy() * 30), rtol=1e-5, atol=1e-5)
    rep = Blur("replicate")(x)
    np.testing.assert_allclose(rep[..., :-1, :-1].numpy(), out[..., :-1, :-1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(rep[..., -1, -1].numpy(), x[..., -1, -1].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="pad_mode"):
        Blur("circular-ish")


def test_smoothing_sits_after_every_stage():
    smooth = timm.create_model("test_resnet_smooth").eval()
    plain = timm.create_model("test_resnet_cifar").eval()
    plain.load_state_dict(smooth.state_dict())  # same parameters: smoothing adds none
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = plain.act1(plain.bn1(plain.conv1(x)))
        for layer in (plain.layer1, plain.layer2, plain.layer3, plain.layer4):
            h = torch.from_numpy(_np_smooth(layer(h).numpy())).float()
        torch.testing.assert_close(smooth.forward_features(x), h, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain.forward_features(x), h)


def test_features_only_through_timm():
    m = timm.create_model("test_resnet_smooth", features_only=True, out_indices=(1, 3))
    feats = m(torch.randn(1, 3, 32, 32))
    assert [f.shape[-1] for f in feats] == [32, 8] and m.feature_info.reduction() == [1, 4]
