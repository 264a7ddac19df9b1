"""Helpers shared by several test modules."""
from __future__ import annotations

import builtins
import re
from collections.abc import Callable, Mapping

import numpy as np


def assert_close_tree(a, b, path: str = "", *, rel: float = 0.0, abs: float = 0.0,
                      bounds: Mapping[str, Callable[[float], float]] | None = None) -> None:
    """Nested dicts/lists/tuples equal: everything but floats exactly; a float leaf ``b`` within ``abs + rel |a|``
    of ``a`` (default 0: bit for bit, for results of the same computation), or, when a regular expression of
    ``bounds`` matches its path (``re.search``, the first that does), within ``bounds[pattern](a)``: the derived
    bound its caller states. ``path`` names the first difference."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close_tree(a[k], b[k], f"{path}.{k}", rel=rel, abs=abs, bounds=bounds)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_tree(x, y, f"{path}[{i}]", rel=rel, abs=abs, bounds=bounds)
    elif isinstance(a, float) and isinstance(b, float):
        allowed = next((fn(a) for pattern, fn in (bounds or {}).items() if re.search(pattern, path)),
                       abs + rel * builtins.abs(a))
        assert a == b if allowed == 0 else builtins.abs(a - b) <= allowed, (path, a, b, allowed)
    else:
        assert a == b, path


def merged_sum_bounds(n_batches: int, heads: int = 1, log_amplitude: float | None = None, n_bins: int = 10
                      ) -> dict[str, Callable[[float], float]]:
    """``assert_close_tree`` bounds for a probe's or a robustness suite's result on several ranks against one
    process on the same batches. Each batch's float64 contribution to a measure's state sums is the same bits on
    either side (the whole batch on one rank, the same kernels); the sums add them in another order (a rank's
    batches, then the all-reduce; or all in turn): each within (B - 1) u sum_b |terms| of the exact sum, so
    s = 2 (B - 1) u apart. Per leaf (u = 2^-53):

    - means of terms >= 0 over an exact count (attention entropy and distance per head, class-token mass, ratio of
      norms, feature variance, calibration's NLL, Brier and per-bin confidence): (s + 2 u) |a| (each side's
      division); a per-layer ``value`` averages the ``heads`` heads in Python: 2 heads u more;
    - minibatch CKA, XY / sqrt(XX YY) of HSIC sums: XX, YY sum terms >= 0, and |XY_b| <= sqrt(XX_b YY_b) per
      batch so sum_b |XY_b| <= sqrt(XX YY) (Cauchy-Schwarz twice, to first order): s (1 + |c|) + 5 u |c| (the
      product, sqrt and division on each side);
    - the Fourier curve, mean_k - mean_0 of sums of log amplitudes of either sign, each |log| <= ``log_amplitude``
      (the caller's bound): 2 (s + 2 u) L + 2 u |a|;
    - calibration: the mean confidence sums ``n_bins`` merged bin sums (2 n_bins u more); ECE and signed ECE weigh
      per-bin gaps whose confidence moves by (s + 2 u) conf_b <= s + 2 u (the accuracies are exact counts), and
      sum n_bins terms with 2 roundings each on either side: (s + 2 u) + 2 (n_bins + 2) u |ECE| (|signed ECE|:
      ECE <= 1 in its place); MCE (s + 2 u) + 2 u.

    Everything else (hit counts / n, bin counts, adaptive ECE of the same sorted confidences, eigenvalues) is
    exact and not listed."""
    u = 2.0**-53
    s = 2 * (n_batches - 1) * u
    mean = s + 2 * u
    bounds: dict[str, Callable[[float], float]] = {
        r"attention_(entropy|distance)\.rows\[\d+\]\.(heads|class_token_mass_heads)\[\d+\]$": lambda a: mean * abs(a),
        r"attention_(entropy|distance)\.rows\[\d+\]\.(value|class_token_mass)$":
            lambda a: (mean + 2 * heads * u) * abs(a),
        r"ratio_of_norms\.rows\[\d+\]\.(spatial|cls)$": lambda a: mean * abs(a),
        r"feature_variance\.rows\[\d+\]\.value$": lambda a: mean * abs(a),
        r"cka\.(matrix\[\d+\]\[\d+\]|rows\[\d+\]\.value)$": lambda a: s * (1 + abs(a)) + 5 * u * abs(a),
        r"calibration\.(nll|brier|reliability\[\d+\]\.confidence)$": lambda a: mean * abs(a),
        r"calibration\.mean_confidence$": lambda a: (mean + 2 * n_bins * u) * abs(a),
        r"calibration\.ece$": lambda a: mean + 2 * (n_bins + 2) * u * abs(a),
        r"calibration\.signed_ece$": lambda a: mean + 2 * (n_bins + 2) * u,
        r"calibration\.mce$": lambda a: mean + 2 * u,
    }
    if log_amplitude is not None:
        bounds[r"fourier\.rows\[\d+\]\.(curve\[\d+\]|value)$"] = \
            lambda a: 2 * mean * log_amplitude + 2 * u * abs(a)
    return bounds


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache, hub_id: str, state: dict, architecture: str, num_classes: int = 1000):
    """``cache/models--ORG--NAME/{refs/main, snapshots/HUB_COMMIT/{model.safetensors, config.json}}`` (the layout
    huggingface_hub reads offline, so timm's ``pretrained=True`` loads ``state`` for ``hub_id``); returns the
    weights' path."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    repo = Path(cache) / ("models--" + hub_id.replace("/", "--"))
    snap = repo / "snapshots" / HUB_COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"architecture": architecture, "num_classes": num_classes}))
    return snap / "model.safetensors"


