"""Verdicts of the study recipes: a test of each claim over seeds, with Holm's correction per study.

Where the seeds truly pair (one model measured twice, a model on a subset of the data and on all of it, a model
with and without a parameter-free change) ``a[i]`` and ``b[i]`` (seed ``i``) are paired and the test is on the
differences ``d_i = a_i - b_i``; between independent architectures trained on the same fixed split the seed
index pairs nothing, so the two sides are independent samples (Welch's t, unequal variances); a ``b`` of length
1 is a fixed threshold (one-sample test of ``a_i - b``; the caller says so, ``threshold``, where one seed of two
models would look the same). ``expect="equal"`` (a claim of no change) is the two-sided test: "did not hold" when
a difference is significant, otherwise inconclusive with the interval that bounds it; never "held", since no
paper gives an equivalence margin.

- **test**: Student's t (paired: ``n - 1`` degrees of freedom; Welch: Welch-Satterthwaite), two-sided ``p``;
  the exact distribution-free ``p`` is reported beside it (sign flips of the differences, or relabelings of
  the pooled values for Welch). The smallest exact ``p`` is ``2 / 2^n`` (0.25 at 3 seeds, 0.031 at 6) or
  ``2 / C(2n, n)``; when it cannot go below the Holm level, the reason says the verdict rests on t's normality.
- **no spread**: when the values have no spread (zero, or float rounding of equal values: ``_no_spread``) t
  is undefined (the old rule, ``p = 0``, called 3 equal seeds proof); the exact test decides alone.
- **Holm** (1979) step-down over the testable claims of one study; each claim's interval is at the level
  Holm tested it at (``holm_levels``: ``alpha * p / p_Holm``), so it excludes 0 exactly when the claim is
  decided (95% for a study of one claim).
- **held** when the Holm-adjusted ``p < 0.05`` and the effect lies on the side the paper predicts, **did not
  hold** when significant on the other side, otherwise **inconclusive**, with the direction of the measured
  effect and the seeds a real effect of its size and spread would need to reach Holm's strictest level
  ``alpha / m`` at 80% power (exact power from the noncentral t, ``t_power`` / ``welch_power``).

The t distribution is computed here (regularized incomplete beta by Lentz's continued fraction), so scipy is
not a dependency; tests check it against ``scipy.stats``.
"""
from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vitscope.studies.tdist import t_cdf, t_ppf

__all__ = ["Verdict", "TestResult", "summarize", "decide", "paired_test", "holm", "holm_adjust", "holm_levels",
           "t_cdf", "t_ppf", "seeds_needed", "t_power", "welch_power", "welch_df", "verdict_rows", "to_markdown",
           "to_csv", "HELD", "NOT_HELD", "INCONCLUSIVE", "EXPECT", "ALPHA"]

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
EXPECT = {"greater": ">", "less": "<", "equal": "="}
ALPHA = 0.05
POWER = 0.8


# ----------------------------------------------------------------------------------------------
# Power and sample size.


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of finite ``values``."""
    vals = [float(v) for v in values]
    if not vals or any(not math.isfinite(v) for v in vals):
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def _power(delta: float, df: float, crit: float) -> float:
    """Two-sided power ``P(|T| > crit)`` of a t statistic with noncentrality ``delta`` and ``df`` degrees of
    freedom: ``E_U[Phi(delta - c U/sqrt(df)) + Phi(-delta - c U/sqrt(df))]`` with ``U`` chi-distributed with
    ``df`` degrees of freedom (the noncentral t distribution; trapezoid rule over ``U``)."""
    u = np.linspace(0.0, math.sqrt(df) + 10.0, 401)  # (401,) values of the chi variable
    log_norm = (df / 2 - 1) * math.log(2.0) + math.lgamma(df / 2)
    with np.errstate(divide="ignore"):
        dens = np.exp((df - 1) * np.log(u) - u * u / 2 - log_norm) if df > 1 else np.exp(-u * u / 2 - log_norm)
    x = crit * u / math.sqrt(df)
    delta = abs(delta)
    phi = 0.5 * (_erfc((x - delta) / math.sqrt(2)) + _erfc((x + delta) / math.sqrt(2))).astype(float)
    return float(min(np.trapezoid(dens * phi, u) if hasattr(np, "trapezoid") else np.trapz(dens * phi, u), 1.0))


def t_power(effect_size: float, n: int, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided one-sample (or paired) t test at ``alpha`` with ``n`` seeds when the true
    mean is ``effect_size`` per-seed SDs (noncentral t with ``delta = effect_size sqrt(n)``, ``df = n - 1``)."""
    return _power(abs(effect_size) * math.sqrt(n), n - 1, t_ppf(1 - alpha / 2, n - 1))


