"""The verdict test of the study recipes (vitscope.studies.verdict) against scipy.stats and mpmath (the t
distribution to 40 digits) as independent references, and by simulation: at most 5% false "held" with no effect,
power that grows with the seeds, Holm's family-wise control over a study's claims."""
from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
from numpy.polynomial import hermite_e
from scipy import stats

from _helpers import exact_t_tail, t_tail_bound
from vitscope.studies.verdict import (
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    Verdict,
    decide,
    holm,
    holm_adjust,
    holm_levels,
    paired_test,
    seeds_needed,
    t_cdf,
    t_power,
    t_ppf,
    to_markdown,
    welch_power,
)

U = 2.0**-53


def _cdf_bound(t: float, df: float) -> float:
    """|t_cdf(t, df) - the exact cdf|: the tail's bound, plus u/2 for 1 - tail when t > 0."""
    return t_tail_bound(t, df) + (0.5 * U if t > 0 else 0.0)


def _exact_ppf(q: float, df: float) -> tuple[mp.mpf, mp.mpf]:
    """The exact q quantile t* of Student's t (40 digits, a root of the exact cdf) and the density there."""
    with mp.workdps(40):
        def cdf(s):
            tail = exact_t_tail(s, df)
            return 1 - tail if s > 0 else tail

        root = mp.findroot(lambda s: cdf(s) - mp.mpf(q), mp.mpf(float(stats.t.ppf(q, df))))
        dens = (mp.gamma((mp.mpf(df) + 1) / 2) / (mp.sqrt(df * mp.pi) * mp.gamma(mp.mpf(df) / 2))
                * (1 + root**2 / df) ** (-(mp.mpf(df) + 1) / 2))
        return root, dens


def _ppf_bound(q: float, df: float, root: mp.mpf, dens: mp.mpf) -> float:
    """|t_ppf(q, df) - t*|: bisection stops at hi - lo <= 1e-13 max(1, hi) and returns the midpoint (half that,
    u |t| for the midpoint's rounding); it brackets a crossing of our cdf, which lies within our cdf's error / the
    density of t*; q < 0.5 is solved as -t_ppf(1 - q), 1 - q within u/2."""
    t = abs(float(root))
    err_cdf = _cdf_bound(t, df) + (0.5 * U if q < 0.5 else 0.0)
    return 0.5e-13 * max(1.0, t) * (1 + 1e-12) + U * t + err_cdf / float(dens)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 19, 120])
def test_t_distribution_equals_the_exact_one(df):
    for t in (-25.0, -3.1, -1.0, -0.2, 0.0, 0.4, 1.7, 4.3, 40.0):
        tail = exact_t_tail(t, df)
        exact = float(1 - tail if t > 0 else tail)
        assert abs(t_cdf(t, df) - exact) <= _cdf_bound(t, df), (t, t_cdf(t, df) - exact, _cdf_bound(t, df))
    for q in (0.01, 0.2, 0.5, 0.8, 0.975, 0.999):
        root, dens = _exact_ppf(q, df)
        bound = _ppf_bound(q, df, root, dens)
        assert abs(t_ppf(q, df) - float(root)) <= bound, (q, t_ppf(q, df) - float(root), bound)


def _mean_se(x: np.ndarray) -> tuple[float, float, float, float]:
    """numpy's mean and standard error sqrt(var(ddof=1) / n) of x (the computation scipy's t tests run), and the
    bounds on how far another float64 evaluation of each lies: the means (n - 1 sums, a division, each within u
    sum|x|) within 2 n u mean|x|; the standard errors relatively within (n + 9) u + n dm^2 / SS (dm = n u mean|x|
    the means' errors, which the centred sum of squares SS only sees squared; per side, n centred squares within
    3 u and their sum within (n - 1) u, the division by n - 1, sqrt's halving, the division / sqrt by n)."""
    n = len(x)
    mean, var = float(np.mean(x)), float(np.var(x, ddof=1))
    dm = n * U * float(np.abs(x).mean())
    return mean, math.sqrt(var / n), 2 * dm, (n + 9) * U + n * dm**2 / ((n - 1) * var)


