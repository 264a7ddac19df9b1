"""CKA and minibatch CKA against a numpy reference of the formula, closed-form properties and the peer
libraries ckatorch and torch-cka on the same inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from _helpers import gram_cka_bound, ref_hsic1
from vitscope.measures import MinibatchCKA, cka, hsic1


def feats(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64)


def ref_minibatch_cka(batches_x, batches_y):
    """batches_*: list over batches of list over layers of (n, ...) arrays -> (Lx, Ly)."""
    Lx, Ly = len(batches_x[0]), len(batches_y[0])
    xy, xx, yy = np.zeros((Lx, Ly)), np.zeros(Lx), np.zeros(Ly)
    for bx, by in zip(batches_x, batches_y):
        Ks = [np.asarray(f).reshape(len(f), -1) @ np.asarray(f).reshape(len(f), -1).T for f in bx]
        Ls = [np.asarray(f).reshape(len(f), -1) @ np.asarray(f).reshape(len(f), -1).T for f in by]
        for i in range(Lx):
            xx[i] += ref_hsic1(Ks[i], Ks[i])
            for j in range(Ly):
                xy[i, j] += ref_hsic1(Ks[i], Ls[j])
        for j in range(Ly):
            yy[j] += ref_hsic1(Ls[j], Ls[j])
    return xy / np.sqrt(np.outer(xx, yy))


def make_layers(n, seed):
    """Four related 'layers' of different shapes (tokens, maps, vectors)."""
    base = feats(n, (6, 5), seed)
    mix = feats(1, (5, 5), seed + 1)[0]
    other = feats(n, (7,), seed + 2) + base[:, 0, :2].sum(-1, keepdim=True)
    return [base, torch.tanh(base @ mix), (base ** 2).reshape(n, 3, 2, 5), other]


def test_cka_properties():
    x = feats(40, (4, 6), 0)
    y = torch.tanh(x.flatten(1) @ feats(1, (24, 10), 1)[0]) + 0.3 * feats(40, (10,), 2)
    for unbiased in (True, False):
        torch.testing.assert_close(cka(x, x, unbiased=unbiased), torch.tensor(1.0, dtype=torch.float64))
        q, _ = torch.linalg.qr(feats(1, (24, 24), 3)[0])
        value = cka(x, y, unbiased=unbiased)
        torch.testing.assert_close(cka(x.flatten(1) @ q, y, unbiased=unbiased), value)  # orthogonal
        torch.testing.assert_close(cka(3.7 * x, 0.2 * y, unbiased=unbiased), value)  # isotropic scaling
        torch.testing.assert_close(cka(y, x, unbiased=unbiased), value)  # symmetry
        assert 0 < float(value) < 1
    # unbiased value against the reference formula
    X, Y = x.flatten(1).numpy(), y.numpy()
    K, L = X @ X.T, Y @ Y.T
    expected = ref_hsic1(K, L) / np.sqrt(ref_hsic1(K, K) * ref_hsic1(L, L))
    assert float(cka(x, y)) == pytest.approx(expected, rel=1e-12)
    assert float(hsic1(torch.from_numpy(K), torch.from_numpy(L))) == pytest.approx(ref_hsic1(K, L), rel=1e-12)


def test_cka_agrees_with_ckatorch():
    from ckatorch.core import cka_base

    x = feats(31, (12,), 4)  # odd n: the median of n^2 distances is unique, so both rbf conventions agree
    y = torch.relu(x @ feats(1, (12, 9), 5)[0]) + 0.5 * feats(31, (9,), 6)
    for unbiased in (True, False):
        torch.testing.assert_close(cka(x, y, unbiased=unbiased), cka_base(x, y, unbiased=unbiased))
        for sigma in (0.5, 1.0):
            torch.testing.assert_close(
                cka(x, y, kernel="rbf", sigma=sigma, unbiased=unbiased),
                cka_base(x, y, kernel="rbf", threshold=sigma, unbiased=unbiased))


def test_minibatch_cka_unequal_batches_matches_reference():
    n = 37
    xs, ys = make_layers(n, 10), make_layers(n, 20)[:3]
    sizes = [16, 4, 12, 5]  # unequal, last one short
    m_self, m_cross = MinibatchCKA(4), MinibatchCKA(4, 3)
    bx, by, start = [], [], 0
    for s in sizes:
        bx.append([f[start:start + s] for f in xs])
        by.append([f[start:start + s] for f in ys])
        m_self.update(bx[-1])
        m_cross.update(bx[-1], by[-1])
        start += s
    np.testing.assert_allclose(m_self.compute().numpy(), ref_minibatch_cka(bx, bx), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m_cross.compute().numpy(), ref_minibatch_cka(bx, by), rtol=1e-10, atol=1e-12)
    assert m_self.num_examples == n
    # dropping the 1/(n(n-3)) factor (the reference TF code) gives a different answer for unequal batches
    assert not np.allclose(m_self.compute().numpy(), _cka_without_factor(bx), atol=1e-6)
    # merge of two halves equals the whole
    a, b = MinibatchCKA(4, 3), MinibatchCKA(4, 3)
    for k, (fx, fy) in enumerate(zip(bx, by)):
        (a if k % 2 else b).update(fx, fy)
    torch.testing.assert_close(a.merge(b).compute(), m_cross.compute())


def _cka_without_factor(batches):
    L = len(batches[0])
    xy = np.zeros((L, L))
    for b in batches:
        Ks = [np.asarray(f).reshape(len(f), -1) @ np.asarray(f).reshape(len(f), -1).T for f in b]
        n = len(b[0])
        for i in range(L):
            for j in range(L):
                xy[i, j] += ref_hsic1(Ks[i], Ks[j]) * n * (n - 3)
    d = np.sqrt(np.diag(xy))
    return xy / np.outer(d, d)


def test_minibatch_cka_equal_batches_matches_ckatorch():
    from ckatorch.core import cka_batch

    xs = make_layers(30, 30)
    m = MinibatchCKA(len(xs))
    for k in range(3):
        m.update([f[10 * k:10 * (k + 1)] for f in xs])
    out = m.compute()
    for i, fi in enumerate(xs):
        for j, fj in enumerate(xs):
            ref = cka_batch(fi.reshape(3, 10, -1), fj.reshape(3, 10, -1))
            torch.testing.assert_close(out[i, j], ref)


class _Replay(nn.Module):
    """Replays precomputed features through Identity modules so torch-cka's hooks can see them."""

    def __init__(self, layers, dtype=torch.float32):
        super().__init__()
        self.feats = [f.to(dtype) for f in layers]
        self.layers = nn.ModuleList(nn.Identity() for _ in layers)

    def forward(self, idx):
        for f, m in zip(self.feats, self.layers):
            m(f[idx])
        return idx


