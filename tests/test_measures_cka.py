"""CKA and minibatch CKA against a numpy reference of the formula, closed-form properties and the peer
libraries ckatorch and torch-cka on the same inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from _helpers import gram_cka_bound, minibatch_cka_bound, ref_hsic1
from vitscope.measures import MinibatchCKA, cka, hsic1

U = 2.0**-53  # unit roundoff of float64


def gam(m: int) -> float:
    return m * U / (1 - m * U)


def _centred_mag(a: np.ndarray, unbiased: bool) -> np.ndarray:
    """A bound on |centre(K)| entrywise for |K| <= a (a >= 0): U-centring adds (a_i + a_j) / (n - 2) +
    sum(a) / ((n - 1)(n - 2)) (zero diagonal), H K H (a_i + a_j) / n + sum(a) / n^2."""
    n = len(a)
    a = a.copy()
    if unbiased:
        np.fill_diagonal(a, 0.0)
    r, t = a.sum(1), a.sum()
    if unbiased:
        return a + (r[:, None] + r[None, :]) / (n - 2) + t / ((n - 1) * (n - 2))
    return a + (r[:, None] + r[None, :]) / n + t / n**2


def _hsic_err(ak, ek, al, el, unbiased: bool) -> float:
    """|<C(K^), C(L^)> - <C(K), C(L)>| (C the centring, HSIC up to its normalisation, which CKA cancels) for Grams
    within ek, el of exact ones bounded by ak, al: bilinear, so each Gram error enters through the other's centred
    magnitude; then the centring's sums of <= n terms and the sum of n^2 products: gamma_(3 n^2 + 16)."""
    n = len(ak)
    mk, ml = _centred_mag(ak, unbiased), _centred_mag(al, unbiased)
    return float((_centred_mag(ek, unbiased) * ml).sum() + (mk * _centred_mag(el, unbiased)).sum()
                 + gam(3 * n * n + 16) * (mk * ml).sum())


def _cka_err(value, K, L, mags, errs, unbiased: bool) -> float:
    """|CKA^ - CKA| for CKA = xy / sqrt(xx yy) from two Grams within errs = (ek, el) of exact ones (near K, L) bounded
    by mags = (ak, al), to first order: |CKA| (e_xy / |xy| + e_xx / 2 xx + e_yy / 2 yy + 3 u) with _hsic_err."""
    (ak, al), (ek, el) = mags, errs
    n = len(K)
    H = np.eye(n) - 1.0 / n

    def h(a, b):  # <C(a), C(b)>, unnormalised
        return ref_hsic1(a, b) * n * (n - 3) if unbiased else float(((H @ a @ H) * (H @ b @ H)).sum())

    xy, xx, yy = h(K, L), h(K, K), h(L, L)
    return abs(value) * (_hsic_err(ak, ek, al, el, unbiased) / abs(xy) + _hsic_err(ak, ek, ak, ek, unbiased) / (2 * xx)
                         + _hsic_err(al, el, al, el, unbiased) / (2 * yy) + 3 * U)