def welch_df(var_a: float, var_b: float, n_a: int, n_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom for sample variances ``var_a``, ``var_b`` of ``n_a``, ``n_b``
    values."""
    va, vb = var_a / n_a, var_b / n_b
    den = (va * va / (n_a - 1) if va else 0.0) + (vb * vb / (n_b - 1) if vb else 0.0)
    return (va + vb) ** 2 / den if den > 0 else float(n_a + n_b - 2)


def welch_power(effect: float, sd_a: float, sd_b: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided Welch test at ``alpha`` with ``n`` seeds per side (true difference ``effect``,
    per-seed SDs ``sd_a``, ``sd_b``), from the noncentral t at the Welch-Satterthwaite degrees of freedom."""
    df = welch_df(sd_a ** 2, sd_b ** 2, n, n)
    se = math.sqrt((sd_a ** 2 + sd_b ** 2) / n)
    return _power(abs(effect) / se, df, t_ppf(1 - alpha / 2, df))


_erfc = np.frompyfunc(math.erfc, 1, 1)


def _min_exact_p(n: int, paired: bool) -> float:
    """The smallest two-sided p the exact test can give: ``2 / 2^n`` (sign flips of ``n`` differences) or
    ``2 / C(2n, n)`` (relabelings of ``n`` + ``n`` independent values)."""
    return min(1.0, 2.0 / (2 ** n if paired else math.comb(2 * n, n)))


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER, max_n: int = 10_000,
                 sd_b: float | None = None) -> int | None:
    """The fewest seeds (>= 2; per side for Welch) with which a two-sided test at ``alpha`` detects a true
    difference ``effect`` at ``power``: the one-sample / paired t test with per-seed SD ``sd`` of the
    differences (exact power, ``t_power``), or with ``sd_b`` given the Welch test with per-side SDs ``sd`` and
    ``sd_b`` (``welch_power``). With no spread the verdict is the exact test's, so the answer is the fewest
    seeds whose smallest exact p is below ``alpha``. ``None`` when ``effect`` is 0 or more than ``max_n`` seeds
    would be needed."""
    if not (math.isfinite(effect) and math.isfinite(sd) and (sd_b is None or math.isfinite(sd_b))) or effect == 0:
        return None
    paired = sd_b is None
    total_sd = sd if paired else math.sqrt(sd ** 2 + sd_b ** 2)
    if total_sd == 0:
        n = 2
        while _min_exact_p(n, paired) >= alpha:
            n += 1
        return n
    es = abs(effect) / total_sd

    def power_at(n: int) -> float:
        return t_power(es, n, alpha) if paired else welch_power(effect, sd, sd_b or 0.0, n, alpha)

    z = _norm_ppf(1 - alpha / 2) + _norm_ppf(power)  # the normal approximation, then exact steps from there
    n = max(2, math.ceil((z / es) ** 2))
    if n > max_n:
        return None
    while power_at(n) < power:
        n += 1
        if n > max_n:
            return None
    while n > 2 and power_at(n - 1) >= power:
        n -= 1
    return n


