"""Loss landscape: filter normalization as defined, the centre equals the model's loss, off-centre points
equal a manual evaluation, weights restored bit for bit, saved directions reproduce the grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitscope
from vitscope.curvature import load_directions, loss_landscape, random_directions, save_directions


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return vitscope.create_model("test_vit_cifar", num_classes=4)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 4))
    m[1].running_mean.uniform_(-0.3, 0.3)
    m[1].running_var.uniform_(0.5, 2.0)
    return m


def _loader(n: int = 11, bs: int = 4, size: int = 32) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g)
    ds = torch.utils.data.TensorDataset(x, torch.randint(0, 4, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=bs)  # batches of 4, 4, 3


def _reference(model: nn.Module, loader) -> tuple[float, float]:
    """Mean loss and accuracy over all examples, in eval mode: each loader batch's float32 mean loss times its
    size, summed in float64 in batch order and divided by the count (the landscape's own operations, so the centre
    is equal bit for bit), and the correct count over all."""
    was = model.training
    model.eval()
    loss, correct, n = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            loss += float(F.cross_entropy(out, y)) * len(x)
            correct += float((out.argmax(1) == y).sum())
            n += len(x)
    model.train(was)
    return loss / n, correct / n


@pytest.mark.parametrize("dims", [1, 2])
def test_centre_equals_model_loss_and_weights_restored(dims):
    m = _cnn().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    loader = _loader(size=8)
    res = loss_landscape(m, None, loader, dims=dims, steps=5, span=0.5, seed=3)
    ref_loss, ref_acc = _reference(m, loader)
    c = (2,) * dims
    assert res.loss.shape == (5,) * dims and res.x[2] == 0.0
    assert res.loss[c] == ref_loss and res.accuracy[c] == ref_acc  # the same operations
    assert res.n_examples == 11
    for k, v in m.state_dict().items():  # bit for bit, running statistics included
        assert torch.equal(v, before[k]), k
    assert m.training


def test_off_centre_point_equals_manual_evaluation():
    m = _vit()
    loader = _loader()
    res = loss_landscape(m, F.cross_entropy, loader, dims=2, steps=3, span=0.4, seed=1)
    d1, d2 = res.directions
    a, b = res.x[0], res.y[2]  # loss[iy, ix] at (x[ix], y[iy])
    moved = _vit()
    with torch.no_grad():  # w + a d1, then + b d2: the float32 roundings the landscape makes, in its order
        for n, p in moved.named_parameters():
            p.add_(d1[n], alpha=float(a)).add_(d2[n], alpha=float(b))
    ref_loss, ref_acc = _reference(moved, loader)
    assert res.loss[2, 0] == ref_loss and res.accuracy[2, 0] == ref_acc
    # the directions move the loss: at the centre's weights every point would be the centre's bits (the same
    # operations), so each of the 8 others differs exactly (here by 7e-4 to 3.5e-2)
    assert np.count_nonzero(res.loss != res.loss[1, 1]) == 8


def _filter_norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def _filter_rel(n: int) -> float:
    """A filter of n float32 values: ||w|| and ||r|| each within (n/2 + 1) u (n squares >= 0 summed: n u, halved by
    the square root, and its rounding), the scale's division, the offset and d = r * scale one u each, and a
    test's two norms as much again: (2n + 7) u, plus the 1e-10 offset against ||r|| (~sqrt(n) >= 1 here)."""
    return (2 * n + 7) * 2.0**-24 + 1e-10


def test_filter_normalization_policy():
    m = _vit()
    (d,) = random_directions(m, dims=1, seed=0)
    params = {n: p.detach() for n, p in m.named_parameters()}
    for n, w in params.items():
        w = w.detach()
        if n in ("pos_embed", "cls_token"):  # one filter per token row
            torch.testing.assert_close(torch.linalg.vector_norm(d[n], dim=-1), torch.linalg.vector_norm(w, dim=-1),
                                       rtol=_filter_rel(w.shape[-1]), atol=0)
        elif w.dim() <= 1:
            assert torch.count_nonzero(d[n]) == 0, n  # biases and norm parameters: zero direction
        else:
            torch.testing.assert_close(_filter_norms(d[n]), _filter_norms(w), rtol=_filter_rel(w[0].numel()), atol=0,
                                       msg=n)
    conv = "patch_embed.proj.weight"
    assert d[conv].shape[0] == 24 and torch.count_nonzero(d[conv]) == d[conv].numel()
    (ex,) = random_directions(m, dims=1, seed=0, tokens="exclude", ignore=None)
    assert torch.count_nonzero(ex["pos_embed"]) == 0 and torch.count_nonzero(ex["cls_token"]) == 0
    ln = "blocks.0.norm1.weight"  # ignore=None: a 1-D parameter is one filter
    assert torch.linalg.vector_norm(ex[ln]) == pytest.approx(float(torch.linalg.vector_norm(params[ln])),
                                                             rel=_filter_rel(params[ln].numel()), abs=0)
    (whole,) = random_directions(m, dims=1, seed=0, tokens="filter")
    assert torch.linalg.vector_norm(whole["pos_embed"]) == pytest.approx(
        float(torch.linalg.vector_norm(params["pos_embed"])), rel=_filter_rel(params["pos_embed"].numel()), abs=0)


