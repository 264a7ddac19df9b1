"""Verdicts of the study recipes: a measured value per seed on each side of a claim, mean +- std, and
whether the paper's direction held.

Rule (never hard-coded): with ``a`` and ``b`` the per-seed values of the two sides (``b`` may be a fixed
threshold) and ``m +- s`` their mean and sample standard deviation,

- the intervals ``[m_a - s_a, m_a + s_a]`` and ``[m_b - s_b, m_b + s_b]`` overlap -> ``inconclusive``;
- otherwise ``held`` when ``m_a`` lies on the side the paper predicts, else ``did not hold``.

Fewer than 2 seeds give no spread: the verdict is then ``inconclusive`` (the table says why).
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Verdict", "summarize", "decide", "verdict_rows", "to_markdown", "to_csv", "HELD", "NOT_HELD",
           "INCONCLUSIVE", "EXPECT"]

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
EXPECT = {"greater": ">", "less": "<"}


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of finite ``values``."""
    vals = [float(v) for v in values]
    if not vals or any(not math.isfinite(v) for v in vals):
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def decide(a: Sequence[float], b: Sequence[float], expect: str) -> tuple[str, str]:
    """``(verdict, reason)`` for the claim ``mean(a) <expect> mean(b)`` (``expect`` greater or less)."""
    if expect not in EXPECT:
        raise ValueError(f"expect must be one of {list(EXPECT)}, got {expect!r}")
    ma, sa = summarize(a)
    mb, sb = summarize(b)
    if not (math.isfinite(ma) and math.isfinite(mb)):
        return INCONCLUSIVE, "a measured value is missing or not finite"
    if len(a) < 2 and len(b) < 2:
        return INCONCLUSIVE, "one seed: no spread to judge the difference (use --seeds 2 or more)"
    if ma - sa <= mb + sb and mb - sb <= ma + sa:
        return INCONCLUSIVE, "the mean +- std intervals overlap"
    held = ma > mb if expect == "greater" else ma < mb
    return (HELD, "intervals separate, in the paper's direction") if held else \
        (NOT_HELD, "intervals separate, against the paper's direction")


@dataclass
class Verdict:
    """One claim of a study, its measured sides and the outcome."""

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

    @classmethod
    def build(cls, study: str, finding: int, claim: str, a_label: str, b_label: str, expect: str,
              a_values: Sequence[float], b_values: Sequence[float]) -> Verdict:
        ma, sa = summarize(a_values)
        mb, sb = summarize(b_values)
        verdict, reason = decide(a_values, b_values, expect)
        return cls(study, finding, claim, a_label, b_label, expect, [float(v) for v in a_values],
                   [float(v) for v in b_values], ma, sa, mb, sb, verdict, reason)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if n < 2:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {std:.2g}"


def verdict_rows(verdicts: Sequence[Verdict]) -> list[dict[str, Any]]:
    """Flat rows (for CSV and printing): finding, claim, the two measured sides, the verdict."""
    return [{
        "finding": v.finding, "claim": v.claim,
        "measured": f"{v.a_label} {EXPECT[v.expect]} {v.b_label}?",
        "a": _fmt(v.a_mean, v.a_std, len(v.a_values)), "b": _fmt(v.b_mean, v.b_std, len(v.b_values)),
        "seeds": max(len(v.a_values), len(v.b_values)), "verdict": v.verdict, "reason": v.reason,
        "a_mean": v.a_mean, "a_std": v.a_std, "b_mean": v.b_mean, "b_std": v.b_std,
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


def to_markdown(verdicts: Sequence[Verdict], title: str = "") -> str:
    """A Markdown table: finding, claim, measured comparison, side a, side b, seeds, verdict."""
    cols = ["finding", "claim", "measured", "a", "b", "seeds", "verdict"]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(["#", "paper's claim", "measured", "a (mean ± std)", "b (mean ± std)", "seeds",
                                 "verdict"]) + " |", "|" + "---|" * len(cols)]
    for row in verdict_rows(verdicts):
        lines.append("| " + " | ".join(_md_cell(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"