def _norm_ppf(q: float) -> float:
    """Standard normal quantile (bisection on erfc; only the starting point of ``seeds_needed``)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------
# Exact (distribution-free) tests.


def _signflip_p(d: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation p of ``mean(d) = 0`` (all 2^n sign patterns; n <= 16)."""
    n = len(d)
    obs = abs(sum(d))
    hits = sum(1 for signs in itertools.product((1, -1), repeat=n)
               if abs(sum(s * x for s, x in zip(signs, d))) >= obs - 1e-12 * max(1.0, obs))
    return hits / 2 ** n


def _permutation_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact two-sided permutation p of ``mean(a) = mean(b)`` for independent samples: every split of the
    pooled values into groups of ``len(a)`` and ``len(b)``; ``2 min(P(T >= t), P(T <= t))`` capped at 1, as
    ``scipy.stats.permutation_test`` (``n_a + n_b <= 20``)."""
    pooled = list(a) + list(b)
    na, total = len(a), sum(pooled)
    nb = len(pooled) - na

    def stat(sum_a: float) -> float:
        return sum_a / na - (total - sum_a) / nb

    obs = stat(sum(a))
    tol = 1e-12 * max(1.0, abs(obs), max(abs(x) for x in pooled))
    ge = le = count = 0
    for idx in itertools.combinations(range(len(pooled)), na):
        t = stat(sum(pooled[i] for i in idx))
        ge += t >= obs - tol
        le += t <= obs + tol
        count += 1
    return min(1.0, 2.0 * min(ge, le) / count)


# ----------------------------------------------------------------------------------------------
# The test of one claim.


@dataclass
class TestResult:
    """The test of one claim, before any correction: the paired (or one-sample) t test of the per-seed
    differences, or Welch's unpaired t test between two independent samples; ``p`` is the p that decides
    (``p_t``, or the exact test's when the values have no spread), ``p_exact`` the exact distribution-free p
    (sign-flip for paired / one-sample, relabeling permutation for unpaired) and ``min_p_exact`` the smallest
    exact p these seeds allow."""

    n: int
    method: str
    effect: float  # mean of a - b (paper's direction: > 0 for "greater", < 0 for "less")
    sd: float  # per-seed SD of the differences (paired) or of side a (Welch)
    ci_low: float
    ci_high: float
    p: float  # two-sided, the one that decides
    p_signflip: float  # the exact p (kept under its old name)
    seeds_needed: int | None
    note: str = ""
    paired: bool = True
    p_t: float = math.nan
    se: float = math.nan
    df: float = math.nan
    sd_b: float = math.nan  # Welch: per-seed SD of side b
    min_p_exact: float = math.nan
    no_spread: bool = False
    threshold: bool = False  # a one-sample test against a fixed value

    @property
    def testable(self) -> bool:
        return math.isfinite(self.p)

    @property
    def p_exact(self) -> float:
        return self.p_signflip

    def interval(self, alpha: float) -> tuple[float, float]:
        """The two-sided ``1 - alpha`` interval of the difference (the exact test's has no width to add when
        the values have no spread)."""
        if not math.isfinite(self.se) or not math.isfinite(self.df):
            return math.nan, math.nan
        if self.no_spread:
            return self.effect, self.effect
        half = t_ppf(1 - alpha / 2, self.df) * self.se
        return self.effect - half, self.effect + half

    def needed(self, alpha: float) -> int | None:
        """Seeds a true effect of the measured size and spread needs to reach ``p < alpha`` at 80% power."""
        return seeds_needed(self.effect, self.sd, alpha, sd_b=None if self.paired else self.sd_b)


def _no_spread(se: float, values: Sequence[float]) -> bool:
    """The spread is zero or at the level of float rounding (1e-9 of the largest value): t is meaningless."""
    return se <= 1e-9 * max((abs(v) for v in values), default=0.0)


def paired_test(a: Sequence[float], b: Sequence[float], paired: bool = True, threshold: bool | None = None
                ) -> TestResult:
    """The test of ``a - b``: paired t over seeds (``paired=True``), Welch's unpaired t (``paired=False``, two
    independent samples), or the one-sample t against a fixed value (``threshold=True``: the side with one value
    is the threshold; ``None``: so when exactly one side has one value; with one seed on both sides ``None``
    means two measured sides, one seed each). With no spread (``_no_spread``) the exact test decides instead of t."""
    a = [float(v) for v in a]
    b = [float(v) for v in b]
    nan = math.nan
    if threshold is None:
        threshold = (len(a) == 1) != (len(b) == 1)
    if threshold and len(b) == 1 and a:
        d, method, paired = [x - b[0] for x in a], "one-sample t", True
    elif threshold and len(a) == 1 and b:
        d, method, paired = [a[0] - y for y in b], "one-sample t", True
    elif paired and len(a) == len(b) and a:
        d, method = [x - y for x, y in zip(a, b)], "paired t"
    elif not paired and a and b:
        d, method = [], "Welch t"
    else:
        raise ValueError(f"the two sides of a claim need equal numbers of seeds (paired) or one value (a "
                         f"threshold); got {len(a)} and {len(b)}")
    threshold = method == "one-sample t"
    vals = d if paired else a + b
    n = len(d) if paired else min(len(a), len(b))
    if any(not math.isfinite(x) for x in vals):
        return TestResult(n, method, nan, nan, nan, nan, nan, nan, None, "a measured value is missing or not finite",
                          paired, threshold=threshold)
    if paired:
        mean, sd = summarize(d)
        sd_b = nan
        if n < 2:
            return TestResult(n, method, mean, nan, nan, nan, nan, nan, None,
                              "one seed: no test is possible (use --seeds 3 or more)", paired, threshold=threshold)
        se, df = sd / math.sqrt(n), float(n - 1)
        exact = _signflip_p(d) if n <= 16 else nan
        min_exact = _min_exact_p(n, True)
        exact_name = "exact sign-flip"
    else:
        ma, sd = summarize(a)
        mb, sd_b = summarize(b)
        mean = ma - mb
        if n < 2:
            return TestResult(n, method, mean, nan, nan, nan, nan, nan, None,
                              "one seed: no test is possible (use --seeds 3 or more)", paired, threshold=threshold)
        se = math.sqrt(sd ** 2 / len(a) + sd_b ** 2 / len(b))
        df = welch_df(sd ** 2, sd_b ** 2, len(a), len(b))
        exact = _permutation_p(a, b) if len(a) + len(b) <= 20 else nan
        min_exact = _min_exact_p(n, False)
        exact_name = "exact permutation"
    if _no_spread(se, vals):
        p_t = nan  # t is infinite (or 0/0): the exact test decides
        p = 1.0 if mean == 0 else exact
        method = f"{exact_name} (no spread)"
        note = "every seed gave the same value: t is undefined, the exact test decides"
        return TestResult(n, method, mean, sd, mean, mean, p, exact, None, note, paired, p_t, se, df,
                          sd_b, min_exact, True, threshold)
    p_t = min(max(2.0 * (1.0 - t_cdf(abs(mean) / se, df)), 0.0), 1.0)
    res = TestResult(n, method, mean, sd, nan, nan, p_t, exact, None, "", paired, p_t, se, df, sd_b, min_exact,
                     False, threshold)
    res.ci_low, res.ci_high = res.interval(ALPHA)
    res.seeds_needed = res.needed(ALPHA)
    return res


def _direction(effect: float, expect: str) -> str:
    if expect == "equal":  # a claim of no change has no side to point to
        return "two-sided"
    if not math.isfinite(effect) or effect == 0:
        return "none"
    return "paper" if (effect > 0) == (expect == "greater") else "against"


def _outcome(test: TestResult, p: float, expect: str, level: float = ALPHA, m: int = 1) -> tuple[str, str]:
    """Verdict and reason for ``test`` with (Holm-adjusted) ``p``; ``level`` is the level of its interval
    (``holm_levels``), ``m`` the number of claims Holm corrects over."""
    if not test.testable:
        return INCONCLUSIVE, test.note
    lo, hi = test.interval(level)
    pct = 100 * (1 - level)
    ci = f"{pct:.4g}% CI{' (Holm)' if m > 1 else ''} [{lo:.3g}, {hi:.3g}]"
    if test.no_spread:
        head = f"{test.method}: p = {test.p_exact:.2g}"
    else:
        head = f"{test.method} p = {test.p_t:.2g}, exact p = {test.p_exact:.2g}"
    if m > 1:
        head += f", Holm p = {p:.2g}"
    floor = ""
    if math.isfinite(test.min_p_exact) and test.min_p_exact >= ALPHA / m:
        floor = (f"; with {test.n} seeds{' per side' if not test.paired else ''} no distribution-free test can "
                 f"reach p < {ALPHA / m:.2g} (smallest exact p {test.min_p_exact:.2g})")
        if not test.no_spread:
            floor += ", the verdict rests on t's normality"
    if expect == "equal":  # no margin from the paper: a difference can be shown, equality cannot
        if p < ALPHA:
            return NOT_HELD, f"{head} < {ALPHA}: a difference was detected ({ci}){floor}"
        return INCONCLUSIVE, (f"{head} >= {ALPHA}: no difference detected, which does not show there is none; the "
                              f"{ci} bounds the difference (the paper gives no equivalence margin){floor}")
    if p < ALPHA:
        right = _direction(test.effect, expect) == "paper"
        where = "in the paper's direction" if right else "against the paper's direction"
        return (HELD if right else NOT_HELD), f"{head} < {ALPHA}, {where} ({ci}){floor}"
    need = test.needed(ALPHA / m)
    direction = _direction(test.effect, expect)
    target = f"p < {ALPHA / m:.2g}" + (" (Holm's strictest level)" if m > 1 else "")
    if direction == "none":
        need_txt = "no effect was measured"
    elif need is None:
        need_txt = f"an effect this small would need more than 10000 seeds to reach {target}"
    elif direction == "paper":
        need_txt = (f"a true effect of this size, in the paper's direction, would need about {need} seeds to reach "
                    f"{target}")
    else:
        need_txt = (f"the measured effect points AGAINST the paper; a true effect of this size would need about "
                    f"{need} seeds to reach {target} (as 'did not hold')")
    return INCONCLUSIVE, f"{head} >= {ALPHA} ({ci}); {need_txt}{floor}"


def decide(a: Sequence[float], b: Sequence[float], expect: str, paired: bool = True,
           threshold: bool | None = None) -> tuple[str, str]:
    """``(verdict, reason)`` for the claim ``a <expect> b`` (``expect`` greater, less or equal), uncorrected.

    ``a``, ``b`` of equal length are per-seed values paired by seed (``paired=False``: independent samples,
    Welch); a side of length 1 is a fixed threshold (``threshold``: see ``paired_test``). ``equal`` (a claim of no
    change) is two-sided: "did not hold" when a difference is significant, otherwise inconclusive with the
    interval that bounds it (no margin, so never "held").
    """
    if expect not in EXPECT:
        raise ValueError(f"expect must be one of {list(EXPECT)}, got {expect!r}")
    test = paired_test(a, b, paired, threshold)
    return _outcome(test, test.p, expect)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (``nan`` entries are left out and stay ``nan``)."""
    idx = [i for i, p in enumerate(pvalues) if math.isfinite(p)]
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: pvalues[j])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def holm_levels(pvalues: Sequence[float], alpha: float = ALPHA) -> list[float]:
    """Per claim, the level of its Holm-adjusted interval: ``alpha * p / p_Holm`` (``alpha / (m - rank)``
    when ``p`` is 0), so that the ``1 - level`` interval excludes zero exactly when the Holm-adjusted p is
    below ``alpha`` (the interval matches the verdict; it is not a simultaneous band). ``nan`` for untested."""
    adjusted = holm(pvalues)
    idx = sorted((i for i, p in enumerate(pvalues) if math.isfinite(p)), key=lambda j: pvalues[j])
    m = len(idx)
    out = [math.nan] * len(pvalues)
    for rank, i in enumerate(idx):
        p, q = pvalues[i], adjusted[i]
        out[i] = alpha * p / q if p > 0 and q > 0 else alpha / (m - rank)
    return out


