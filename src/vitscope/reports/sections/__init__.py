"""Turn loaded outputs (``RunData``) into captioned figures with their data rows, per model and across models.

Each ``FigureItem`` holds the figure, the rows it plots (written as CSV next to the report, so every plotted
number can be checked against the input) and its caption. One module per analysis (``probe``, ``training``,
``curvature``, ``robustness``, ``images``); here the sections: one per run, and the comparison across runs.
"""
from __future__ import annotations

from typing import Any

from vitscope.reports import figures as F
from vitscope.reports.captions import caption
from vitscope.reports.loaders import RunData
from vitscope.reports.sections._common import FigureItem, Section, slug
from vitscope.reports.sections.curvature import curvature_items, main_group, negative_fraction
from vitscope.reports.sections.images import attention_items
from vitscope.reports.sections.probe import probe_items, sublayer_changes
from vitscope.reports.sections.robustness import robustness_items
from vitscope.reports.sections.training import training_items

__all__ = ["FigureItem", "Section", "run_section", "comparison_section", "summary_rows", "slug", "negative_fraction",
           "sublayer_changes"]


def run_section(run: RunData) -> Section:
    """Every figure the data of one directory supports (none is made for missing data)."""
    source = "; ".join(f"{p} ({', '.join(fs)})" for p, fs in run.sources)
    sec = Section(run.name, slug(run.name), source, list(run.files))
    sec.items += training_items(run, sec.notes)
    sec.items += probe_items(run, sec.notes)
    sec.items += curvature_items(run)
    if run.robustness:
        sec.items += robustness_items(run.name, run.robustness)
    if run.attention is not None:
        sec.items += attention_items(run)
    return sec


def _layer_series(runs: list[RunData], measure: str, x_key: str) -> dict[str, tuple[list, list]]:
    out = {}
    for r in runs:
        rows = r.probe.get(measure, {}).get("rows") or []
        if rows:
            n = len(rows)
            x = [row[x_key] for row in rows] if x_key != "relative" else [i / (n - 1) if n > 1 else 0.0
                                                                            for i in range(n)]
            out[r.name] = (x, [row["value"] for row in rows])
    return out


