"""Verdicts of the study recipes: a paired test of each claim over seeds, with Holm's correction per study.

Both sides of a comparison are trained with the same seeds, so ``a[i]`` and ``b[i]`` (seed ``i``) are paired
and the test is on the differences ``d_i = a_i - b_i``; a ``b`` of length 1 is a fixed threshold (one-sample
test of ``a_i - b``). With ``n`` seeds, ``mean(d)``, its sample SD ``s`` and ``t = mean(d) / (s / sqrt(n))``:

- **test**: Student's t with ``n - 1`` degrees of freedom, two-sided ``p`` (equivalently the two one-sided
  tests at ``alpha / 2``: false "held" and false "did not hold" are each at most 2.5% per claim);
- **95% interval** of the mean difference: ``mean(d) +- t_{0.975, n-1} * s / sqrt(n)``;
- **held** when the (Holm-adjusted) ``p < 0.05`` and ``mean(d)`` lies on the side the paper predicts,
  **did not hold** when significant on the other side, otherwise **inconclusive**, with the interval and the
  number of seeds a real effect of the observed size and spread would need (two-sided t at 80% power,
  exact power from the noncentral t distribution, ``t_power``).

Why the t test and not an exact sign-flip permutation test: with ``n`` seeds the smallest two-sided sign-flip
``p`` is ``2 / 2^n`` (0.25 at 3 seeds, 0.0625 at 5), so no claim could be decided below 6 seeds. The t test
assumes roughly normal per-seed differences (averages over many images and layers usually are); the exact
sign-flip ``p`` is reported next to it (``p_signflip``) as the distribution-free check.

Holm (1979) step-down correction over the claims of one study that could be tested (claims with one seed or a
non-finite value are inconclusive and take no share of alpha): ``verdict.holm``. ``decide`` alone is the
uncorrected test (a study of one claim).

The t distribution is computed here (regularized incomplete beta by Lentz's continued fraction), so scipy is
not a dependency; tests check it against ``scipy.stats``.
"""
from __future__ import annotations

import csv
import functools
import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Verdict", "TestResult", "summarize", "decide", "paired_test", "holm", "holm_adjust", "t_cdf", "t_ppf",
           "seeds_needed", "t_power", "verdict_rows", "to_markdown", "to_csv", "HELD", "NOT_HELD", "INCONCLUSIVE",
           "EXPECT", "ALPHA"]

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
EXPECT = {"greater": ">", "less": "<"}
ALPHA = 0.05
POWER = 0.8


# ----------------------------------------------------------------------------------------------
# Student's t distribution.


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=4096)
def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on ``t_cdf``)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------
# The test of one claim.


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of finite ``values``."""
    vals = [float(v) for v in values]
    if not vals or any(not math.isfinite(v) for v in vals):
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def t_power(effect_size: float, n: int, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided one-sample t test at ``alpha`` with ``n`` seeds when the true mean is
    ``effect_size`` per-seed SDs: ``E_U[Phi(delta - c U/sqrt(df)) + Phi(-delta - c U/sqrt(df))]`` with
    ``delta = effect_size sqrt(n)``, ``c`` the critical t and ``U`` chi-distributed with ``df = n - 1``
    (the noncentral t distribution; trapezoid rule over ``U``)."""
    df = n - 1
    c = t_ppf(1 - alpha / 2, df)
    delta = abs(effect_size) * math.sqrt(n)
    u = np.linspace(0.0, math.sqrt(df) + 10.0, 401)  # (401,) values of the chi variable
    log_norm = (df / 2 - 1) * math.log(2.0) + math.lgamma(df / 2)
    with np.errstate(divide="ignore"):
        dens = np.exp((df - 1) * np.log(u) - u * u / 2 - log_norm) if df > 1 else np.exp(-u * u / 2 - log_norm)
    x = c * u / math.sqrt(df)
    phi = 0.5 * (_erfc((x - delta) / math.sqrt(2)) + _erfc((x + delta) / math.sqrt(2))).astype(float)
    return float(min(np.trapezoid(dens * phi, u) if hasattr(np, "trapezoid") else np.trapz(dens * phi, u), 1.0))