# ----------------------------------------------------------------------------------------------
# A study's verdict table.


@dataclass
class Verdict:
    """One claim of a study, its measured sides, the test and the outcome (after Holm within the study)."""

    study: str
    finding: int
    claim: str
    a_label: str
    b_label: str
    expect: str
    a_values: list[float]
    b_values: list[float]
    a_mean: float
    a_std: float
    b_mean: float
    b_std: float
    verdict: str
    reason: str
    effect: float = math.nan
    ci_low: float = math.nan  # the interval at ci_level (Holm-adjusted by holm_adjust)
    ci_high: float = math.nan
    p: float = math.nan  # the p that decides (t's, or the exact test's with no spread), uncorrected
    p_holm: float = math.nan
    p_signflip: float = math.nan  # the exact p: sign-flip (paired, one-sample) or permutation (Welch)
    method: str = ""
    seeds_needed: int | None = None  # at Holm's strictest level alpha / m, for the measured effect
    regime: str = ""
    regime_note: str = ""
    paired: bool = True
    p_t: float = math.nan
    ci_level: float = 1 - ALPHA
    direction: str = ""  # of the measured effect: "paper", "against", "none" ("two-sided" for expect equal)
    min_p_exact: float = math.nan
    threshold: bool = False  # b (or a) is a fixed value: one-sample test

    @classmethod
    def build(cls, study: str, finding: int, claim: str, a_label: str, b_label: str, expect: str,
              a_values: Sequence[float], b_values: Sequence[float], regime: str = "", regime_note: str = "",
              paired: bool = True, threshold: bool | None = None) -> Verdict:
        """The claim with its uncorrected test (``holm_adjust`` corrects a study's list); ``paired=False``:
        the sides are independent samples (two architectures), tested with Welch's t; ``threshold``: one side is
        a fixed value (``paired_test``; the runner knows, so a one-seed run of two models is not called
        one-sample)."""
        if expect not in EXPECT:
            raise ValueError(f"expect must be one of {list(EXPECT)}, got {expect!r}")
        ma, sa = summarize(a_values)
        mb, sb = summarize(b_values)
        test = paired_test(a_values, b_values, paired, threshold)
        verdict, reason = _outcome(test, test.p, expect)
        needed = None if expect == "equal" else test.seeds_needed
        return cls(study, finding, claim, a_label, b_label, expect, [float(v) for v in a_values],
                   [float(v) for v in b_values], ma, sa, mb, sb, verdict, reason, test.effect, test.ci_low,
                   test.ci_high, test.p, test.p, test.p_signflip, test.method, needed, regime,
                   regime_note, test.paired, test.p_t, 1 - ALPHA, _direction(test.effect, expect), test.min_p_exact,
                   test.threshold)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def holm_adjust(verdicts: Sequence[Verdict]) -> list[Verdict]:
    """Apply Holm's correction over the testable claims of one study: ``p_holm``, the verdicts, intervals at
    the level that matches each verdict (``holm_levels``) and the seeds an effect of the measured size would
    need at Holm's strictest level ``alpha / m``."""
    adjusted = holm([v.p for v in verdicts])
    levels = holm_levels([v.p for v in verdicts])
    m = sum(math.isfinite(x) for x in adjusted)
    for v, p_adj, level in zip(verdicts, adjusted, levels):
        v.p_holm = p_adj
        test = paired_test(v.a_values, v.b_values, v.paired, v.threshold)
        if not test.testable:
            v.verdict, v.reason = _outcome(test, p_adj, v.expect)
            continue
        v.verdict, v.reason = _outcome(test, p_adj, v.expect, level, max(m, 1))
        v.ci_low, v.ci_high = test.interval(level)
        v.ci_level = 1 - level
        v.seeds_needed = None if v.expect == "equal" else test.needed(ALPHA / max(m, 1))
        if m > 1:
            v.reason += f" [Holm over {m} claims]"
    return list(verdicts)