def _linear_err(x, y, unbiased=True) -> float:
    """cka(x, y)'s own bound for float64 features: float64 Gram products within gamma_D |X||X|' (bounded by
    (1 + gamma_D) |X||X|')."""
    x, y = (np.asarray(f, dtype=np.float64).reshape(len(f), -1) for f in (x, y))
    ax, ay = np.abs(x) @ np.abs(x).T, np.abs(y) @ np.abs(y).T
    gx, gy = gam(x.shape[1]), gam(y.shape[1])
    K, L = x @ x.T, y @ y.T
    value = float(cka(torch.from_numpy(x), torch.from_numpy(y), unbiased=unbiased))
    return _cka_err(value, K, L, ((1 + gx) * ax, (1 + gy) * ay), (gx * ax, gy * ay), unbiased)


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
    xn, yn = x.flatten(1).numpy(), y.numpy()
    ax, ay = np.abs(xn) @ np.abs(xn).T, np.abs(yn) @ np.abs(yn).T  # bounds on |Gram| (up to 1 + gamma_D)
    for unbiased in (True, False):
        # the same Gram on both sides: xy, xx, yy the same operations on the same bits, x / sqrt(x x) within 3 u
        torch.testing.assert_close(cka(x, x, unbiased=unbiased), torch.tensor(1.0, dtype=torch.float64), rtol=0,
                                   atol=3 * U)
        q, _ = torch.linalg.qr(feats(1, (24, 24), 3)[0])
        value = cka(x, y, unbiased=unbiased)
        own = _linear_err(xn, yn, unbiased)
        # orthogonal: x q within gamma_24 P (P = |x||q|), its Gram within (3 gamma_24 + gamma_24^2) PP' of x q q' x'
        # plus gamma_24 of its own products, and x q q' x' within ||q q' - I||_2 ||x_i|| ||x_j|| of x x' (q from
        # QR is orthogonal to rounding; ||q q' - I|| as computed here is off by <= 24 gamma_24)
        qn = q.numpy()
        P = np.abs(xn) @ np.abs(qn)
        g = gam(24)
        norms = np.linalg.norm(xn, axis=1)
        dq = np.linalg.norm(qn @ qn.T - np.eye(24), 2) + 24 * g
        kq = xn @ qn @ (xn @ qn).T
        nn_ = np.outer(norms, norms)
        rot = _cka_err(float(value), kq, yn @ yn.T, ((1 + g) ** 3 * P @ P.T + dq * nn_, (1 + g) * ay),
                       ((4 * g + g * g) * (1 + g) ** 2 * P @ P.T + dq * nn_, g * ay), unbiased)
        torch.testing.assert_close(cka(x.flatten(1) @ q, y, unbiased=unbiased), value, rtol=0, atol=own + rot)
        # isotropic scaling: c x within u |c x| a entry, so its Gram within (gamma_D + 3 u) c^2 |X||X|' of c^2 x x'
        gx, gy = gam(24) + 3 * U, gam(10) + 3 * U
        scaled = _cka_err(float(value), xn @ xn.T, yn @ yn.T, ((1 + gx) * ax, (1 + gy) * ay), (gx * ax, gy * ay),
                          unbiased)  # relative bounds, so the factors c^2 cancel
        torch.testing.assert_close(cka(3.7 * x, 0.2 * y, unbiased=unbiased), value, rtol=0, atol=own + scaled)
        # symmetry: (kx * ky).sum() and sqrt(xx * yy) commute operand by operand: bit for bit
        torch.testing.assert_close(cka(y, x, unbiased=unbiased), value, rtol=0, atol=0)
        assert 0 < float(value) < 1
    # unbiased value against the reference formula
    X, Y = x.flatten(1).numpy(), y.numpy()
    K, L = X @ X.T, Y @ Y.T
    expected = ref_hsic1(K, L) / np.sqrt(ref_hsic1(K, K) * ref_hsic1(L, L))
    # each side within _linear_err of the exact CKA of these features (U-centring vs the term-by-term form)
    assert abs(float(cka(x, y)) - expected) <= 2 * _linear_err(X, Y)
    # the same Grams on both sides: each HSIC_1 within gamma_(3 n^2 + 16) of its all-positive magnitude
    n = len(K)
    h_err = _hsic_err(np.abs(K), 0 * K, np.abs(L), 0 * L, True) / (n * (n - 3))
    assert abs(float(hsic1(torch.from_numpy(K), torch.from_numpy(L))) - ref_hsic1(K, L)) <= 2 * h_err


def _rbf_err(x, sigma):
    """(L, bound on |L^|, bound on |L^ - L|) of an RBF Gram exp(-d2 / (2 sigma^2 med)), ours or ckatorch's: squared
    distances n_i + n_j - 2 K_ij within (D + 3) u (||x_i|| + ||x_j||)^2 = delta; the median (n^2 odd: one order
    statistic both ways) moves by <= max delta (order statistics are 1-Lipschitz in the sup norm) + u med; the
    argument then by (delta + arg 2 sigma^2 dmed) / (2 sigma^2 med) + 3 u arg, exp by 2 u more (relative)."""
    d = x.shape[1]
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)  # (n, n)
    med = float(np.median(d2))
    norms = np.sqrt(sq)
    delta = (d + 3) * U * (norms[:, None] + norms[None, :]) ** 2
    dmed = float(delta.max()) + U * med
    arg = d2 / (2 * sigma**2 * med)
    darg = (delta + arg * 2 * sigma**2 * dmed) / (2 * sigma**2 * med - 2 * sigma**2 * dmed) + 3 * U * arg
    L = np.exp(-arg)
    err = L * (np.expm1(darg) + 2 * U)
    return L, L + err, err