def test_paired_and_one_sample_tests_equal_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 9):
        a, b = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
        res = paired_test(a.tolist(), b.tolist())
        ref = stats.ttest_rel(a, b)
        assert res.method == "paired t" and res.n == n and res.df == n - 1
        # mean of the n differences d_i = a_i - b_i (each one rounding, u |d_i|) summed in another order (gamma_n
        # sum|d| each side) and divided by n: within 2 (n + 2) u mean|d| of each other
        d_ab = a - b
        assert res.effect == pytest.approx(float(np.mean(d_ab)), rel=0,
                                           abs=2 * (n + 2) * 2.0**-53 * float(np.abs(d_ab).mean()))
        mean, se, mean_err, se_rel = _mean_se(d_ab)
        assert abs(res.se - se) <= se_rel * se
        # t = |effect| / se (recomputed as the library does, bit for bit) against scipy's statistic: the relative
        # errors of the mean and of se, and the two divisions
        t = abs(res.effect) / res.se
        assert abs(t - abs(ref.statistic)) <= (mean_err / abs(mean) + se_rel + 2 * U) * abs(ref.statistic)
        # p = 2 (1 - t_cdf(t)): 1 - tail rounds (u/2), the rest is exact (Sterbenz, a doubling): against the exact p
        # at the same t within twice the tail's bound and u
        assert abs(res.p - 2 * float(exact_t_tail(t, n - 1))) <= 2 * t_tail_bound(t, n - 1) + U
        # the 95% interval: numpy's mean -+ the exact quantile times numpy's se, within the mean's error, our
        # quantile's error times se, the quantile times se's error, and the product's and the sum's roundings
        root, dens = _exact_ppf(0.975, n - 1)
        q = float(root)
        ci_err = (mean_err + _ppf_bound(0.975, n - 1, root, dens) * res.se + q * se_rel * se
                  + U * (2 * q * res.se + abs(mean)))
        assert abs(res.ci_low - (mean - q * se)) <= ci_err and abs(res.ci_high - (mean + q * se)) <= ci_err
        # one-sample against 0.1: ours tests the rounded a_i - 0.1 (u |d_i| each: the mean moves by u mean|d|, the
        # centred sum of squares SS by 2 u sqrt(sum d^2 SS)), scipy mean(a) - 0.1 with var(a)
        one = paired_test(a.tolist(), [0.1])
        ref1 = stats.ttest_1samp(a, 0.1)
        assert one.method == "one-sample t"
        d1 = np.array([x - 0.1 for x in a.tolist()])
        m_a, _, m_a_err, se1_rel = _mean_se(a)
        ss = float(np.var(a, ddof=1)) * (n - 1)
        rel1 = ((m_a_err + U * float(np.abs(d1).mean()) + U * abs(m_a - 0.1)) / abs(m_a - 0.1) + se1_rel
                + U * math.sqrt(float(np.sum(d1**2)) / ss) + 2 * U)
        t1 = abs(one.effect) / one.se
        assert abs(t1 - abs(ref1.statistic)) <= rel1 * abs(ref1.statistic)
        assert abs(one.p - 2 * float(exact_t_tail(t1, n - 1))) <= 2 * t_tail_bound(t1, n - 1) + U
        # the exact sign-flip p: scipy's permutation test over all 2^n sign patterns; both are counts over 2^n
        # (exact quotients; scipy's 2 min(p_less, p_greater) doubles exactly), the only ties the pattern itself
        # and its negation, which both count
        perm = stats.permutation_test((d_ab,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                      alternative="two-sided")
        assert res.p_signflip == perm.pvalue


def test_pairing_by_seed_matters():
    # a seed-shared offset dominates: unpaired spreads overlap, the paired differences are all about +0.01
    # (issue 20: with exactly equal differences t is undefined and the exact test decides, so they vary a little)
    base = [0.1, 0.5, 0.9, 0.3]
    a = [x + e for x, e in zip(base, (0.01, 0.011, 0.012, 0.0105))]
    assert decide(a, base, "greater")[0] == HELD
    assert decide(a, base, "less")[0] == NOT_HELD
    assert decide(a, base, "greater", paired=False)[0] == INCONCLUSIVE  # Welch: the seed offsets are noise


def test_decide_edge_cases():
    assert decide([0.9], [0.1], "greater")[0] == INCONCLUSIVE  # one seed
    assert "one seed" in decide([0.9], [0.1], "greater")[1]
    assert decide([float("nan"), 1.0], [0.0, 0.1], "greater")[0] == INCONCLUSIVE
    # no spread (issue 20: was "held" with t = inf, p = 0): the exact sign-flip test decides, 0.25 at 3 seeds
    verdict, reason = decide([0.3, 0.3, 0.3], [0.0], "greater")
    assert verdict == INCONCLUSIVE and "exact sign-flip" in reason and "no distribution-free test" in reason
    assert decide([1 / 6] * 3, [0.0], "greater")[0] == INCONCLUSIVE  # the example
    assert decide([1 / 6] * 3, [1 / 6 - 1e-17] * 3, "greater")[0] == INCONCLUSIVE  # rounding-level spread
    assert decide([0.3] * 6, [0.0], "greater")[0] == HELD  # 2 / 2^6 = 0.031 < 0.05
    assert paired_test([0.3] * 6, [0.0]).p == 2 / 64  # the two sign patterns of six equal values of 2^6, exact
    with pytest.raises(ValueError, match="expect"):
        decide([1.0, 2.0], [0.0], "bigger")
    with pytest.raises(ValueError, match="equal numbers of seeds"):
        decide([1.0, 2.0, 3.0], [0.0, 1.0], "greater")
    verdict, reason = decide([0.1, 0.3, -0.05], [0.0], "greater")
    assert verdict == INCONCLUSIVE and "95% CI" in reason and "seeds" in reason


def _trapezoid_terms(df: int, crit: float, delta: float, p: int) -> list[float]:
    """The first p terms of the trapezoid rule's error in t_power (401 points on [0, b], b = sqrt(df) + 10) by
    Euler-Maclaurin: T - I = sum_k B_2k h^2k / (2k)! (f^(2k-1)(b) - f^(2k-1)(0)), f(u) = g(u) phi(u), g the chi
    density u^m e^(-u^2/2) / N (m = df - 1), phi(u) = Phi(delta - a u) + Phi(-delta - a u), a = crit / sqrt(df). At b
    every derivative is ~e^(-50); at 0, g's j-th derivative is j! times u^j's Taylor coefficient ((-1/2)^i / (i! N)
    at j = m + 2i), phi's odd ones -2 a^j He_(j-1)(delta) pdf(delta) (He the probabilists' Hermite polynomials), its
    even ones 0 (phi(0) = 1)."""
    m, norm = df - 1, 2 ** (df / 2 - 1) * math.gamma(df / 2)

    def g(j: int) -> float:
        i, odd = divmod(j - m, 2)
        return 0.0 if j < m or odd else math.factorial(j) * (-0.5) ** i / math.factorial(i) / norm

    a, pdf = crit / math.sqrt(df), stats.norm.pdf(delta)

    def phi(j: int) -> float:
        if j % 2 == 0:
            return 1.0 if j == 0 else 0.0
        return -2 * a**j * hermite_e.hermeval(delta, [0] * (j - 1) + [1]) * pdf

    h = (math.sqrt(df) + 10.0) / 400
    bernoulli = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730, 7 / 6)  # B_2 .. B_14
    return [-bernoulli[k - 1] / math.factorial(2 * k) * h ** (2 * k)
            * sum(math.comb(2 * k - 1, j) * g(j) * phi(2 * k - 1 - j) for j in range(2 * k))
            for k in range(1, p + 1)]