def _fmt(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if n < 2:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {std:.2g}"


def _fmt_effect(v: Verdict) -> str:
    if not math.isfinite(v.effect):
        return "n/a"
    if not math.isfinite(v.ci_low):
        return f"{v.effect:+.3g}"
    return f"{v.effect:+.3g} [{v.ci_low:+.3g}, {v.ci_high:+.3g}]"


def _fmt_p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{p:.2g}"


def verdict_rows(verdicts: Sequence[Verdict]) -> list[dict[str, Any]]:
    """Flat rows (for CSV and printing): finding, claim, regime, the two sides, the effect, its interval, p
    (raw and Holm-adjusted), the verdict."""
    return [{
        "finding": v.finding, "claim": v.claim, "regime": v.regime + (f" ({v.regime_note})" if v.regime_note else ""),
        "measured": f"{v.a_label} {EXPECT[v.expect]} {v.b_label}?",
        "a": _fmt(v.a_mean, v.a_std, len(v.a_values)), "b": _fmt(v.b_mean, v.b_std, len(v.b_values)),
        "effect_ci": _fmt_effect(v), "ci_level": v.ci_level, "p": _fmt_p(v.p), "p_t": _fmt_p(v.p_t),
        "p_exact": _fmt_p(v.p_signflip), "p_holm": _fmt_p(v.p_holm),
        "seeds": max(len(v.a_values), len(v.b_values)), "test": v.method, "direction": v.direction,
        "seeds_needed": "" if v.seeds_needed is None else v.seeds_needed,
        "verdict": v.verdict, "reason": v.reason,
        "a_mean": v.a_mean, "a_std": v.a_std, "b_mean": v.b_mean, "b_std": v.b_std,
        "effect": v.effect, "ci_low": v.ci_low, "ci_high": v.ci_high, "p_value": v.p, "p_holm_value": v.p_holm,
        "p_signflip": v.p_signflip, "method": v.method,
    } for v in verdicts]


def to_csv(verdicts: Sequence[Verdict]) -> str:
    rows = verdict_rows(verdicts)
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["finding"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


MD_COLUMNS = (("finding", "#"), ("claim", "paper's claim"), ("regime", "regime"), ("measured", "measured"),
              ("a", "a (mean ± SD)"), ("b", "b (mean ± SD)"), ("effect_ci", "effect a − b [Holm-adjusted CI]"),
              ("test", "test"), ("p_t", "p (t)"), ("p_exact", "p (exact)"), ("p_holm", "p (Holm)"),
              ("seeds", "seeds"), ("verdict", "verdict"))


def to_markdown(verdicts: Sequence[Verdict], title: str = "") -> str:
    """A Markdown table: finding, claim, regime, measured comparison, the sides, effect [95% CI], p, Holm p,
    seeds, verdict (after Holm), and a footnote on the rule."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(h for _, h in MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    rows = verdict_rows(verdicts)
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(row[c]) for c, _ in MD_COLUMNS) + " |")
    lines.append("")
    lines.append(f"Paired t test over seeds where the seeds truly pair (one model, or subsets; one-sample against "
                 f"a fixed value), Welch's t between independent architectures; two-sided, Holm-corrected over the "
                 f"study's claims at alpha = {ALPHA}; held / did not hold = significant in / against the paper's "
                 "direction. The exact p (sign-flip, or relabeling permutation for Welch) is beside t and decides "
                 "when the values have no spread. Each interval is at the level Holm tested that claim at (it "
                 "excludes 0 exactly when the claim is decided).")
    for v in verdicts:
        if v.verdict == INCONCLUSIVE and v.seeds_needed is not None:
            against = " (the measured effect points AGAINST the paper)" if v.direction == "against" else ""
            lines.append(f"- finding {v.finding} ({v.claim[:60]}): about {v.seeds_needed} seeds"
                         f"{' per side' if not v.paired else ''} would detect an effect of the measured size at 80% "
                         f"power at Holm's strictest level{against}.")
    return "\n".join(lines) + "\n"
