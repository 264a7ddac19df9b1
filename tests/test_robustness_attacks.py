"""FGSM / PGD against torchattacks on the same model and inputs; center occlusion; bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import vitscope
from vitscope.robustness import Normalized, fgsm, occlude_center, occlusion_box, pgd

torchattacks = pytest.importorskip("torchattacks")

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _t(v: tuple) -> torch.Tensor:
    return torch.tensor(v).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = vitscope.create_model("test_vit_cifar").eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 32, 32, generator=g)
    x[:4] = x[:4].round()  # saturated pixels exercise the [0, 1] clamp
    with torch.no_grad():
        # A random ViT predicts one class for all inputs: centre its head on these features so that
        # predictions vary, then take them as labels (clean accuracy 1).
        feats = model.forward_head(model.forward_features((x - _t(MEAN)) / _t(STD)), pre_logits=True)
        model.head.weight.mul_(10.0)
        model.head.bias.copy_(-(model.head.weight @ feats.mean(dim=0)))
        y = Normalized(model, MEAN, STD)(x).argmax(dim=1)
    assert len(set(y.tolist())) > 2
    return model, x, y


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((Normalized(model, MEAN, STD)(x).argmax(dim=1) == y).sum())


@pytest.mark.parametrize("eps", [0.5 / 255, 2 / 255])
def test_fgsm_matches_torchattacks(setup, eps: float) -> None:
    model, x, y = setup
    ours = fgsm(model, x, y, eps)  # mean/std from model.pretrained_cfg (CIFAR statistics)
    ref = torchattacks.FGSM(Normalized(model, MEAN, STD), eps=eps)(x, y)
    assert (ours - x).abs().max() <= eps + 1e-6
    assert ours.min() >= 0 and ours.max() <= 1
    assert (ours == ref).float().mean() > 0.99
    assert abs(_acc(model, ours, y) - _acc(model, ref, y)) <= 1
    assert _acc(model, ours, y) < len(y)  # the attack does something


@pytest.mark.parametrize("eps,alpha,steps", [(0.5 / 255, 0.2 / 255, 3), (2 / 255, 1 / 255, 2)])
def test_pgd_matches_torchattacks(setup, eps: float, alpha: float, steps: int) -> None:
    model, x, y = setup
    ours = pgd(model, x, y, eps, alpha, steps, random_start=False, mean=MEAN, std=STD)
    ref = torchattacks.PGD(Normalized(model, MEAN, STD), eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert (ours - x).abs().max() <= eps + 1e-6
    assert ours.min() >= 0 and ours.max() <= 1
    assert (ours - ref).abs().max() <= 2 * alpha + 1e-6 and (ours == ref).float().mean() > 0.97
    assert abs(_acc(model, ours, y) - _acc(model, ref, y)) <= 1
    assert _acc(model, ours, y) <= _acc(model, fgsm(model, x, y, eps), y) + 1  # PGD at least as strong


def test_pgd_random_start_is_seeded_and_bounded(setup) -> None:
    model, x, y = setup
    net = Normalized(model, MEAN, STD)
    model.train()
    a = pgd(net, x[:6], y[:6], 4 / 255, steps=2, seed=3)
    assert model.training  # training flag restored after the attack
    model.eval()
    b = pgd(net, x[:6], y[:6], 4 / 255, steps=2, seed=3)
    c = pgd(net, x[:6], y[:6], 4 / 255, steps=2, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - x[:6]).abs().max() <= 4 / 255 + 1e-6 and a.min() >= 0 and a.max() <= 1
    # A Normalized model and the bare model with the same statistics give the same attack.
    assert torch.equal(fgsm(net, x[:6], y[:6], 0.01), fgsm(model, x[:6], y[:6], 0.01, mean=MEAN, std=STD))


def test_occlude_center_box() -> None:
    assert occlusion_box(224, 224, 0.5) == (56, 168, 56, 168)  # CB: central 112 x 112 at 224 px
    assert occlusion_box(32, 32, 0.5) == (8, 24, 8, 24)
    x = torch.rand(2, 3, 32, 32) * 0.9 + 0.05
    out = occlude_center(x)
    assert (out[..., 8:24, 8:24] == 0).all()
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[8:24, 8:24] = False
    assert torch.equal(out[..., mask], x[..., mask])
    assert torch.equal(occlude_center(x, 0.0), x)


def test_bad_input(setup) -> None:
    model, x, y = setup
    with pytest.raises(ValueError, match=r"\[0, 1\] pixel space"):
        fgsm(model, (x - 0.5) / 0.25, y, 1 / 255)  # normalized images
    with pytest.raises(ValueError, match=r"\[0, 1\] pixel space"):
        occlude_center(x * 255)
    with pytest.raises(ValueError, match="mismatched label count: 16 images but 15 targets"):
        pgd(model, x, y[:-1], 1 / 255, steps=1)
    with pytest.raises(ValueError, match="no pretrained_cfg"):
        fgsm(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), x, y, 1 / 255)
    with pytest.raises(ValueError, match="eps must be in"):
        fgsm(model, x, y, 8)  # 8 instead of 8/255
    with pytest.raises(ValueError, match="already Normalized"):
        fgsm(Normalized(model, MEAN, STD), x, y, 0.01, mean=MEAN, std=STD)