def _exact_power(df: int, crit: float, delta: float) -> float:
    """The integral t_power approximates, over the same [0, sqrt(df) + 10], to 40 digits (mpmath's quadrature)."""
    with mp.workdps(40):
        b, c = mp.sqrt(df) + 10, mp.mpf(crit) / mp.sqrt(df)
        log_norm = (mp.mpf(df) / 2 - 1) * mp.log(2) + mp.loggamma(mp.mpf(df) / 2)
        d = mp.mpf(delta)

        def f(u):
            return mp.exp((df - 1) * mp.log(u) - u * u / 2 - log_norm) * (mp.ncdf(d - c * u) + mp.ncdf(-d - c * u))

        return float(mp.quad(f, [0, b / 4, b / 2, b]))


def _power_float_bound(df: int, crit: float, delta: float) -> float:
    """The float64 error of t_power's sum at its own crit: each of the 401 values f_i = dens_i phi_i relatively
    within rho_i = u (3 E_i + 4 (2 z_i + 2) w_i + 8) (E_i the sum of |terms| of dens' exponent with lgamma's
    measured error, 3 u each for a log/product and the sums; z_i, w_i the erfc arguments and their |summands|: 4
    roundings of the argument, erfc's log-derivative <= 2 z + 2, erfc and exp within ~2 ulp), so h sum rho_i f_i;
    the trapezoid's sum of 400 terms >= 0 within 402 u of the total; linspace's nodes round (u b each), which moves
    the sum by at most 2 u b times f's total variation (<= 2 max f)."""
    u = np.linspace(0.0, math.sqrt(df) + 10.0, 401)
    h = u[1] - u[0]
    log_norm = (df / 2 - 1) * math.log(2.0) + math.lgamma(df / 2)
    lg_err = float(abs(mp.mpf(math.lgamma(df / 2)) - mp.loggamma(mp.mpf(df) / 2)))
    with np.errstate(divide="ignore", invalid="ignore"):
        logu = np.where(u > 0, np.log(u), 0.0)
    e = (df - 1) * np.abs(logu) + u * u / 2 + abs(log_norm)
    f = np.exp((df - 1) * logu - u * u / 2 - log_norm) if df > 1 else np.exp(-u * u / 2 - log_norm)
    x = crit * u / math.sqrt(df)
    z = (np.abs(x) + abs(delta)) / math.sqrt(2)
    erfc = np.vectorize(math.erfc)
    f = f * 0.5 * (erfc((x - delta) / math.sqrt(2)) + erfc((x + delta) / math.sqrt(2)))
    rho = U * (3 * e + 4 * (2 * z + 2) * z + 8) + lg_err
    return float(h * np.sum(rho * f)) + 402 * U * float(h * np.sum(f)) + 4 * U * float(u[-1] * f.max())