def comparison_section(runs: list[RunData]) -> Section | None:
    """Overlays of the same measure across models (HDVW and RAGHU compare ViT and ResNet this way)."""
    if len(runs) < 2:
        return None
    sec = Section("Comparison across models", "comparison")
    specs = [
        ("attention_entropy", "relative", "attention entropy (nats, mean over heads)", "attention layer (normalized)"),
        ("attention_distance", "relative", "mean attention distance (pixels)", "attention layer (normalized)"),
        ("nonlocality", "relative", "nonlocality (patches)", "attention layer (normalized)"),
        ("fourier", "normalized_depth", "Δ log amplitude (highest f)", "normalized depth"),
        ("feature_variance", "normalized_depth", "feature map variance", "normalized depth"),
    ]
    for measure, x_key, ylabel, xlabel in specs:
        series = _layer_series(runs, measure, x_key)
        if len(series) >= 2:
            fig = F.lines(series, f"{caption(measure).title.replace(' per head', '')} across models", xlabel, ylabel,
                          logy=None if measure == "feature_variance" else False)
            rows = [{"model": m, "x": x, "value": v} for m, (xs, ys) in series.items() for x, v in zip(xs, ys)]
            sec.items.append(FigureItem(f"compare_{measure}", caption(f"compare_{measure}"), fig, rows))
    acc = {r.name: ([m["epoch"] for m in r.metrics], [m.get("val_top1") for m in r.metrics])
           for r in runs if r.metrics}
    if len(acc) >= 2:
        fig = F.lines(acc, "Validation top-1 across models", "epoch", "top-1 accuracy (%)", logy=False)
        rows = [{"model": m, "epoch": x, "val_top1": v} for m, (xs, ys) in acc.items() for x, v in zip(xs, ys)]
        sec.items.append(FigureItem("compare_training_curves", caption("compare_training_curves"), fig, rows))
    rob = [r for r in runs if r.robustness]
    freq = {r.name: (r.robustness["frequency"]["freqs"], r.robustness["frequency"]["accuracy"])
            for r in rob if "frequency" in r.robustness}
    if len(freq) >= 2:
        fig = F.lines(freq, "Accuracy under band-limited noise across models", "noise frequency (0 = low, 1 = highest)",
                      "accuracy", logy=False, ylim=(0, 1.02))
        rows = [{"model": m, "frequency": x, "accuracy": v} for m, (xs, ys) in freq.items() for x, v in zip(xs, ys)]
        sec.items.append(FigureItem("compare_robustness_frequency", caption("compare_robustness_frequency"), fig, rows))
    eps, styles = {}, {}
    for i, r in enumerate(rob):
        for k, ls in (("fgsm", "-"), ("pgd", "--")):
            if k in r.robustness:
                eps[f"{r.name} {k.upper()}"] = ([e * 255 for e in r.robustness[k]["eps"]], r.robustness[k]["accuracy"])
                styles[f"{r.name} {k.upper()}"] = (i, ls)
    if len({k.rsplit(" ", 1)[0] for k in eps}) >= 2:
        fig = F.lines(eps, "Accuracy under L∞ attacks across models (FGSM solid, PGD dashed)", "eps (/255)",
                      "accuracy", logy=False, ylim=(0, 1.02), styles=styles)
        rows = [{"series": m, "eps_255": x, "accuracy": v} for m, (xs, ys) in eps.items() for x, v in zip(xs, ys)]
        sec.items.append(FigureItem("compare_robustness_eps", caption("compare_robustness_eps"), fig, rows))
    hess = [r for r in runs if r.hessian]
    if len(hess) >= 2:
        spectra, rows = {}, []
        for r in hess:
            g, spec = main_group(r.hessian)
            frac = negative_fraction(spec)
            dens = spec.get("density")
            label = f"{r.name} (negative: {frac:.1%})" if frac is not None else r.name
            spectra[label] = (spec.get("eigenvalues"), (dens["grid"], dens["density"]) if dens else None)
            rows += [{"model": r.name, "group": g, "index": i, "eigenvalue": v}
                     for i, v in enumerate(spec.get("eigenvalues", []))]
        fig = F.eigen_density("Hessian eigenvalue spectra across models", spectra)
        sec.items.append(FigureItem("compare_hessian", caption("compare_hessian"), fig, rows))
    return sec if sec.items else None


def summary_rows(runs: list[RunData]) -> list[dict[str, Any]]:
    """Accuracy (fraction), NLL, ECE, Brier per model and source (probe pass, last epoch, robustness pass)."""
    rows = []
    for r in runs:
        def row(field: str, source: str, examples: Any, r: RunData = r, **values: Any) -> dict[str, Any]:
            return {"model": r.name, "source": source, "examples": examples, **values,
                    "directory": str(r.origin.get(field, r.path))}

        if "accuracy" in r.meta or "nll" in r.meta:
            rows.append(row("probe", "probe pass", r.meta.get("examples"), accuracy=r.meta.get("accuracy"),
                            nll=r.meta.get("nll"), ece=None, brier=None))
        if r.metrics:
            last = r.metrics[-1]
            top1 = last.get("val_top1")  # percent, as DeiT logs it
            rows.append(row("metrics", f"training, epoch {last['epoch']}", last.get("val_n"),
                            accuracy=top1 / 100 if isinstance(top1, (int, float)) else None,
                            nll=last.get("val_nll"), ece=last.get("val_ece"), brier=last.get("val_brier")))
        if r.robustness:
            cal = r.robustness.get("calibration") or {}
            clean = (r.robustness.get("clean") or {}).get("accuracy", cal.get("top1"))
            occ = r.robustness.get("occlusion")
            rows.append(row("robustness", "robustness pass", r.robustness.get("n", cal.get("n")), accuracy=clean,
                            nll=cal.get("nll"), ece=cal.get("ece"), brier=cal.get("brier"),
                            occlusion_accuracy=occ.get("accuracy") if isinstance(occ, dict) else None))
    return rows