def test_cka_agrees_with_ckatorch():
    from ckatorch.core import cka_base

    x = feats(31, (12,), 4)  # odd n: the median of n^2 distances is unique, so both rbf conventions agree
    y = torch.relu(x @ feats(1, (12, 9), 5)[0]) + 0.5 * feats(31, (9,), 6)
    for unbiased in (True, False):
        # ckatorch's fro_norm form <C(K), C(L)> / (||C(K)|| ||C(L)||) of float64 Grams: each side within _linear_err
        torch.testing.assert_close(cka(x, y, unbiased=unbiased), cka_base(x, y, unbiased=unbiased), rtol=0,
                                   atol=2 * _linear_err(x.numpy(), y.numpy(), unbiased))
        for sigma in (0.5, 1.0):
            value = cka(x, y, kernel="rbf", sigma=sigma, unbiased=unbiased)
            (K, ak, ek), (L, al, el) = _rbf_err(x.numpy(), sigma), _rbf_err(y.numpy(), sigma)
            torch.testing.assert_close(value, cka_base(x, y, kernel="rbf", threshold=sigma, unbiased=unbiased),
                                       rtol=0, atol=2 * _cka_err(float(value), K, L, (ak, al), (ek, el), unbiased))


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
    # U-centred Grams vs the term-by-term form, float64: each side within minibatch_cka_bound of the exact CKA
    self_bound, cross_bound = minibatch_cka_bound(bx, bx), minibatch_cka_bound(bx, by)
    np.testing.assert_array_less(np.abs(m_self.compute().numpy() - ref_minibatch_cka(bx, bx)), 2 * self_bound)
    np.testing.assert_array_less(np.abs(m_cross.compute().numpy() - ref_minibatch_cka(bx, by)), 2 * cross_bound)
    assert m_self.num_examples == n
    # dropping the 1/(n(n-3)) factor (the reference TF code) weights the batches by n(n-3) = 192, 4, 108, 10
    # instead of equally: another value, further from ours than any correct float64 evaluation can be (twice the
    # bound, the reference's own form being bounded alike)
    assert (np.abs(m_self.compute().numpy() - _cka_without_factor(bx)) > 2 * self_bound).any()
    # merge of two halves equals the whole: the same per-batch HSICs (the same operations) summed in another order,
    # ((h1 + h3) + (h0 + h2)) vs (((h0 + h1) + h2) + h3): each sum within gamma_3 sum_b |h_b| of the exact one, then
    # xy / sqrt(xx yy) rounds 3 u a side
    a, b = MinibatchCKA(4, 3), MinibatchCKA(4, 3)
    for k, (fx, fy) in enumerate(zip(bx, by)):
        (a if k % 2 else b).update(fx, fy)
    whole = m_cross.compute().numpy()
    per = [MinibatchCKA(4, 3) for _ in bx]
    for m, fx, fy in zip(per, bx, by):
        m.update(fx, fy)
    absum = {k: sum(m._states[0][k].abs().numpy() for m in per) for k in ("hsic_xy", "hsic_xx", "hsic_yy")}
    st = m_cross._states[0]
    rel = (2 * gam(3) * (absum["hsic_xy"] / st["hsic_xy"].abs().numpy() + absum["hsic_xx"][:, None] / (
        2 * st["hsic_xx"].numpy()[:, None]) + absum["hsic_yy"][None, :] / (2 * st["hsic_yy"].numpy()[None, :])) + 6 * U)
    np.testing.assert_array_less(np.abs(a.merge(b).compute().numpy() - whole), np.abs(whole) * rel)


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
    batches = [[f[10 * k:10 * (k + 1)] for f in xs] for k in range(3)]
    bound = minibatch_cka_bound(batches, batches)
    for i, fi in enumerate(xs):
        for j, fj in enumerate(xs):
            ref = cka_batch(fi.reshape(3, 10, -1), fj.reshape(3, 10, -1))
            # ckatorch's term-by-term HSIC_1 of float64 Grams, summed over the batches: each side within the bound
            torch.testing.assert_close(out[i, j], ref, rtol=0, atol=2 * float(bound[i, j]))


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
    # each side within minibatch_cka_bound (_helpers: gamma_m times HSIC_1's all-positive magnitude per batch)
    idxs = [idx for (idx,) in loader]
    bound = minibatch_cka_bound([[f[idx] for f in xs] for idx in idxs], [[f[idx] for f in ys] for idx in idxs])
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
    torch.testing.assert_close(out, ref.compute(), rtol=0, atol=0)  # the skipped batch adds exact zeros
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
    # integer Grams, exact in float64: only the formula's own rounding (gamma_(3 n^2 + 16) of its all-positive
    # magnitude) and float()'s u
    Kf, Lf = np.array(K, dtype=float), np.array(L, dtype=float)
    exact = float(hsic1_exact(K, L))
    h_err = _hsic_err(np.abs(Kf), 0 * Kf, np.abs(Lf), 0 * Lf, True) / (6 * 3)
    assert abs(ref_hsic1(Kf, Lf) - exact) <= h_err + U * abs(exact)


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