def test_power_and_seeds_needed_against_noncentral_t():
    for es in (0.3, 0.8, 1.5):
        for n in (2, 3, 5, 12):
            crit = t_ppf(0.975, n - 1)  # the library's own critical value: the reference integrates at the same one
            delta = es * math.sqrt(n)
            # the quadrature's own error predicted to its h^10 term (up to 5e-4 at n = 2); what is left is the rest of
            # the series, at most twice its h^12 term as the terms shrink by 2x or more from there on (checked on the
            # next one; ~30x here), and the float64 evaluation (~1e-14)
            terms = _trapezoid_terms(n - 1, crit, delta, 7)
            assert abs(terms[6]) <= abs(terms[5]) / 2
            residual = t_power(es, n) - _exact_power(n - 1, crit, delta) - sum(terms[:5])
            assert abs(residual) <= 2 * abs(terms[5]) + _power_float_bound(n - 1, crit, delta), (es, n, residual)
        n = seeds_needed(es, 1.0)  # the fewest seeds reaching 80% power
        assert t_power(es, n) >= 0.8 > t_power(es, n - 1)
    assert seeds_needed(0.5, 1.0) == 34  # the textbook one-sample n for d = 0.5
    assert seeds_needed(0.0, 1.0) is None


def _rates(n: int, effect: float, reps: int, rng: np.random.Generator) -> dict[str, float]:
    counts = {HELD: 0, NOT_HELD: 0, INCONCLUSIVE: 0}
    for _ in range(reps):
        shared = rng.normal(0, 3, n)  # seed effects both sides share (paired away)
        a = shared + effect + rng.normal(0, 1 / math.sqrt(2), n)
        b = shared + rng.normal(0, 1 / math.sqrt(2), n)
        counts[decide(a.tolist(), b.tolist(), "greater")[0]] += 1
    return {k: v / reps for k, v in counts.items()}


