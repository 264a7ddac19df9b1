"""Figures of ``vitscope robustness`` outputs: reliability, band-limited noise, attacks, corruptions (HDVW, CB)."""
from __future__ import annotations

from typing import Any

from vitscope.reports import figures as F
from vitscope.reports.captions import caption
from vitscope.reports.sections._common import (
    FigureItem,
    _mean,
)


def _reliability(name: str, cal: dict[str, Any]) -> FigureItem:
    t = cal["reliability"]
    fig = F.reliability([b["lower"] for b in t], [b["upper"] for b in t], [b["accuracy"] for b in t],
                        [b["confidence"] for b in t], [b["count"] for b in t],
                        f"{name}: reliability (ECE {cal['ece']:.3f})")
    out = [{k: b.get(k) for k in ("bin", "lower", "upper", "count", "accuracy", "confidence")} for b in t]
    return FigureItem("reliability", caption("reliability"), fig, out, f"ECE {cal['ece']:.4f}")


def robustness_items(name: str, r: dict[str, Any]) -> list[FigureItem]:
    items = []
    clean = (r.get("clean") or {}).get("accuracy")
    ref = {"clean": clean} if isinstance(clean, (int, float)) else None
    if "calibration" in r:
        items.append(_reliability(name, r["calibration"]))
    if "frequency" in r:
        f = r["frequency"]
        fig = F.lines({name: (f["freqs"], f["accuracy"])}, f"{name}: accuracy under band-limited noise",
                      "noise frequency (0 = low, 1 = highest)", "accuracy", hlines=ref, logy=False, ylim=(0, 1.02))
        out = [{"frequency": a, "accuracy": b} for a, b in zip(f["freqs"], f["accuracy"])]
        items.append(FigureItem("robustness_frequency", caption("robustness_frequency"), fig, out,
                                f"noise L2 norm {f['eps']:.3g}" if isinstance(f.get("eps"), float) else ""))
    attacks = [k for k in ("fgsm", "pgd") if k in r]
    if attacks:
        series = {k.upper(): ([e * 255 for e in r[k]["eps"]], r[k]["accuracy"]) for k in attacks}
        fig = F.lines(series, f"{name}: accuracy under L∞ attacks", "eps (/255)", "accuracy", hlines=ref, logy=False,
                      ylim=(0, 1.02))
        out = [{"attack": k, "eps": e, "eps_255": e * 255, "accuracy": a}
               for k in attacks for e, a in zip(r[k]["eps"], r[k]["accuracy"])]
        items.append(FigureItem("robustness_eps", caption("robustness_eps"), fig, out))
    if "corruptions" in r and r["corruptions"]["accuracy"]:
        c = r["corruptions"]
        names = list(c["accuracy"])
        means = [_mean(c["accuracy"][n]) for n in names]
        markers = {f"severity {c['severities'][0]}": [c["accuracy"][n][0] for n in names],
                   f"severity {c['severities'][-1]}": [c["accuracy"][n][-1] for n in names]}
        fig = F.bars(names, means, f"{name}: accuracy under corruptions", "accuracy (mean over severities)",
                     hline=("clean", clean) if ref else None, markers=markers, ylim=(0, 1.02))
        out = [{"corruption": n, "severity": s, "accuracy": a}
               for n in names for s, a in zip(c["severities"], c["accuracy"][n])]
        items.append(FigureItem("robustness_corruptions", caption("robustness_corruptions"), fig, out,
                                f"mean accuracy {c['mean_accuracy']:.3f}"
                                if isinstance(c.get("mean_accuracy"), float) else ""))
    return items