def one_line_error(capsys, argv: list[str], *patterns: str) -> str:
    """``vitscope ARGV`` exits 2 with one stderr line (no traceback) containing every pattern; returns it."""
    from vitscope.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for pattern in patterns:
        assert pattern in err, err
    return err


def register_nan_model(nan_after: int) -> str:
    """Register (once) and name a timm model: a linear head on the mean image that returns NaN from its
    ``nan_after + 1``-th training forward on (eval forwards stay finite)."""
    import timm
    import torch.nn as nn

    name = f"_vitscope_test_nan_after_{nan_after}"
    if timm.is_model(name):
        return name

    def create(pretrained=False, num_classes=10, **kwargs):
        class NanAfter(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Linear(3, num_classes)
                self.calls = 0
                self.pretrained_cfg = {"input_size": (3, 32, 32)}

            def forward(self, x):
                out = self.head(x.mean((2, 3)))  # (B, C)
                if self.training:
                    self.calls += 1
                    if self.calls > nan_after:
                        out = out * float("nan")
                return out

        return NanAfter()

    create.__name__ = name
    timm.models.register_model(create)
    return name


def count_host_reads(monkeypatch, methods: tuple[str, ...]) -> list[str]:
    """Wrap the Tensor ``methods`` that read device data on the host (each a sync on a GPU) so that every call,
    from any code (torch, timm, vitscope), is appended to the returned list; ``monkeypatch`` undoes it."""
    import torch

    calls: list[str] = []
    for name in methods:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def spy_models(monkeypatch) -> list:
    """Every network ``vitscope.models.create_model`` builds (also as the loaders of ``vitscope.io`` call it), with
    the (training?, input) of each of its forwards."""
    import vitscope.io.checkpoints as checkpoints
    import vitscope.io.weights as weights
    import vitscope.models as models

    built: list = []
    real = models.create_model

    def spying(*a, **kw):
        m = real(*a, **kw)
        seen: list = []  # (training?, input tensor)
        m.register_forward_pre_hook(lambda mod, inp: seen.append((mod.training, inp[0].detach().clone())))
        built.append((m, seen))
        return m

    for module in (models, checkpoints, weights):
        monkeypatch.setattr(module, "create_model", spying)
    return built


def ref_hsic1(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC_1 (Song et al. 2012; METHODS.md), written out term by term."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    one = np.ones(n)
    term = np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
    term -= 2.0 / (n - 2) * (one @ K @ L @ one)
    return term / (n * (n - 3))


def gram_cka_bound(batches, u=2.0**-24, centre=True):
    """The derived worst case of a Gram formed in precision u (linear_gram's docstring): rho = sqrt(sum_b
    tr(K_b)^2 / (n_b (n_b - 3)) / sum_b HSIC_1(K_b, K_b)), K_b the Gram of the (centred) float64 features, and
    eps = gamma_(D+2) = (D+2) u / (1 - (D+2) u): the CKA moves by at most asin(min(1, eps rho)) per side."""
    d = batches[0].shape[1]
    eps = (d + 2) * u / (1 - (d + 2) * u)
    num = den = 0.0
    for x in batches:
        n = x.shape[0]
        xc = x - x.mean(0) if centre else x
        K = xc @ xc.T
        num += np.trace(K) ** 2 / (n * (n - 3))
        den += ref_hsic1(K, K)
    return float(np.arcsin(min(1.0, eps * np.sqrt(num / den))))


def exact_t_tail(t: float, df: float):
    """P(T > |t|) for Student's t to 40 digits (an mpf): mpmath's regularized incomplete beta, 0.5 I_x(df/2, 1/2),
    x = df / (df + t^2)."""
    import mpmath as mp

    with mp.workdps(40):
        x = mp.mpf(df) / (df + mp.mpf(t) ** 2)
        return mp.betainc(mp.mpf(df) / 2, mp.mpf(0.5), 0, x, regularized=True) / 2


def t_tail_bound(t: float, df: float) -> float:
    """|vitscope.studies.tdist's tail 0.5 I_x(a, b) - the exact tail| (a = df/2, b = 1/2), from the operations tdist
    runs: x = df / (df + t t) carries 3 u, which moves I by 3 u x f(x) (f the beta density, I's derivative); the
    part computed as exp(ln_front) cf / a (J: I, or 1 - I past the switch (a + 1) / (a + b + 2)) carries: lgamma's
    errors (measured against mpmath at the three arguments), 7 u per |term| of ln_front (two logs within 1 ulp and
    their products, four sums), exp's ulp, the fraction's stopping rule eps = 1e-15 and ~26 u per Lentz iteration
    (13 roundings in each half step), at most 500 (the code's cap; ~35 at most here), the division by a; past the
    switch 1 - J adds u. (x's 3 u interval moves the density by a relative < 1e-12 here: taken at x.)"""
    import math

    import mpmath as mp

    U = 2.0**-53
    if t == 0:
        return 0.0  # x = 1 exactly: I = 1, the tail 0.5, exactly
    a, b = df / 2.0, 0.5
    with mp.workdps(40):
        x = mp.mpf(df) / (df + mp.mpf(t) ** 2)
        i_exact = 2 * exact_t_tail(t, df)
        density = mp.exp((a - 1) * mp.log(x) + (b - 1) * mp.log1p(-x) - mp.log(mp.beta(a, b)))
        lg_err = sum(abs(mp.mpf(math.lgamma(y)) - mp.loggamma(y)) for y in (a + b, a, b))
        switch = x >= mp.mpf(a + 1) / (a + b + 2)
        j = 1 - i_exact if switch else i_exact
        terms = sum(abs(v) for v in (math.lgamma(a + b), math.lgamma(a), math.lgamma(b), a * float(mp.log(x)),
                                     b * float(mp.log1p(-x))))
        rho = float(lg_err) + 7 * U * terms + 2 * U + 2e-15 + 26 * 500 * U + 2 * U
        return 0.5 * float(j * rho + 3 * U * x * density) + (0.5 * U if switch else 0.0)


def ridge_trace_bound(x, sizes, feat_err=None) -> float:
    """A bound on |tr(S) - tr(S')| for x (n, D) float64 rows: S is RidgeFit's centred scatter (batches of ``sizes``
    centred on their own means, merged by Chan et al.'s update), S' a float64 two-pass sum of the squares of
    x - mean(x) in any order. Each side: squares of differences 3 u relative, sums gamma_(n D); a mean's error
    delta <= gamma_(n + 3k) max|x| enters a batch's own scatter only as n_b delta^2 (the centred rows sum to 0) but
    each merge's w d d' to first order, 2 w |d| eps with eps <= 2 delta, and sum w |d| <= sqrt(n tr S) per feature
    (Cauchy-Schwarz). ``feat_err`` (D,): a bound on how far either side's copy of a feature may be from the other's
    (their x differ by <= e_j per entry: the trace moves by <= 4 sum_ij |xc_ij| e_j + 4 n sum_j e_j^2)."""
    u = 2.0**-53
    n, d = x.shape
    k = len(sizes)
    xc = x - x.mean(0)
    tr = float((xc**2).sum())
    delta = (n + 3 * k) * u * float(np.abs(x).max())
    ours = (n + 3 * k + d + 6) * u * tr + 4 * delta * np.sqrt(n * d * tr) + n * d * delta**2
    ref = (n * d + 4) * u * tr + n * d * (n * u * float(np.abs(x).max())) ** 2
    err = 0.0
    if feat_err is not None:
        err = 4 * float((np.abs(xc) * feat_err).sum()) + 4 * n * float((feat_err**2).sum())
    return ours + ref + err


def hsic_magnitude(fx, fy) -> float:
    """HSIC_1's formula on |X||X|^T and |Y||Y|^T with every term counted positive: the centred Grams' entries are
    at most A_ij + (a_i + a_j) / (n - 2) + sum(A) / ((n - 1)(n - 2)) (a = row sums of A, zero diagonal), and this
    sum of their products also dominates the trace, product-of-sums and 1^T K L 1 terms of the peer's form."""
    n = len(fx)

    def mag(f):
        f = np.abs(np.asarray(f, dtype=np.float64).reshape(n, -1))
        a = f @ f.T
        np.fill_diagonal(a, 0.0)
        r = a.sum(1)
        return a + (r[:, None] + r[None, :]) / (n - 2) + a.sum() / ((n - 1) * (n - 2))

    return float((mag(fx) * mag(fy)).sum()) / (n * (n - 3))


def minibatch_cka_bound(batches_x, batches_y):
    """(Lx, Ly): how far a float64 minibatch CKA (float64 Grams of the features as given, HSIC_1 summed over the
    batches of n > 3, xy / sqrt(xx yy)), ours or ref_hsic1's term-by-term form, may be from the exact value of the
    same features. Each batch's HSIC_1 is within gamma_m M of the exact one, M = hsic_magnitude: both Grams'
    products of D terms (2 gamma_D, HSIC being bilinear), then sums of at most 3 n^2 terms and a few divisions;
    summing the B batches adds gamma_B; m = 2 D + 3 n^2 + 16 + B covers it. CKA = xy / sqrt(xx yy) then moves by
    |CKA| (e_xy / |xy| + e_xx / 2 xx + e_yy / 2 yy + 3 u). ``batches_*``: list over batches of list over layers of
    (n, ...) float64 arrays or tensors."""
    u = 2.0**-53
    keep = [(bx, by) for bx, by in zip(batches_x, batches_y) if len(bx[0]) > 3]
    flat = [([np.asarray(f, dtype=np.float64).reshape(len(f), -1) for f in bx],
             [np.asarray(f, dtype=np.float64).reshape(len(f), -1) for f in by]) for bx, by in keep]
    width = max(f.shape[1] for bx, by in flat for f in bx + by)
    n_max = max(len(bx[0]) for bx, _ in flat)
    m = 2 * width + 3 * n_max**2 + 16 + len(flat)
    gam = m * u / (1 - m * u)
    lx, ly = len(flat[0][0]), len(flat[0][1])
    xy, xx, yy = np.zeros((lx, ly)), np.zeros(lx), np.zeros(ly)  # HSIC sums over the batches
    exy, exx, eyy = np.zeros((lx, ly)), np.zeros(lx), np.zeros(ly)  # their error bounds
    for bx, by in flat:
        ks, ls = [f @ f.T for f in bx], [f @ f.T for f in by]
        for i in range(lx):
            xx[i] += ref_hsic1(ks[i], ks[i])
            exx[i] += gam * hsic_magnitude(bx[i], bx[i])
            for j in range(ly):
                xy[i, j] += ref_hsic1(ks[i], ls[j])
                exy[i, j] += gam * hsic_magnitude(bx[i], by[j])
        for j in range(ly):
            yy[j] += ref_hsic1(ls[j], ls[j])
            eyy[j] += gam * hsic_magnitude(by[j], by[j])
    ref = xy / np.sqrt(np.outer(xx, yy))
    return np.abs(ref) * (exy / np.abs(xy) + (exx[:, None] / xx[:, None] + eyy[None, :] / yy[None, :]) / 2 + 3 * u)


def attention_sum_rtol(a) -> float:
    """Library vs numpy loops: every measure here is a float64 mean of terms >= 0 (p log p, p times a distance,
    prefix mass), each within 6 u of its exact value (log or hypot and its scalings, the product, a renormalising
    division); the two add the M = B N^2 terms in different orders, each sum within (M - 1) u of the exact one, a
    renormalised row's sum of N terms adds N u, the final division u: 2 (M + N + 6) u between them."""
    B, _, N, _ = a.shape
    return 2 * (B * N * N + N + 6) * 2.0**-53


def ratio_bound(z):
    """Float32 inputs are exact in float64, where both sides compute: each norm of D entries within (D + 1) 2^-53
    (two per ratio and the division), then the means of the B N ratios > 0, within (B N) 2^-53 each side."""
    B, D = z.shape[0], z[0].numel() if z.ndim == 4 else z.shape[-1]
    N = 1 if z.ndim == 4 else z.shape[1]
    return (2 * B * N + 2 * (D + 2) + 2) * 2.0**-53


def variance_bound(x, ddof: int, batches: int = 1, prefix_squares: float = 0.0) -> float:
    """Relative bound on |vitscope - numpy| for the mean over (example, channel) of the variance over positions.

    vitscope's one pass T = Q - sum_bc s_bc^2 / S: Q (N = B C S squares >= 0, plus the prefix tokens' squares
    P2 subtracted again when read in place) within (N + 2) u (Q + P2); each s_bc within gamma_S A_bc (A_bc =
    sum|x|), so s^2 / S within (2 gamma_S A_bc |s_bc| + 2 u s_bc^2) / S; their sum of B C terms adds
    gamma_BC sum s^2 / S. Over T this is the cancellation factor 1 + mean^2 / var. The divisions, the
    subtraction and the batches' sum add (batches + 4) u. numpy's two passes: the mean within e_bc = gamma_S
    A_bc / S + u |m|, moving sum d^2 only by S e^2 (sum d = 0; summed over channels, so a constant channel adds
    its S e^2 and no 0 / 0), the deviations' squares and sum (S + 3) u, the mean over B C (B C + 1) u."""
    u = 2.0**-53
    x = np.asarray(x, dtype=np.float64)
    B, C = x.shape[:2]
    xs = x.reshape(B, C, -1)
    S = xs.shape[-1]
    N = xs.size
    Q = (xs**2).sum()
    s = xs.sum(-1)
    A = np.abs(xs).sum(-1)
    T = Q - (s**2).sum() / S
    err = (N + 2) * u * (Q + prefix_squares) + ((2 * S * u * A * np.abs(s) + 2 * u * s**2) / S).sum() \
        + B * C * u * (s**2).sum() / S
    d2 = ((xs - xs.mean(-1, keepdims=True)) ** 2).sum(-1)
    e = u * A + u * np.abs(s / S)  # gamma_S A / S + u |m|
    rel_np = (S + 3 + B * C + 1) * u + (S * e**2).sum() / d2.sum()  # channels' absolute S e^2 over the total
    return err / T + (batches + 4) * u + rel_np


def cal_atol(logits) -> float:
    """Two float64 evaluations of a calibration number (vitscope vs the numpy reference, streamed vs one shot,
    merged vs whole). Each is a mean over n examples of terms in [0, 2] (confidence, correctness, the squared error
    of the probability vector, a bin's |sum of correctness - confidence|): a float64 sum of n such terms is within
    gamma_n of 2n, i.e. 2 n u after the division by n; each term comes from a float64 softmax within (C + 4) u (C
    exps, their sum, a division), and the NLL's log-softmax is within u |z|max more. So each side is within
    (2n + C + 8 + |z|max) u of the exact value, and the two within twice that. (No confidence lies within a few u
    of a bin edge other than 1.0, which both put in the last bin, so the bins hold the same examples.)"""
    n, c = logits.shape
    return 2 * (2 * n + c + 8 + float(logits.abs().max())) * 2.0**-53


def fourier_bound(x, batches: int = 1):
    """(F,) bound on |vitscope - numpy reference| for the relative log amplitude of maps ``x`` (B, C, h, w).

    Each coefficient c = sum_s x_s w_s at (k, k), on either side: vitscope's float64 DFT matmul and the loop
    reference are S-term dot products with twiddles w_s within tau u of exact (a phase below 2 pi (h + w) from
    three roundings, then cos/sin: tau = 6 pi (h + w) + 2), so within (S + tau) u sum|x| <= (S + tau) u
    sqrt(S) ||x||_2; numpy's FFT2 is within 11 log2(S) u sqrt(S) ||x||_2 of it (Higham, Accuracy and Stability,
    Thm 24.2: log2 n eta ||y||_2, eta = mu + gamma_4 (sqrt 2 + mu) <= 11 u, taken for pocketfft's mixed radices,
    ||y||_2 = sqrt(S) ||x||_2 by Parseval). delta = the sum of both covers either reference; hypot of two parts
    within delta each moves |c| by <= 2 delta + u |c|. log(|c| + 1e-6) then moves by that over |c| - 4 delta +
    1e-6 (the cancellation factor sum|x| / |c|) plus 2 u |L| of its own roundings, on each side. The means of
    B C logs of either sign in another order add 2 gamma_(B C + batches) mean|L| and the quotient u; the
    difference to frequency 0 adds entry 0's error and u |out|."""
    import math

    U = 2.0**-53
    x = np.asarray(x, dtype=np.float64)
    B, C, h, w = x.shape
    S = h * w
    F = min(h - h // 2, w - w // 2)
    k = np.arange(F)
    c = np.abs(np.fft.fft2(x))[..., k, k]  # (B, C, F)
    tau = 6 * math.pi * (h + w) + 2
    delta = (S + tau + 11 * math.ceil(math.log2(max(S, 2)))) * U * math.sqrt(S) * np.linalg.norm(
        x.reshape(B, C, -1), axis=-1)[..., None]  # (B, C, 1)
    assert (c - 4 * delta > -1e-6).all(), "a coefficient too close to 0 for this bound"
    L = np.log(c + 1e-6)
    per = (4 * delta + 2 * U * c) / (c - 4 * delta + 1e-6) + 4 * U * (np.abs(L) + 1)  # both sides
    mean_err = per.mean((0, 1)) + 2 * (B * C + batches + 2) * U * np.abs(L).mean((0, 1))  # (F,)
    out = L.mean((0, 1))
    return mean_err + mean_err[0] + U * np.abs(out - out[0])