def test_simulation_false_held_at_most_5_percent_and_power_grows():
    rng = np.random.default_rng(1)
    # under the null each side's rate is 0.025 (the two-sided t test at 0.05 is exact for normal differences), its
    # standard error at 800 draws sqrt(0.025 0.975 / 800) = 0.0055: the 0.05 ceiling is 4.5 SEs above it
    for n in (3, 5, 10):
        null = _rates(n, 0.0, 800, rng)
        assert null[HELD] <= 0.05 and null[NOT_HELD] <= 0.05, (n, null)
    # the exact powers are 0.18, 0.40, 0.80, 0.99 (t_power): neighbours 0.18 or more apart, >= 3.6 SEs of a
    # difference of two rates at 200 draws (each SE <= 0.035); 0.9 is 12 SEs (0.0075) below 0.99
    power = [_rates(n, 1.0, 200, rng)[HELD] for n in (3, 5, 10, 20)]  # effect = 1 SD of the differences
    assert all(p2 > p1 for p1, p2 in zip(power, power[1:])), power
    assert power[-1] > 0.9


def test_holm_equals_the_step_down_definition_and_controls_the_family():
    p = [0.01, 0.04, 0.03, math.nan, 0.005]
    adj = holm(p)
    # sorted finite: 0.005 (x4), 0.01 (x3), 0.03 (x2), 0.04 (x1), with running maxima
    # each adjusted value one float64 product k p of a decimal literal, against another literal: each of the
    # three within u relative of the real number (u = 2^-53), so within 3 u of each other
    rel3 = 3 * 2.0**-53
    assert adj[4] == pytest.approx(0.02, rel=rel3, abs=0) and adj[0] == pytest.approx(0.03, rel=rel3, abs=0)
    assert adj[2] == pytest.approx(0.06, rel=rel3, abs=0) and adj[1] == pytest.approx(0.06, rel=rel3, abs=0)
    assert math.isnan(adj[3])
    rng = np.random.default_rng(2)
    family_errors = 0
    reps = 600
    for _ in range(reps):
        vs = [Verdict.build("s", 1, f"c{i}", "a", "b", "greater", rng.normal(0, 1, 4).tolist(), [0.0])
              for i in range(4)]
        family_errors += any(v.verdict != INCONCLUSIVE for v in holm_adjust(vs))
    # Holm's family-wise rate under the complete null, four independent exact t tests: 1 - (1 - 0.05/4)^4 = 0.049
    # (its first step rejects all wrongly decided families), standard error at 600 families 0.0088: 3 SEs above it
    # (was 0.05, at the expectation itself: half the seeds would fail); without Holm 1 - 0.95^4 = 0.185, 15 SEs above
    fwer = 1 - (1 - 0.05 / 4) ** 4
    assert family_errors / reps <= fwer + 3 * math.sqrt(fwer * (1 - fwer) / reps)


def test_table_shows_effect_interval_p_and_corrected_decision():
    vs = holm_adjust([
        Verdict.build("s", 1, "strong", "a", "b", "greater", [1.0, 1.1, 1.2], [0.0, 0.1, 0.15]),
        Verdict.build("s", 2, "weak", "a", "0", "less", [0.1, -0.2, 0.05], [0.0], regime="ImageNet",
                      regime_note="here: ELPV"),
    ])
    md = to_markdown(vs, "t")
    assert "effect a − b [Holm-adjusted CI]" in md and "p (Holm)" in md and "ImageNet (here: ELPV)" in md
    # Holm over m = 2: the smaller p times 2, the other 1 * p under the running maximum: the same operations, exact
    assert vs[0].verdict == HELD and vs[0].p_holm == 2 * vs[0].p
    assert vs[1].verdict == INCONCLUSIVE and vs[1].p_holm == max(vs[1].p, vs[0].p_holm)