def test_hdvw_normalization_is_along_dim_zero():
    m = _cnn()
    (d,) = random_directions(m, dims=1, normalization="hdvw", seed=0)
    w = m[0].weight.detach()  # (4, 3, 3, 3): norms across the 4 output filters per input position
    # the draw itself (seed 0, float64 normals rounded to float32, the first parameter first) gives ||d|| along
    # dim 0, so the 1e-7 offset enters the reference exactly: ||w|| ||d|| / (||d|| + 1e-7) in float64. The result
    # d ||w|| / (||d|| + 1e-7) in float32 (two norms of n = 4 values within (n/2 + 1) u each, the offset, the
    # division and the product u each) and this test's norm of it ((n/2 + 1) u): (3 n / 2 + 6) u relative
    raw = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float().double()
    wn, dn = torch.linalg.vector_norm(w.double(), dim=0), torch.linalg.vector_norm(raw, dim=0)
    expected = wn * dn / (dn + 1e-7)
    torch.testing.assert_close(torch.linalg.vector_norm(d["0.weight"], dim=0).double(), expected,
                               rtol=(3 * 4 / 2 + 6) * 2.0**-24, atol=0)
    # not Li et al.'s per-filter rule: that one gives each filter ||w_i|| within _filter_rel(n) (n = 27 values); these
    # norms mix the 4 filters' columns (here 1% to 21% off), so some filter is further off than that
    off = (_filter_norms(d["0.weight"]) / _filter_norms(w) - 1).abs()
    assert float(off.max()) > _filter_rel(w[0].numel())
    assert torch.count_nonzero(d["0.bias"]) == 0


def test_weight_decay_term_hdvw():
    m = _cnn()
    loader = _loader(size=8)
    base = loss_landscape(m, None, loader, dims=1, steps=3, seed=2)
    wd = loss_landscape(m, None, loader, dims=1, steps=3, seed=2, weight_decay=0.1, l2_style="hdvw")
    (d,) = base.directions
    for i, a in enumerate(base.x):  # wd * sum ||w + a d|| in float32, as the landscape rounds it: equal bit for bit
        l2 = 0.1 * sum(torch.linalg.vector_norm(p.detach() + float(a) * d[n]) for n, p in m.named_parameters())
        assert wd.loss[i] == base.loss[i] + float(l2)


def test_saved_directions_reproduce_the_grid(tmp_path):
    m = _cnn()
    loader = _loader(size=8)
    res = loss_landscape(m, None, loader, dims=2, steps=3, seed=5, normalization="hdvw")
    path = tmp_path / "dirs.safetensors"
    save_directions(path, res.directions, res.policy)
    dirs, policy = load_directions(path)
    assert policy["normalization"] == "hdvw" and policy["seed"] == 5
    again = loss_landscape(m, None, loader, dims=2, steps=3, directions=path)
    np.testing.assert_array_equal(res.loss, again.loss)
    assert [p.name for p in tmp_path.iterdir()] == ["dirs.safetensors"]  # no temp file left
    with pytest.raises(ValueError, match="another model"):
        loss_landscape(_vit(), None, _loader(), dims=2, steps=3, directions=[
            {"patch_embed.proj.weight": torch.zeros(1)}, {}])


def test_errors():
    m = _cnn()
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 3, 8, 8),
                                                                       torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="no examples"):
        loss_landscape(m, None, empty, steps=3)
    x, y = next(iter(_loader(size=8)))
    x[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="on batch 1"):
        loss_landscape(m, None, [next(iter(_loader(size=8))), (x, y)], steps=3)
    for k, v in m.state_dict().items():  # restored after the error too
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="no trainable parameters"):
        loss_landscape(_cnn().requires_grad_(False), None, _loader(size=8), steps=3)
    with pytest.raises(ValueError, match="must yield \\(images, labels\\) pairs"):  # the loss needs labels
        loss_landscape(m, None, [x], steps=3)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
