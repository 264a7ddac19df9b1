"""The verdict test of the study recipes (vitscope.studies.verdict) against scipy.stats as an independent
reference, and by simulation: at most 5% false "held" with no effect, power that grows with the seeds,
Holm's family-wise control over a study's claims."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from vitscope.studies.verdict import (
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    Verdict,
    decide,
    holm,
    holm_adjust,
    paired_test,
    seeds_needed,
    t_cdf,
    t_power,
    t_ppf,
    to_markdown,
    welch_power,
)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 19, 120])
def test_t_distribution_equals_scipy(df):
    for t in (-25.0, -3.1, -1.0, -0.2, 0.0, 0.4, 1.7, 4.3, 40.0):
        assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)
    for q in (0.01, 0.2, 0.5, 0.8, 0.975, 0.999):
        assert t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9, abs=1e-12)


def test_paired_and_one_sample_tests_equal_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 9):
        a, b = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
        res = paired_test(a.tolist(), b.tolist())
        ref = stats.ttest_rel(a, b)
        ci = ref.confidence_interval(0.95)
        assert res.method == "paired t" and res.n == n
        assert res.p == pytest.approx(ref.pvalue, rel=1e-9)
        # mean of the n differences d_i = a_i - b_i (each one rounding, u |d_i|) summed in another order (gamma_n
        # sum|d| each side) and divided by n: within 2 (n + 2) u mean|d| of each other
        d_ab = a - b
        assert res.effect == pytest.approx(float(np.mean(d_ab)), rel=0,
                                           abs=2 * (n + 2) * 2.0**-53 * float(np.abs(d_ab).mean()))
        assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
        one = paired_test(a.tolist(), [0.1])
        ref1 = stats.ttest_1samp(a, 0.1)
        assert one.method == "one-sample t" and one.p == pytest.approx(ref1.pvalue, rel=1e-9)
        # the exact sign-flip p: scipy's permutation test over all 2^n sign patterns
        d = a - b
        perm = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                      alternative="two-sided")
        assert res.p_signflip == pytest.approx(perm.pvalue, rel=1e-9)


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
    assert paired_test([0.3] * 6, [0.0]).p == pytest.approx(2 / 64)
    with pytest.raises(ValueError, match="expect"):
        decide([1.0, 2.0], [0.0], "bigger")
    with pytest.raises(ValueError, match="equal numbers of seeds"):
        decide([1.0, 2.0, 3.0], [0.0, 1.0], "greater")
    verdict, reason = decide([0.1, 0.3, -0.05], [0.0], "greater")
    assert verdict == INCONCLUSIVE and "95% CI" in reason and "seeds" in reason


def _trapezoid_error(df: int, crit: float, delta: float) -> float:
    """The trapezoid rule's error in t_power (401 points on [0, sqrt(df) + 10]) by Euler-Maclaurin:
    T - I = h^2/12 (f1(b) - f1(0)) - h^4/720 (f3(b) - f3(0)) + O(h^6 f5), fk the k-th derivative of f(u) =
    g(u) phi(u), g the chi density u^m e^(-u^2/2) / N (m = df - 1), phi(u) = Phi(delta - a u) + Phi(-delta - a u),
    a = crit / sqrt(df). At b every derivative is ~e^(-50); at 0, g's k-th derivative is k! times u^k's Taylor
    coefficient (1/N at k = m, -1/(2N) at m + 2), and phi's are 1, -2 a pdf(delta), 0, -2 a^3 (delta^2 - 1) pdf(delta)
    (pdf the standard normal density)."""
    m, norm = df - 1, 2 ** (df / 2 - 1) * math.gamma(df / 2)
    g = [math.factorial(k) * (1 / norm if k == m else -0.5 / norm if k == m + 2 else 0.0) for k in range(4)]
    a, pdf = crit / math.sqrt(df), stats.norm.pdf(delta)
    phi = [1.0, -2 * a * pdf, 0.0, -2 * a**3 * (delta**2 - 1) * pdf]
    f1 = g[1] * phi[0] + g[0] * phi[1]
    f3 = g[3] * phi[0] + 3 * g[2] * phi[1] + 3 * g[1] * phi[2] + g[0] * phi[3]
    h = (math.sqrt(df) + 10.0) / 400
    return -h**2 / 12 * f1 + h**4 / 720 * f3


def test_power_and_seeds_needed_against_noncentral_t():
    for es in (0.3, 0.8, 1.5):
        for n in (2, 3, 5, 12):
            crit = stats.t.ppf(0.975, n - 1)
            ref = stats.nct.sf(crit, n - 1, es * math.sqrt(n)) + stats.nct.cdf(-crit, n - 1, es * math.sqrt(n))
            # the quadrature's own error predicted to its h^4 term (up to 5e-4 at n = 2); what is left is the h^6
            # term, h^6/30240 |f5(0)| <= 2e-9 here (|f5| ~ 10 a^5 pdf(delta), a <= 12.7), and scipy's ~1e-14
            err = _trapezoid_error(n - 1, crit, es * math.sqrt(n))
            assert t_power(es, n) - ref == pytest.approx(err, abs=1e-8)
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
    for n in (3, 5, 10):
        null = _rates(n, 0.0, 800, rng)
        assert null[HELD] <= 0.05 and null[NOT_HELD] <= 0.05, (n, null)
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
    assert family_errors / reps <= 0.05


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
        ci = ref.confidence_interval(0.95)
        assert res.method == "Welch t" and not res.paired
        assert res.p == pytest.approx(ref.pvalue, rel=1e-9) and res.df == pytest.approx(ref.df, rel=1e-12)
        assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
        perm = stats.permutation_test((a, b), lambda x, y: np.mean(x) - np.mean(y), permutation_type="independent",
                                      n_resamples=np.inf, alternative="two-sided")
        assert res.p_exact == pytest.approx(perm.pvalue, rel=1e-9)
    assert paired_test([1.0, 2.0], [0.0, 1.0, 2.0], paired=False).method == "Welch t"  # unequal seeds allowed


def test_holm_adjusted_interval_matches_the_decision_and_scipy():
    rng = np.random.default_rng(4)
    for _ in range(40):
        vs = holm_adjust([Verdict.build("s", 1, f"c{i}", "a", "b", "greater", rng.normal(mu, 1, 4).tolist(), [0.0])
                          for i, mu in enumerate((0.2, 1.5, 3.0, 5.0))])
        for v in vs:
            decided = v.verdict != INCONCLUSIVE
            assert decided == (v.ci_low > 0 or v.ci_high < 0), (v.p_holm, v.ci_low, v.ci_high)
            ci = stats.ttest_1samp(v.a_values, 0.0).confidence_interval(v.ci_level)
            assert (v.ci_low, v.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-8)
            assert v.ci_level >= 0.95
    one = holm_adjust([Verdict.build("s", 1, "c", "a", "b", "greater", [0.1, 0.3, 0.2], [0.0])])[0]
    assert one.ci_level == pytest.approx(0.95)  # a study of one claim: the plain 95% interval


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
    # 1 in 4 draws of 3 seeds are all equal; the old rule (t = inf, p = 0) decided those
    rng = np.random.default_rng(6)
    wrong = sum(decide(rng.choice([-1 / 6, 1 / 6], 3).tolist(), [0.0], "greater")[0] != INCONCLUSIVE
                for _ in range(800))
    assert wrong / 800 <= 0.05
    for n in (4, 6):  # Welch under the null, with seed offsets that do not pair across architectures
        counts = {HELD: 0, NOT_HELD: 0, INCONCLUSIVE: 0}
        for _ in range(800):
            counts[decide(rng.normal(0, 1, n).tolist(), rng.normal(0, 2, n).tolist(), "greater", paired=False)[0]] += 1
        assert counts[HELD] / 800 <= 0.05 and counts[NOT_HELD] / 800 <= 0.05, counts