def test_welch_and_exact_permutation_equal_scipy():
    rng = np.random.default_rng(3)
    for na, nb in ((3, 3), (5, 5), (4, 6)):
        a, b = rng.normal(0.5, 1, na), rng.normal(0, 2, nb)
        res = paired_test(a.tolist(), b.tolist(), paired=False)
        ref = stats.ttest_ind(a, b, equal_var=False)
        assert res.method == "Welch t" and not res.paired
        ma, se_a, ma_err, rel_a = _mean_se(a)
        mb, se_b, mb_err, rel_b = _mean_se(b)
        mean, se = ma - mb, math.hypot(se_a, se_b)
        mean_err = ma_err + mb_err + 2 * U * abs(mean)  # the means' errors and each side's subtraction
        # se = sqrt(sd_a^2 / n_a + sd_b^2 / n_b): per side the variance as in _mean_se (ours squares sd back, 2 u
        # more), the sum and sqrt: relatively within max(rel_a, rel_b) + 4 u of numpy's
        se_rel = max(rel_a, rel_b) + 4 * U
        assert abs(res.se - se) <= se_rel * se
        # Welch-Satterthwaite's df = (va + vb)^2 / (va^2 / (na - 1) + vb^2 / (nb - 1)), the same formula on
        # variances va = var / n relatively within rho = 2 se_rel + u each side: 4 rho + 6 u each side, twice
        rho = 2 * se_rel + U
        assert abs(res.df - ref.df) <= 2 * (4 * rho + 6 * U) * ref.df
        t = abs(res.effect) / res.se
        assert abs(t - abs(ref.statistic)) <= (mean_err / abs(mean) + se_rel + 2 * U) * abs(ref.statistic)
        assert abs(res.p - 2 * float(exact_t_tail(t, res.df))) <= 2 * t_tail_bound(t, res.df) + U
        root, dens = _exact_ppf(0.975, res.df)  # the exact quantile at our df (compared with scipy's just above)
        q = float(root)
        ci_err = (mean_err + _ppf_bound(0.975, res.df, root, dens) * res.se + q * se_rel * se
                  + U * (2 * q * res.se + abs(mean)))
        assert abs(res.ci_low - (mean - q * se)) <= ci_err and abs(res.ci_high - (mean + q * se)) <= ci_err
        # counts over the C(na + nb, na) relabelings (exact quotients; scipy's 2 min(p_less, p_greater) doubles
        # exactly), the only tie the observed labeling itself
        perm = stats.permutation_test((a, b), lambda x, y: np.mean(x) - np.mean(y), permutation_type="independent",
                                      n_resamples=np.inf, alternative="two-sided")
        assert res.p_exact == perm.pvalue
    assert paired_test([1.0, 2.0], [0.0, 1.0, 2.0], paired=False).method == "Welch t"  # unequal seeds allowed


def test_holm_adjusted_interval_matches_the_decision_and_the_exact_interval():
    rng = np.random.default_rng(4)
    for rep in range(40):
        vs = holm_adjust([Verdict.build("s", 1, f"c{i}", "a", "b", "greater", rng.normal(mu, 1, 4).tolist(), [0.0])
                          for i, mu in enumerate((0.2, 1.5, 3.0, 5.0))])
        levels = holm_levels([v.p for v in vs])
        for v, level in zip(vs, levels):
            decided = v.verdict != INCONCLUSIVE
            assert decided == (v.ci_low > 0 or v.ci_high < 0), (v.p_holm, v.ci_low, v.ci_high)
            assert v.ci_level == 1 - level and v.ci_level >= 0.95
            if rep >= 5:
                continue  # the exact interval (40-digit quantiles) for the first 20 claims
            # numpy's mean -+ the exact quantile at the same q = 1 - level/2 times numpy's se (a - 0 = a exactly)
            q = 1 - level / 2
            root, dens = _exact_ppf(q, 3)
            mean, se, mean_err, se_rel = _mean_se(np.array(v.a_values))
            tq = float(root)
            ci_err = mean_err + _ppf_bound(q, 3, root, dens) * se * (1 + se_rel) + tq * se_rel * se + U * (
                2 * tq * se * (1 + se_rel) + abs(mean))
            assert abs(v.ci_low - (mean - tq * se)) <= ci_err and abs(v.ci_high - (mean + tq * se)) <= ci_err
    one = holm_adjust([Verdict.build("s", 1, "c", "a", "b", "greater", [0.1, 0.3, 0.2], [0.0])])[0]
    # a study of one claim: the plain 95% interval, its level 1 - (0.05 p) / p: the product and quotient within 2 u
    # of 0.05, 1 - that within half an ulp of 0.95
    assert abs(one.ci_level - 0.95) <= 0.1 * U + 0.5 * U


