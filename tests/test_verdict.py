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
        assert res.effect == pytest.approx(float(np.mean(a - b)))
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
    # a seed-shared offset dominates: unpaired spreads overlap, the paired differences are all +0.01
    base = [0.1, 0.5, 0.9, 0.3]
    a = [x + 0.01 for x in base]
    assert decide(a, base, "greater")[0] == HELD
    assert decide(a, base, "less")[0] == NOT_HELD


def test_decide_edge_cases():
    assert decide([0.9], [0.1], "greater")[0] == INCONCLUSIVE  # one seed
    assert "one seed" in decide([0.9], [0.1], "greater")[1]
    assert decide([float("nan"), 1.0], [0.0, 0.1], "greater")[0] == INCONCLUSIVE
    assert decide([0.3, 0.3, 0.3], [0.0], "greater")[0] == HELD  # no spread, nonzero effect
    with pytest.raises(ValueError, match="expect"):
        decide([1.0, 2.0], [0.0], "bigger")
    with pytest.raises(ValueError, match="equal numbers of seeds"):
        decide([1.0, 2.0, 3.0], [0.0, 1.0], "greater")
    verdict, reason = decide([0.1, 0.3, -0.05], [0.0], "greater")
    assert verdict == INCONCLUSIVE and "95% CI" in reason and "seeds" in reason


def test_power_and_seeds_needed_against_noncentral_t():
    for es in (0.3, 0.8, 1.5):
        for n in (2, 3, 5, 12):
            crit = stats.t.ppf(0.975, n - 1)
            ref = stats.nct.sf(crit, n - 1, es * math.sqrt(n)) + stats.nct.cdf(-crit, n - 1, es * math.sqrt(n))
            assert t_power(es, n) == pytest.approx(ref, abs=1e-3)
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
    assert adj[4] == pytest.approx(0.02) and adj[0] == pytest.approx(0.03)
    assert adj[2] == pytest.approx(0.06) and adj[1] == pytest.approx(0.06) and math.isnan(adj[3])
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
    assert "effect a − b [95% CI]" in md and "p (Holm)" in md and "ImageNet (here: ELPV)" in md
    assert vs[0].verdict == HELD and vs[0].p_holm == pytest.approx(2 * vs[0].p)
    assert vs[1].verdict == INCONCLUSIVE and vs[1].p_holm == pytest.approx(max(vs[1].p, vs[0].p_holm))
