"""Interventions: lesion (HDVW), skip removal and localization probes (RAGHU), checked against forwards
written out by hand here, on tiny models and batches of unequal size."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vitscope
from vitscope.interventions import (
    fit_position_probe,
    get_block,
    get_sublayer,
    lesion,
    localization_probe,
    remove_block,
    remove_skip,
    remove_sublayer,
    residual_blocks,
    residual_sublayers,
    skip_removal_study,
)

N_EXAMPLES, BATCH = 13, 5  # batches of 5, 5, 3


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter and BatchNorm statistic, so no branch is zero at init (timm zero-inits
    ResNet's last BN) and every removal changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def _data(n: int = N_EXAMPLES, seed: int = 0, classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g))


def _loader(ds: TensorDataset) -> DataLoader:
    return DataLoader(ds, batch_size=BATCH, shuffle=False)


def _plain_eval(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean NLL from logits, written independently of vitscope (log-softmax per loader batch)."""
    acc = (logits.argmax(1) == y).double().mean().item()
    logp = torch.cat([torch.log_softmax(part.double(), dim=1) for part in logits.split(BATCH)])
    return acc, -logp[torch.arange(len(y)), y].mean().item()


def _batched(forward, x: torch.Tensor) -> torch.Tensor:
    """``forward`` over the loader's batches: the float32 shapes the code under test computes on."""
    return torch.cat([forward(part) for part in x.split(BATCH)])


# The NLL bound. The references run the same operations as the code under test on the loader's batches, so the
# float32 logits and the float64 log-probabilities are the same bits; the two means differ only in the order of
# the float64 sums of n terms >= 0: each within (n - 1) 2^-53 relative of the exact sum, plus one division each.
NLL_REL = 2 * N_EXAMPLES * 2.0**-53


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------------------------
# Hand-written forwards (the independent references)


def _cb(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x + 0.5 * x.mean(dim=1, keepdim=True)


def _vit_attn_branch(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = blk.attn(blk.norm1(x))
    if getattr(blk, "cb_placement", "") == "attn":
        y = _cb(y)
    return y


def _vit_mlp_branch(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mlp = blk.mlp
    y = mlp.fc2(mlp.act(mlp.fc1(blk.norm2(x))))
    if getattr(blk, "cb_placement", "") == "mlp_end":
        y = _cb(y)
    return y


def _vit_block(blk: nn.Module, x: torch.Tensor, attn: bool = True, mlp: bool = True, skip: bool = True):
    if attn:
        x = x + _vit_attn_branch(blk, x) if skip else _vit_attn_branch(blk, x)
    if mlp:
        x = x + _vit_mlp_branch(blk, x) if skip else _vit_mlp_branch(blk, x)
    if getattr(blk, "cb_placement", "") == "block":
        x = _cb(x)
    return x


def _vit_forward(model: nn.Module, x: torch.Tensor, block_fn) -> torch.Tensor:
    with torch.no_grad():
        x = model.patch_embed(x)
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed  # (B, 1+hw, D)
        for i, blk in enumerate(model.blocks):
            x = block_fn(i, blk, x)
        return model.head(model.norm(x)[:, 0])


def _convit_block(blk: nn.Module, x: torch.Tensor, attn: bool = True, mlp: bool = True, skip: bool = True):
    if attn:
        y = blk.attn(blk.norm1(x))
        x = x + y if skip else y
    if mlp:
        y = blk.mlp(blk.norm2(x))
        x = x + y if skip else y
    return x


def _convit_forward(model: nn.Module, x: torch.Tensor, block_fn) -> torch.Tensor:
    with torch.no_grad():
        x = model.patch_embed(x) + model.pos_embed  # (B, 64, D)
        for i, blk in enumerate(model.blocks):
            if i == model.local_up_to_layer:
                x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = block_fn(i, blk, x)
        return model.head(model.norm(x)[:, 0])


def _resnet_branch(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(blk.bn1(blk.conv1(x)))
    if hasattr(blk, "conv3"):  # Bottleneck
        y = F.relu(blk.bn2(blk.conv2(y)))
        return blk.bn3(blk.conv3(y))
    return blk.bn2(blk.conv2(y))


def _resnet_block(blk: nn.Module, x: torch.Tensor, branch: bool = True, skip: bool = True) -> torch.Tensor:
    s = blk.downsample(x) if blk.downsample is not None else x
    out = torch.zeros_like(s)
    if branch:
        out = out + _resnet_branch(blk, x)
    if skip:
        out = out + s
    return F.relu(out)


def _resnet_forward(model: nn.Module, x: torch.Tensor, block_fn) -> torch.Tensor:
    with torch.no_grad():
        x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        i = 0
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for blk in layer:
                x = block_fn(i, blk, x)
                i += 1
        return model.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))  # timm's avg pool: the same kernel, same bits


class ToyBlock(nn.Module):
    """A block following vitscope's contract (as AlterNet's): ends with shortcut(x) + drop_path(branch)."""

    vitscope_kind = "conv"

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride) if (cin != cout or stride != 1) else nn.Identity()
        self.drop_path = nn.Identity()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.bn(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.branch(x)
        return self.shortcut(x) + self.drop_path(branch)


class ToyMSABlock(ToyBlock):
    vitscope_kind = "msa"


class ToyNet(nn.Module):
    """Stem, three vitscope-contract blocks, optional fixed positional map, pooled linear head."""

    def __init__(self, k: int = 3, pos_scale: float = 0.0):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)  # (B, 8, 8, 8)
        self.register_buffer("pos", pos_scale * torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(1)))
        self.blocks = nn.Sequential(ToyBlock(8, 8), ToyMSABlock(8, 16, 2), ToyBlock(16, 16))
        if k == 1:  # 1x1 convs only: no zero-padding border cue, so maps carry no position
            for b in self.blocks:
                b.conv = nn.Conv2d(b.conv.in_channels, b.conv.out_channels, 1, b.conv.stride)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x) + self.pos).mean(dim=(2, 3)))