def test_seeds_needed_at_the_holm_level_and_with_the_direction():
    for es in (0.8, 2.0):
        for m in (3, 8):
            n = seeds_needed(es, 1.0, alpha=0.05 / m)
            assert t_power(es, n, 0.05 / m) >= 0.8 > t_power(es, n - 1, 0.05 / m)
            assert n > seeds_needed(es, 1.0)
    rng = np.random.default_rng(5)
    a = [0.4, 0.9, 0.2]  # pointing the other way for "less"
    vs = holm_adjust([Verdict.build("s", 1, "c1", "a", "0", "less", a, [0.0]),
                      Verdict.build("s", 1, "c2", "a", "0", "greater", [0.01, 0.02, 0.015], [0.0]),
                      Verdict.build("s", 1, "c3", "a", "0", "greater", [0.2, -0.1, 0.3], [0.0])])
    assert vs[0].verdict == INCONCLUSIVE and vs[0].direction == "against" and "AGAINST" in vs[0].reason
    test = paired_test(a, [0.0])
    assert vs[0].seeds_needed == seeds_needed(test.effect, test.sd, alpha=0.05 / 3)
    # 3 seeds under Holm: no exact test can decide, and the reason says so
    assert "no distribution-free test can reach p < 0.017" in vs[1].reason
    assert "seeds per side" not in to_markdown(vs)
    # Welch: per-side seeds from the Welch power, checked by simulation with scipy's Welch test
    n = seeds_needed(1.0, 0.8, sd_b=0.6)
    assert welch_power(1.0, 0.8, 0.6, n) >= 0.8 > welch_power(1.0, 0.8, 0.6, n - 1)
    sims = [stats.ttest_ind(rng.normal(1.0, 0.8, n), rng.normal(0, 0.6, n), equal_var=False).pvalue < 0.05
            for _ in range(3000)]
    assert abs(np.mean(sims) - welch_power(1.0, 0.8, 0.6, n)) < 4 * math.sqrt(0.25 / 3000)  # 4 binomial SEs


def test_simulation_discrete_metric_without_spread_is_not_proof():
    # a discrete metric (fraction of negative eigenvalues) that is +-1/6 with equal odds: mean 0 (no effect), yet
    # 1 in 4 draws of 3 seeds are all equal; the old rule (t = inf, p = 0) decided those. Every draw is one of two
    # patterns up to sign: all equal (exact p 0.25) or two against one (t's p 0.67), so none may decide
    rng = np.random.default_rng(6)
    wrong = sum(decide(rng.choice([-1 / 6, 1 / 6], 3).tolist(), [0.0], "greater")[0] != INCONCLUSIVE
                for _ in range(800))
    assert wrong == 0
    # Welch under the null, with seed offsets that do not pair across architectures: each side's rate ~0.025 (Welch
    # is near its level for these sizes), standard error at 800 draws 0.0055: the ceiling 0.05 is 4.5 SEs above
    for n in (4, 6):
        counts = {HELD: 0, NOT_HELD: 0, INCONCLUSIVE: 0}
        for _ in range(800):
            counts[decide(rng.normal(0, 1, n).tolist(), rng.normal(0, 2, n).tolist(), "greater", paired=False)[0]] += 1
        assert counts[HELD] / 800 <= 0.05 and counts[NOT_HELD] / 800 <= 0.05, counts