def _hsic_magnitude(fx: torch.Tensor, fy: torch.Tensor) -> float:
    """HSIC_1's formula on |X||X|^T and |Y||Y|^T with every term counted positive: the centred Grams' entries are
    at most A_ij + (a_i + a_j) / (n - 2) + sum(A) / ((n - 1)(n - 2)) (a = row sums of A, zero diagonal), and this
    sum of their products also dominates the trace, product-of-sums and 1^T K L 1 terms of the peer's form."""
    n = len(fx)

    def mag(f):
        f = f.reshape(n, -1).abs()
        a = f @ f.T
        a.fill_diagonal_(0.0)
        r = a.sum(1)
        return a + (r[:, None] + r[None, :]) / (n - 2) + a.sum() / ((n - 1) * (n - 2))

    return float((mag(fx) * mag(fy)).sum()) / (n * (n - 3))


def test_minibatch_cka_agrees_with_torch_cka():
    """Against torch-cka run in float64 (features and its accumulators, which it allocates in the default dtype):
    its float32 default loses ~1e-6 to cancellation, which is the peer's own error, not ours."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA

    xs, ys = make_layers(45, 40), make_layers(45, 50)
    loader = DataLoader(TensorDataset(torch.arange(45)), batch_size=10)  # short last batch of 5
    names = [f"layers.{i}" for i in range(4)]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer = CKA(_Replay(xs, torch.float64), _Replay(ys, torch.float64), "a", "b", model1_layers=names,
                       model2_layers=names)
            peer.compare(loader, loader)
    finally:
        torch.set_default_dtype(default)
    got = peer.export()["CKA"]
    assert got.dtype == torch.float64
    ours = MinibatchCKA(4, 4)
    for (idx,) in loader:
        ours.update([f[idx] for f in xs], [f[idx] for f in ys])
    # The bound. Each evaluation's HSIC_1 of a batch is within gamma_m M of the exact one, M = _hsic_magnitude:
    # both Grams' products of D terms (2 gamma_D, HSIC being bilinear), then sums of at most 3 n^2 terms and a few
    # divisions; summing the B = 5 batches adds gamma_B; m = 2 D + 3 n^2 + 16 + B covers it. CKA = xy / sqrt(xx yy)
    # then moves by |CKA| (e_xy / |xy| + e_xx / 2 xx + e_yy / 2 yy + 3 u); both sides within it: twice.
    idxs = [idx for (idx,) in loader]
    gam = lambda m: m * 2.0**-53 / (1 - m * 2.0**-53)  # noqa: E731
    width = max(f[0].numel() for f in xs + ys)
    m = 2 * width + 3 * 10**2 + 16 + len(idxs)
    xy, xx, yy = np.zeros((4, 4)), np.zeros(4), np.zeros(4)  # HSIC sums over the batches
    exy, exx, eyy = np.zeros((4, 4)), np.zeros(4), np.zeros(4)  # their error bounds
    for idx in idxs:
        for i in range(4):
            kx = (xs[i][idx].reshape(len(idx), -1) @ xs[i][idx].reshape(len(idx), -1).T).numpy()
            ky = (ys[i][idx].reshape(len(idx), -1) @ ys[i][idx].reshape(len(idx), -1).T).numpy()
            xx[i] += ref_hsic1(kx, kx)
            yy[i] += ref_hsic1(ky, ky)
            exx[i] += gam(m) * _hsic_magnitude(xs[i][idx], xs[i][idx])
            eyy[i] += gam(m) * _hsic_magnitude(ys[i][idx], ys[i][idx])
            for j in range(4):
                kyj = (ys[j][idx].reshape(len(idx), -1) @ ys[j][idx].reshape(len(idx), -1).T).numpy()
                xy[i, j] += ref_hsic1(kx, kyj)
                exy[i, j] += gam(m) * _hsic_magnitude(xs[i][idx], ys[j][idx])
    ref = xy / np.sqrt(np.outer(xx, yy))
    bound = np.abs(ref) * (exy / np.abs(xy) + (exx[:, None] / xx[:, None] + eyy[None, :] / yy[None, :]) / 2
                           + 3 * 2.0**-53)
    diff = np.abs(ours.compute().numpy() - got.numpy())
    assert (diff <= 2 * bound).all(), (diff, bound)


def test_small_batch_skipped_with_warning():
    xs = make_layers(23, 60)
    m, ref = MinibatchCKA(4), MinibatchCKA(4)
    m.update([f[:20] for f in xs])
    ref.update([f[:20] for f in xs])
    with pytest.warns(RuntimeWarning, match="n=3"):
        m.update([f[20:] for f in xs])
    out = m.compute()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.compute())
    only_small = MinibatchCKA(4)
    with pytest.warns(RuntimeWarning):
        only_small.update([f[:2] for f in xs])
    with pytest.raises(ValueError, match="no batch"):
        only_small.compute()


def test_bad_inputs():
    x, y = feats(10, (5,), 0), feats(12, (5,), 1)
    with pytest.raises(ValueError, match="same examples"):
        cka(x, y)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        cka(bad, x)
    with pytest.raises(ValueError, match="n > 3"):
        cka(x[:3], x[:3])
    with pytest.raises(ValueError, match="kernel"):
        cka(x, x, kernel="cosine")
    with pytest.raises(ValueError, match="constant"):
        cka(torch.ones(10, 5), x)
    m = MinibatchCKA(2)
    with pytest.raises(ValueError, match="num_layers_x"):
        m.update([x])
    with pytest.raises(ValueError, match=r"feats_x\[1\] has n=12"):
        m.update([x, y])
    with pytest.raises(ValueError, match=r"feats_x\[0\] contains NaN"):
        m.update([bad, x])
    with pytest.raises(ValueError, match=r"feats_y\[0\] has n=12"):
        MinibatchCKA(2, 1).update([x, x], [y])
    m.update([torch.ones(10, 5), x])
    with pytest.raises(ValueError, match=r"layers \[0\]"):
        m.compute()
    with pytest.raises(ValueError, match="feats_y was omitted"):
        m.update([x, x], [x, x])


def test_update_grams_layer_by_layer_equals_update():
    """vitscope.probe builds each layer's Gram as the model runs (linear_gram) and adds the batch with
    update_grams: the same sums as update()."""
    from vitscope.measures.cka import linear_gram

    whole, by_layer = MinibatchCKA(4), MinibatchCKA(4)
    for n, seed in ((9, 40), (6, 41)):
        layers = make_layers(n, seed)
        whole.update(layers)
        by_layer.update_grams([linear_gram(f, validate=False) for f in layers])
    torch.testing.assert_close(by_layer.compute(), whole.compute(), rtol=0, atol=0)
    assert by_layer.num_examples == 15
    with pytest.raises(ValueError, match="one Gram per layer"):
        by_layer.update_grams([linear_gram(f) for f in make_layers(5, 42)[:3]])
    with pytest.warns(RuntimeWarning, match="n=3"):
        by_layer.update_grams([linear_gram(f) for f in make_layers(3, 43)])
    assert by_layer.num_examples == 15


def test_update_grams_of_two_models_equals_update():
    """vitscope.compare adds the Grams of two models' layers (La x Lb) with update_grams(grams, grams_y): the same
    sums as update(feats_x, feats_y); mixing the two forms is refused."""
    from vitscope.measures.cka import linear_gram

    whole, by_layer = MinibatchCKA(4, 2), MinibatchCKA(4, 2)
    for n, seed in ((9, 50), (6, 51)):
        xs, ys = make_layers(n, seed), make_layers(n, seed + 10)[:2]
        whole.update(xs, ys)
        by_layer.update_grams([linear_gram(f) for f in xs], [linear_gram(f) for f in ys])
    torch.testing.assert_close(by_layer.compute(), whole.compute(), rtol=0, atol=0)
    assert by_layer.compute().shape == (4, 2)
    with pytest.raises(ValueError, match="grams_y has 3 layers"):
        by_layer.update_grams([linear_gram(f) for f in xs], [linear_gram(f) for f in make_layers(6, 52)[:3]])
    with pytest.raises(ValueError, match="one Gram per layer"):
        by_layer.update_grams([linear_gram(f) for f in xs])


def test_hsic1_is_exactly_invariant_to_a_common_offset():
    """Exact rational arithmetic: adding one vector to every example leaves HSIC_1 unchanged (U-centring removes
    it), which linear_gram relies on when it centres features over the batch."""
    from fractions import Fraction

    def gram(rows):
        return [[sum(a * b for a, b in zip(x, y)) for y in rows] for x in rows]

    def hsic1_exact(K, L):  # METHODS.md's formula, term by term, in fractions
        n = len(K)
        K = [[K[i][j] if i != j else 0 for j in range(n)] for i in range(n)]
        L = [[L[i][j] if i != j else 0 for j in range(n)] for i in range(n)]
        trace = sum(K[i][j] * L[j][i] for i in range(n) for j in range(n))
        col = [sum(L[j]) for j in range(n)]
        kl1 = sum(K[i][j] * col[j] for i in range(n) for j in range(n))
        total = trace + sum(map(sum, K)) * sum(map(sum, L)) / Fraction((n - 1) * (n - 2)) - Fraction(2, n - 2) * kl1
        return total / (n * (n - 3))

    rng = np.random.default_rng(3)
    x = [[Fraction(int(v)) for v in row] for row in rng.integers(-9, 10, (6, 3))]
    y = [[Fraction(int(v)) for v in row] for row in rng.integers(-9, 10, (6, 4))]
    shifted = [[v + c for v, c in zip(row, (Fraction(300), Fraction(-7, 3), Fraction(0)))] for row in x]
    assert hsic1_exact(gram(x), gram(y)) == hsic1_exact(gram(shifted), gram(y)) != 0
    assert hsic1_exact(gram(x), gram(x)) == hsic1_exact(gram(shifted), gram(shifted))
    K, L = gram(x), gram(y)  # and the float reference agrees with the exact formula
    assert ref_hsic1(np.array(K, dtype=float), np.array(L, dtype=float)) == pytest.approx(float(hsic1_exact(K, L)))


def test_float32_grams_within_the_derived_bound_even_with_large_offsets():
    """linear_gram(float32=True) (vitscope.probe): float32 features centred over the batch, multiplied in float32
    (HSIC_1 does not change, see above); CKA stays within the derived worst case (~2.5e-4 here) of the float64
    reference over unequal batches, also when every example shares a large offset in a few channels (trained
    ViTs' massive activations), where a plain float32 Gram breaks that bound (~5e-4..8e-4 off). The default
    float64 Grams of update() stay within their own (~5e-9)."""
    from vitscope.measures.cka import linear_gram

    g = torch.Generator().manual_seed(7)
    offset = torch.zeros(16)
    offset[[2, 9]] = 300.0
    batches = []
    for n in (40, 23):
        base = torch.randn(n, 10, 16, generator=g)
        layers = [base, base + 0.05 * torch.randn(n, 10, 16, generator=g), torch.tanh(base) * 3]
        batches.append([f + offset for f in layers])
    fast, default = MinibatchCKA(3), MinibatchCKA(3)
    for b in batches:
        fast.update_grams([linear_gram(f, float32=True) for f in b])
        default.update(b)
    centred = [[(f.double() - f.double().mean(0)).numpy() for f in b] for b in batches]
    ref = ref_minibatch_cka(centred, centred)
    # derived worst cases per side (_helpers.gram_cka_bound, linear_gram's docstring): float32 products of the
    # centred features; float64 products of the uncentred ones; the reference's own float64 on the centred ones
    per_layer = [[f.reshape(len(f), -1).double().numpy() for f in fs] for fs in zip(*batches)]
    own = np.array([gram_cka_bound([x - x.mean(0) for x in b], 2.0**-53, centre=False) for b in per_layer])
    s32 = np.array([gram_cka_bound(b) for b in per_layer]) + own
    s64 = np.array([gram_cka_bound(b, 2.0**-53, centre=False) for b in per_layer]) + own
    assert (np.abs(fast.compute().numpy() - ref) <= s32[:, None] + s32[None, :]).all()
    assert (np.abs(default.compute().numpy() - ref) <= s64[:, None] + s64[None, :]).all()
    plain32 = [[(f.reshape(len(f), -1) @ f.reshape(len(f), -1).T).double() for f in b] for b in batches]
    naive = MinibatchCKA(3)
    for grams in plain32:
        naive.update_grams(grams)
    off = ~np.eye(3, dtype=bool)  # why linear_gram centres first: uncentred float32 products break the bound
    assert (np.abs(naive.compute().numpy() - ref) > s32[:, None] + s32[None, :])[off].all()