_erfc = np.frompyfunc(math.erfc, 1, 1)


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER, max_n: int = 10_000
                 ) -> int | None:
    """The fewest seeds (>= 2) with which a two-sided one-sample t test at ``alpha`` detects a true mean
    ``effect`` with per-seed SD ``sd`` at ``power`` (exact power, ``t_power``); ``None`` when ``effect`` is 0
    or more than ``max_n`` seeds would be needed."""
    if not (math.isfinite(effect) and math.isfinite(sd)) or effect == 0:
        return None
    if sd == 0:
        return 2
    es = abs(effect) / sd
    n = 2  # start from the usual iteration n = ((t_{1-a/2,n-1} + t_{power,n-1}) / es)^2, then make it exact
    for _ in range(50):
        need = max(2, math.ceil(((t_ppf(1 - alpha / 2, n - 1) + t_ppf(power, n - 1)) / es) ** 2))
        if need > max_n:
            return None
        if need == n:
            break
        n = need
    while t_power(es, n, alpha) < power:
        n += 1
    while n > 2 and t_power(es, n - 1, alpha) >= power:
        n -= 1
    return n if n <= max_n else None


def _signflip_p(d: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation p of ``mean(d) = 0`` (all 2^n sign patterns; n <= 16)."""
    n = len(d)
    obs = abs(sum(d))
    hits = sum(1 for signs in itertools.product((1, -1), repeat=n)
               if abs(sum(s * x for s, x in zip(signs, d))) >= obs - 1e-12 * max(1.0, obs))
    return hits / 2 ** n


@dataclass
class TestResult:
    """The paired (or one-sample) t test of one claim, before any correction."""

    n: int
    method: str
    effect: float  # mean of a - b (paper's direction: > 0 for "greater", < 0 for "less")
    sd: float
    ci_low: float
    ci_high: float
    p: float  # two-sided
    p_signflip: float
    seeds_needed: int | None
    note: str = ""

    @property
    def testable(self) -> bool:
        return math.isfinite(self.p)


def paired_test(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Paired t test of ``a - b`` (``b`` of length 1: one-sample test against that threshold)."""
    a = [float(v) for v in a]
    b = [float(v) for v in b]
    if len(b) == 1 and len(a) >= 1:
        d, method = [x - b[0] for x in a], "one-sample t"
    elif len(a) == 1 and len(b) > 1:
        d, method = [a[0] - y for y in b], "one-sample t"
    elif len(a) == len(b) and a:
        d, method = [x - y for x, y in zip(a, b)], "paired t"
    else:
        raise ValueError(f"the two sides of a claim need equal numbers of seeds (paired) or one value (a "
                         f"threshold); got {len(a)} and {len(b)}")
    nan = math.nan
    n = len(d)
    if any(not math.isfinite(x) for x in d):
        return TestResult(n, method, nan, nan, nan, nan, nan, nan, None, "a measured value is missing or not finite")
    mean, sd = summarize(d)
    if n < 2:
        return TestResult(n, method, mean, nan, nan, nan, nan, nan, None,
                          "one seed: no test is possible (use --seeds 3 or more)")
    se = sd / math.sqrt(n)
    crit = t_ppf(1 - ALPHA / 2, n - 1)
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
        note = "every seed gave the same difference (no spread)"
    else:
        p = 2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1))
        note = ""
    return TestResult(n, method, mean, sd, mean - crit * se, mean + crit * se, min(max(p, 0.0), 1.0),
                      _signflip_p(d) if n <= 16 else nan, seeds_needed(mean, sd), note)


def _outcome(test: TestResult, p: float, expect: str) -> tuple[str, str]:
    if not test.testable:
        return INCONCLUSIVE, test.note
    ci = f"95% CI [{test.ci_low:.3g}, {test.ci_high:.3g}]"
    if p < ALPHA:
        right = test.effect > 0 if expect == "greater" else test.effect < 0
        where = "in the paper's direction" if right else "against the paper's direction"
        return (HELD if right else NOT_HELD), f"{test.method} p = {p:.2g} < {ALPHA}, {where} ({ci})"
    need = test.seeds_needed
    need_txt = (f"a true effect of this size would need about {need} seeds" if need is not None
                else "an effect this small would need more than 10000 seeds")
    return INCONCLUSIVE, f"{test.method} p = {p:.2g} >= {ALPHA} ({ci}); {need_txt}"