def _toy_forward(model: ToyNet, x: torch.Tensor, block_fn) -> torch.Tensor:
    with torch.no_grad():
        x = model.stem(x) + model.pos
        for i, blk in enumerate(model.blocks):
            x = block_fn(i, blk, x)
        return model.fc(x.mean(dim=(2, 3)))


def _model(name: str) -> nn.Module:
    if name == "toy":
        return _randomize(ToyNet())
    kwargs = {"num_classes": 10} if name == "test_resnet" else {}
    return _randomize(vitscope.create_model(name, **kwargs))


# ---------------------------------------------------------------------------------------------
# Enumeration


def test_enumeration_names_kinds_and_order():
    vit = vitscope.create_model("test_vit_cb")
    blocks = residual_blocks(vit)
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1"]
    assert [b.kind for b in blocks] == ["msa+mlp"] * 2
    assert [s.name for s in residual_sublayers(vit)] == [
        "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert [(s.block, s.index) for s in residual_sublayers(vit)] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    convit = vitscope.create_model("test_convit_32")
    assert [s.kind for s in residual_sublayers(convit)] == ["gpsa", "mlp", "gpsa", "mlp", "msa", "mlp"]
    resnet = vitscope.create_model("test_resnet")
    assert [b.name for b in residual_blocks(resnet)] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert [s.kind for s in residual_sublayers(resnet)] == ["conv"] * 4
    toy = ToyNet()
    assert [(b.name, b.kind, b.family) for b in residual_blocks(toy)] == [
        ("blocks.0", "conv", "vitscope"), ("blocks.1", "msa", "vitscope"), ("blocks.2", "conv", "vitscope")]
    assert get_block(vit, -1).name == "blocks.1" and get_sublayer(vit, "blocks.1.mlp").index == 3


def test_bad_input_errors_name_the_problem():
    vit = vitscope.create_model("test_vit_cifar")
    with pytest.raises(ValueError, match=r"block index 5 is out of range: .* has 2 blocks \(0..1\)"):
        get_block(vit, 5)
    with pytest.raises(ValueError, match="no block named 'blocks.7'.*blocks.0, blocks.1"):
        with remove_skip(vit, "blocks.7"):
            pass
    with pytest.raises(ValueError, match="sub-layer index 4 is out of range"):
        with remove_sublayer(vit, 4):
            pass
    with pytest.raises(ValueError, match="Sequential has no residual block that vitscope recognizes"):
        residual_blocks(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="targets must be one of"):
        lesion(vit, _loader(_data()), targets="layers")
    with pytest.raises(ValueError, match=r"no block of VisionTransformer matches 'layer\*'"):
        skip_removal_study(vit, _loader(_data()), blocks=["layer*"])
    with pytest.raises(ValueError, match="must yield \\(images, labels\\) pairs"):
        lesion(vit, [torch.zeros(2, 3, 32, 32)])
    for study in (lesion, skip_removal_study, localization_probe):  # one rule, distributed.Batches' own
        with pytest.raises(ValueError, match="max_batches must be a positive integer or None, got 0"):
            study(vit, _loader(_data()), max_batches=0)
    with pytest.raises(ValueError, match="yielded no examples"):
        lesion(vit, [])

    class Broken(nn.Module):
        vitscope_kind = "conv"

    with pytest.raises(ValueError, match="no `shortcut` submodule"):
        residual_blocks(nn.Sequential(Broken()))


# ---------------------------------------------------------------------------------------------
# Lesion


FORWARDS = {"test_vit_cb": _vit_forward, "test_convit_32": _convit_forward,
            "test_resnet": _resnet_forward, "toy": _toy_forward}


def _removed_block_fn(name: str, removed: int):
    def fn(i, blk, x):
        if i != removed:
            return blk(x)
        if name == "test_resnet":
            return _resnet_block(blk, x, branch=False)
        if name == "toy":
            return blk.shortcut(x)
        return x  # transformer block removed: identity

    return fn


def _removed_sublayer_fn(name: str, removed_block: int, which: str):
    def fn(i, blk, x):
        if i != removed_block:
            return blk(x)
        if name == "test_vit_cb":
            return _vit_block(blk, x, attn=which != "attn", mlp=which != "mlp")
        return _convit_block(blk, x, attn=which != "attn", mlp=which != "mlp")

    return fn


@pytest.mark.parametrize("name", ["test_vit_cb", "test_convit_32", "test_resnet", "toy"])
def test_lesion_blocks_matches_hand_forward(name):
    model = _model(name)
    ds = _data()
    x, y = ds.tensors
    forward = FORWARDS[name]
    ref_intact = forward(model, x, lambda i, blk, z: blk(z))
    before = _outputs(model, x)
    # the hand forward runs the model's own modules and operations in the same order on the same tensor (as the
    # removal checks below rely on): equal bit for bit
    assert torch.equal(ref_intact, before), float((ref_intact - before).abs().max())

    model.train()  # lesion evaluates in eval mode and restores each module's flag
    result = lesion(model, _loader(ds), targets="blocks")
    assert all(m.training for m in model.modules())
    model.eval()
    acc, nll = _plain_eval(_batched(lambda part: _outputs(model, part), x), y)
    assert result.intact.num_examples == N_EXAMPLES
    assert result.intact.accuracy == acc  # hit counts (exact in float64) / n: the same quotient
    assert result.intact.nll == pytest.approx(nll, rel=NLL_REL, abs=0)

    n_blocks = len(residual_blocks(model))
    assert [u.block for u in result.units] == list(range(n_blocks))
    changed = 0
    for u in result.units:
        ref = forward(model, x, _removed_block_fn(name, u.block))
        with remove_block(model, u.block):
            got = _outputs(model, x)
        assert torch.equal(got, ref), f"{name} without block {u.block}"
        changed += not torch.equal(got, before)
        a, l_ = _plain_eval(_batched(lambda part, b=u.block: forward(model, part, _removed_block_fn(name, b)), x), y)
        assert u.accuracy == a and u.nll == pytest.approx(l_, rel=NLL_REL, abs=0)  # accuracy: counts / n, exact
        assert u.accuracy_drop == result.intact.accuracy - a
        # a difference of two such means: the two bounds added, in absolute terms (and one more rounding)
        assert u.nll_increase == pytest.approx(l_ - result.intact.nll, rel=0,
                                               abs=(NLL_REL + 2.0**-53) * (l_ + result.intact.nll))
    assert changed == n_blocks  # every removal had an effect
    assert torch.equal(_outputs(model, x), before)  # restored exactly

    rows = result.to_rows()
    assert [r["name"] for r in rows] == [b.name for b in residual_blocks(model)]
    assert rows[0]["depth"] == 0.0 and rows[-1]["depth"] == 1.0
    assert {"study", "name", "kind", "block", "depth", "accuracy", "nll", "accuracy_drop",
            "nll_increase"} <= set(rows[0])


@pytest.mark.parametrize("name", ["test_vit_cb", "test_convit_32"])
def test_lesion_sublayers_matches_hand_forward(name):
    model = _model(name)
    ds = _data()
    x, y = ds.tensors
    before = _outputs(model, x)
    result = lesion(model, _loader(ds), targets="sublayers", max_batches=2)  # first 10 examples
    assert result.intact.num_examples == 2 * BATCH
    assert [u.name for u in result.units] == [s.name for s in residual_sublayers(model)]
    for u in result.units:
        which = u.name.rsplit(".", 1)[1]
        ref = FORWARDS[name](model, x, _removed_sublayer_fn(name, u.block, which))
        with remove_sublayer(model, u.name):
            got = _outputs(model, x)
        assert torch.equal(got, ref), u.name
        assert not torch.equal(got, before)
        fn = _removed_sublayer_fn(name, u.block, which)
        a, l_ = _plain_eval(_batched(lambda part, fn=fn: FORWARDS[name](model, part, fn), x[: 2 * BATCH]),
                            y[: 2 * BATCH])
        assert u.accuracy == a and u.nll == pytest.approx(l_, rel=NLL_REL, abs=0)
    assert torch.equal(_outputs(model, x), before)


def test_lesion_sublayers_on_cnn_equals_blocks_and_unit_selection():
    model = _model("test_resnet")
    loader = _loader(_data())
    by_block = lesion(model, loader, targets="blocks", units=["layer2.*", 0])
    by_sub = lesion(model, loader, targets="sublayers", units=["layer2.*", 0])
    assert [u.name for u in by_block.units] == ["layer2.0", "layer1.0"]
    assert [u.accuracy for u in by_block.units] == [u.accuracy for u in by_sub.units]
    assert [u.nll for u in by_block.units] == [u.nll for u in by_sub.units]


# ---------------------------------------------------------------------------------------------
# Restoration


@pytest.mark.parametrize("name", ["test_vit_cb", "test_convit_32", "test_resnet", "toy"])
def test_every_patch_is_undone_even_after_an_exception(name):
    model = _model(name)
    x = _data(4).tensors[0]
    before = _outputs(model, x)
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    contexts = [lambda: remove_block(model, 1), lambda: remove_sublayer(model, 1), lambda: remove_skip(model, 1),
                lambda: remove_skip(model, 0)]
    for ctx in contexts:
        with pytest.raises(RuntimeError, match="boom"):
            with ctx():
                assert not torch.equal(_outputs(model, x), before)
                raise RuntimeError("boom")
        assert torch.equal(_outputs(model, x), before)
        with ctx():
            pass
        assert torch.equal(_outputs(model, x), before)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    assert all("forward" not in m.__dict__ for m in model.modules())
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    if name == "test_resnet":  # an absent downsample is a plain None attribute again, not a child
        blk = residual_blocks(model)[0].module
        assert blk.downsample is None and "downsample" not in blk._modules


def test_nested_interventions_restore_in_order():
    model = _model("test_vit_cb")
    x = _data(4).tensors[0]
    before = _outputs(model, x)
    ref = _vit_forward(model, x, lambda i, blk, z: _vit_block(blk, z, skip=False) if i == 0 else z)
    with remove_skip(model, 0), remove_block(model, 1):
        assert torch.equal(_outputs(model, x), ref)
    assert torch.equal(_outputs(model, x), before)


def test_block_removal_bypasses_block_level_context_broadcast():
    # the hand forwards here run the model's own modules in the model's order: equal bit for bit
    model = _randomize(vitscope.create_model("test_vit_cb", cb_placement="block"))
    x = _data(4).tensors[0]
    for b in range(2):
        ref = _vit_forward(model, x, lambda i, blk, z, b=b: z if i == b else _vit_block(blk, z))
        with remove_block(model, b):
            assert torch.equal(_outputs(model, x), ref)


@pytest.mark.parametrize("name", ["test_vit_cb", "test_resnet", "toy"])
def test_interventions_compose_with_capture(name):
    """vitscope.capture inside an intervention records the removed unit as a zero branch."""
    model = _model(name)
    x = _data(3).tensors[0]
    with remove_block(model, 0), vitscope.capture(model, attention=False) as cap:
        _outputs(model, x)
    removed = [r for r in cap.records if r.info.block == 0]
    assert len(removed) == len(residual_blocks(model)[0].sublayers)
    for r in removed:
        assert torch.count_nonzero(r.branch) == 0
    if name != "test_resnet":  # a ResNet block still applies its final activation
        assert torch.equal(removed[-1].z_out, removed[0].z_in)
    with remove_skip(model, 0), vitscope.capture(model, attention=False) as cap:
        _outputs(model, x)
    assert len(cap.residual_records) == len(residual_sublayers(model))


# ---------------------------------------------------------------------------------------------
# Skip removal


@pytest.mark.parametrize("variant", [("test_vit_cifar", {}), ("test_vit_cb", {}),
                                     ("test_vit_cb", {"cb_placement": "attn"}),
                                     ("test_vit_cb", {"cb_placement": "block"})])
def test_remove_skip_vit_equals_hand_forward(variant):
    name, kwargs = variant
    model = _randomize(vitscope.create_model(name, **kwargs))
    x = _data(6).tensors[0]
    # the hand forward runs the block's own modules in timm's order (+ 0 and Identity are exact): bit for bit
    assert torch.equal(_vit_forward(model, x, lambda i, blk, z: _vit_block(blk, z)), _outputs(model, x))
    for b in range(2):
        ref = _vit_forward(model, x, lambda i, blk, z, b=b: _vit_block(blk, z, skip=i != b))
        with remove_skip(model, b):
            got = _outputs(model, x)
        assert torch.equal(got, ref)


def test_remove_skip_convit_resnet_toy_equal_hand_forward():
    """The hand forwards run the blocks' own modules in the models' order (a zero shortcut adds 0: exact)."""
    x = _data(6).tensors[0]
    model = _model("test_convit_32")
    for b in range(3):
        ref = _convit_forward(model, x, lambda i, blk, z, b=b: _convit_block(blk, z, skip=i != b))
        with remove_skip(model, b):
            assert torch.equal(_outputs(model, x), ref)
    model = _model("test_resnet")
    for b in range(4):  # layer1.0 has an identity shortcut, the others a projection
        ref = _resnet_forward(model, x, lambda i, blk, z, b=b: _resnet_block(blk, z, skip=i != b) if i == b else blk(z))
        with remove_skip(model, b):
            assert torch.equal(_outputs(model, x), ref)
    model = _model("toy")
    for b in range(3):
        ref = _toy_forward(model, x, lambda i, blk, z, b=b: blk.branch(z) if i == b else blk(z))
        with remove_skip(model, b):
            assert torch.equal(_outputs(model, x), ref)


def test_remove_skip_refuses_an_unknown_block_forward_and_leaves_the_model_intact():
    from timm.models import vision_transformer

    class OwnBlock(vision_transformer.Block):
        def forward(self, x, attn_mask=None, is_causal=False):  # a forward remove_skip cannot know
            return x + self.attn(self.norm1(x))

    model = _randomize(vitscope.create_model("test_vit_cifar"))
    x = _data(4).tensors[0]
    model.blocks[1].__class__ = OwnBlock
    before = _outputs(model, x)
    with pytest.raises(NotImplementedError, match="OwnBlock.*remove_block"):
        with remove_skip(model, 1):
            pass
    assert torch.equal(_outputs(model, x), before)


def test_skip_removal_study_accuracy():
    model = _model("test_vit_cb")
    ds = _data()
    x, y = ds.tensors
    result = skip_removal_study(model, _loader(ds), blocks=[1, 0])
    assert result.study == "skip-removal"
    assert [u.name for u in result.units] == ["blocks.1", "blocks.0"]
    assert [u.depth for u in result.units] == [1.0, 0.0]
    for u in result.units:
        fn = lambda i, blk, z, b=u.block: _vit_block(blk, z, skip=i != b)  # noqa: E731
        a, l_ = _plain_eval(_batched(lambda part, fn=fn: _vit_forward(model, part, fn), x), y)
        assert u.accuracy == a
        assert u.nll == pytest.approx(l_, rel=NLL_REL, abs=0)
    assert result.to_dict()["intact"]["num_examples"] == N_EXAMPLES


# ---------------------------------------------------------------------------------------------
# Localization


def test_position_probe_on_constructed_features():
    g = torch.Generator().manual_seed(0)
    n, P, D = 30, 9, 12
    noise = torch.randn(n, P, D, generator=g)
    pos = torch.zeros(n, P, D)
    pos[:, torch.arange(P), torch.arange(P)] = 1.0  # dims 0..8 one-hot the position
    assert fit_position_probe(pos + 0.1 * noise, epochs=20).accuracy == 1.0
    blind = fit_position_probe(noise, epochs=20)
    assert blind.accuracy < 0.25  # chance 1/9 on 135 held-out tokens
    assert blind.train_accuracy > blind.accuracy  # the probe does fit its training tokens
    assert (blind.num_train_tokens, blind.num_test_tokens) == (15 * P, 15 * P)
    with pytest.raises(ValueError, match="at least 2 images"):
        fit_position_probe(noise[:1])
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_position_probe(torch.full((4, 3, 2), float("nan")))


def test_position_grid_classes_against_numpy_and_the_coarse_probe():
    """``position_grid``: each position's class is the cell of the coarser grid holding it, cell row i spanning
    the map rows in [i h / c_h, (i + 1) h / c_h) (reference: numpy's searchsorted over those boundaries), chance the
    largest cell's share; one cell per position is the paper's probe, bit for bit."""
    import numpy as np

    from vitscope.interventions import position_classes

    for h, w, ch, cw in [(8, 8, 4, 4), (7, 5, 3, 2), (56, 56, 14, 14), (6, 4, 6, 4), (5, 5, 1, 1)]:
        labels, chance = position_classes(h, w, (ch, cw))
        rows = np.searchsorted(np.ceil(np.arange(1, ch) * h / ch), np.arange(h), side="right")  # (h,) cell row
        cols = np.searchsorted(np.ceil(np.arange(1, cw) * w / cw), np.arange(w), side="right")  # (w,)
        want = (rows[:, None] * cw + cols[None, :]).reshape(-1)  # row-major positions -> row-major cells
        np.testing.assert_array_equal(labels.numpy(), want)
        assert chance == np.bincount(want).max() / (h * w)
    labels, chance = position_classes(3, 4)
    assert torch.equal(labels, torch.arange(12)) and chance == 1 / 12
    with pytest.raises(ValueError, match="a 9x2 position grid needs 1..8 rows"):
        position_classes(8, 8, (9, 2))

    g = torch.Generator().manual_seed(0)
    n, h, w, D = 24, 6, 6, 12
    feats = torch.randn(n, h * w, D, generator=g)
    cells, _ = position_classes(h, w, (3, 3))
    coded = feats * 0.1
    coded[:, torch.arange(h * w), cells] += 1.0  # dims 0..8 one-hot the 2 x 2 cell, not the position
    assert fit_position_probe(coded, epochs=20, labels=cells).accuracy == 1.0
    exact = fit_position_probe(coded, epochs=20)
    assert exact.accuracy < 0.5  # 4 positions per cell: the cell alone does not tell the position (chance 1/36)
    same = fit_position_probe(feats, epochs=5, labels=torch.arange(h * w))
    assert same == fit_position_probe(feats, epochs=5)  # the default classes: the same fit, bit for bit
    with pytest.raises(ValueError, match="one class per position"):
        fit_position_probe(feats, labels=cells[:-1])


def _identity_blocks_vit(pos_scale: float) -> nn.Module:
    model = vitscope.create_model("test_vit_cifar").eval()
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.zero_()  # every branch outputs 0: each block passes the stream through
        g = torch.Generator().manual_seed(2)
        model.pos_embed.copy_(pos_scale * torch.randn(model.pos_embed.shape, generator=g))
    return model


def test_localization_vit_recovers_position_and_stays_near_chance_without_it():
    loader = DataLoader(_data(40, seed=3), batch_size=16)  # batches 16, 16, 8
    located = localization_probe(_identity_blocks_vit(50.0), loader, epochs=20)
    blind = localization_probe(_identity_blocks_vit(0.0), loader, epochs=20)
    for r in located.layers:
        assert (r.grid_h, r.grid_w, r.chance) == (4, 4, 1 / 16)
        assert r.num_test_tokens == 20 * 16
        assert r.accuracy >= 0.99
    for r in blind.layers:
        assert r.accuracy < 0.15  # chance 1/16 on 320 held-out tokens
    rows = located.to_rows()
    assert [(r["name"], r["kind"], r["block"], r["depth"]) for r in rows] == [
        ("blocks.0", "msa+mlp", 0, 0.0), ("blocks.1", "msa+mlp", 1, 1.0)]


def test_localization_cnn_maps_and_convit_prefix_tokens():
    loader = DataLoader(_data(24, seed=4), batch_size=10)
    located = localization_probe(_randomize(ToyNet(k=1, pos_scale=20.0)), loader, epochs=20)
    blind = localization_probe(_randomize(ToyNet(k=1)), loader, epochs=20)
    assert [(r.grid_h, r.grid_w) for r in located.layers] == [(8, 8), (4, 4), (4, 4)]
    assert located.layers[0].accuracy >= 0.99
    assert all(r.accuracy < 0.2 for r in blind.layers)  # 1x1 convs on iid pixels: no position
    resnet = localization_probe(_model("test_resnet"), loader, layers=["layer3.*", "layer4.0"], epochs=5)
    assert [(r.name, r.grid_h, r.chance) for r in resnet.layers] == [("layer3.0", 2, 0.25), ("layer4.0", 1, 1.0)]
    coarse = localization_probe(_randomize(ToyNet(k=1, pos_scale=20.0)), loader, epochs=20, position_grid=2)
    assert [(r.grid_h, r.cells_h, r.cells_w, r.chance) for r in coarse.layers] == [(8, 2, 2, 0.25), (4, 2, 2, 0.25),
                                                                                (4, 2, 2, 0.25)]
    assert [(r.cells_h, r.cells_w) for r in located.layers] == [(8, 8), (4, 4), (4, 4)]  # default: every position
    # ConViT: no class token in the GPSA blocks, one before the MHSA block; both give the 8x8 grid
    convit = localization_probe(_model("test_convit_32"), loader, max_batches=2, epochs=5)
    assert [(r.grid_h, r.grid_w, r.num_test_tokens) for r in convit.layers] == [(8, 8, 10 * 64)] * 3


def test_localization_on_channels_last_swin_maps_uses_their_grid():
    """Swin's blocks output (B, H, W, C): the position probe's classes are the H x W cells of each stage (read
    channels-first as capture records them), not W x C. Reference: the probe fit on hand-hooked NHWC outputs
    flattened to (B, H*W, C) gives the same held-out accuracy (same features, same fit)."""
    import timm

    from vitscope.interventions.localization import fit_position_probe

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, window_size=7, depths=(1, 1),
                              embed_dim=16, num_heads=(1, 1), num_classes=2).eval()
    images = torch.randn(4, 3, 56, 56)
    located = localization_probe(model, [(images, torch.zeros(4))], epochs=5)
    assert [(r.name, r.grid_h, r.grid_w, r.chance) for r in located.layers] == [
        ("layers.0.blocks.0", 14, 14, 1 / 196), ("layers.1.blocks.0", 7, 7, 1 / 49)]
    kept = {}
    hooks = [model.get_submodule(r.name).register_forward_hook(
        lambda m, i, o, name=r.name: kept.__setitem__(name, o.flatten(1, 2))) for r in located.layers]  # (B, H*W, C)
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    for r in located.layers:
        assert r.accuracy == fit_position_probe(kept[r.name], epochs=5).accuracy