def decide(a: Sequence[float], b: Sequence[float], expect: str) -> tuple[str, str]:
    """``(verdict, reason)`` for the claim ``a <expect> b`` (``expect`` greater or less), uncorrected.

    ``a``, ``b`` of equal length are per-seed values paired by seed; a ``b`` of length 1 is a fixed threshold.
    """
    if expect not in EXPECT:
        raise ValueError(f"expect must be one of {list(EXPECT)}, got {expect!r}")
    test = paired_test(a, b)
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
    ci_low: float = math.nan
    ci_high: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    p_signflip: float = math.nan
    method: str = ""
    seeds_needed: int | None = None
    regime: str = ""
    regime_note: str = ""

    @classmethod
    def build(cls, study: str, finding: int, claim: str, a_label: str, b_label: str, expect: str,
              a_values: Sequence[float], b_values: Sequence[float], regime: str = "", regime_note: str = ""
              ) -> Verdict:
        """The claim with its uncorrected test (``holm_adjust`` corrects a study's list)."""
        if expect not in EXPECT:
            raise ValueError(f"expect must be one of {list(EXPECT)}, got {expect!r}")
        ma, sa = summarize(a_values)
        mb, sb = summarize(b_values)
        test = paired_test(a_values, b_values)
        verdict, reason = _outcome(test, test.p, expect)
        return cls(study, finding, claim, a_label, b_label, expect, [float(v) for v in a_values],
                   [float(v) for v in b_values], ma, sa, mb, sb, verdict, reason, test.effect, test.ci_low,
                   test.ci_high, test.p, test.p, test.p_signflip, test.method, test.seeds_needed, regime,
                   regime_note)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def holm_adjust(verdicts: Sequence[Verdict]) -> list[Verdict]:
    """Apply Holm's correction over the testable claims of one study: ``p_holm`` and the verdicts."""
    adjusted = holm([v.p for v in verdicts])
    for v, p_adj in zip(verdicts, adjusted):
        v.p_holm = p_adj
        test = paired_test(v.a_values, v.b_values)
        v.verdict, v.reason = _outcome(test, p_adj, v.expect)
        if test.testable and len(verdicts) > 1:
            v.reason += f" [Holm over {sum(math.isfinite(x) for x in adjusted)} claims]"
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
        "effect_ci": _fmt_effect(v), "p": _fmt_p(v.p), "p_holm": _fmt_p(v.p_holm),
        "seeds": max(len(v.a_values), len(v.b_values)),
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
              ("a", "a (mean ± SD)"), ("b", "b (mean ± SD)"), ("effect_ci", "effect a − b [95% CI]"), ("p", "p"),
              ("p_holm", "p (Holm)"), ("seeds", "seeds"), ("verdict", "verdict"))


def to_markdown(verdicts: Sequence[Verdict], title: str = "") -> str:
    """A Markdown table: finding, claim, regime, measured comparison, the sides, effect [95% CI], p, Holm p,
    seeds, verdict (after Holm), and a footnote on the rule."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(h for _, h in MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    rows = verdict_rows(verdicts)
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(row[c]) for c, _ in MD_COLUMNS) + " |")
    lines.append("")
    lines.append(f"Paired t test over seeds (one-sample against a fixed value), two-sided, Holm-corrected over "
                 f"the study's claims at alpha = {ALPHA}; held / did not hold = significant in / against the "
                 "paper's direction.")
    for v in verdicts:
        if v.verdict == INCONCLUSIVE and v.seeds_needed is not None:
            lines.append(f"- finding {v.finding} ({v.claim[:60]}): about {v.seeds_needed} seeds would detect an "
                         "effect of the measured size at 80% power.")
    return "\n".join(lines) + "\n"
