"""Turn loaded outputs (``RunData``) into captioned figures with their data rows, per model and across models.

Each ``FigureItem`` holds the figure, the rows it plots (written as CSV next to the report, so every plotted
number can be checked against the input) and its caption.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

from vitscope.reports import figures as F
from vitscope.reports.captions import Caption, caption
from vitscope.reports.loaders import RunData

_logger = logging.getLogger(__name__)

__all__ = ["FigureItem", "Section", "run_section", "comparison_section", "summary_rows", "slug"]

MSA_KINDS = ("msa", "gpsa")
TRAIN_PROBE_LABELS = {
    "attention_entropy": "attention entropy (nats)",
    "attention_distance": "mean attention distance (pixels)",
    "nonlocality": "nonlocality (patches)",
    "gpsa_gates": "gate sigmoid(λ)",
}


class _Missing(Exception):
    """The data of a figure is present but holds no finite value: the figure is skipped with a note."""


@dataclass
class FigureItem:
    key: str
    caption: Caption
    figure: Figure
    rows: list[dict[str, Any]]
    note: str = ""


@dataclass
class Section:
    title: str
    slug: str
    path: str = ""
    files: list[str] = field(default_factory=list)
    items: list[FigureItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "model"


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def _heads(row: dict[str, Any]) -> list[float | None]:
    h = row.get("heads")
    return list(h) if isinstance(h, list) and h else [row.get("value")]


# ------------------------------------------------------------------------------------------- probe figures


def _cka(name: str, res: dict[str, Any]) -> FigureItem:
    layers = res["layers"]
    fig = F.heatmap(res["matrix"], layers, layers, f"{name}: CKA between sub-layers")
    rows = [{"layer": a, "other_layer": b, "value": res["matrix"][i][j]}
            for i, a in enumerate(layers) for j, b in enumerate(layers)]
    return FigureItem("cka", caption("cka"), fig, rows, f"{res.get('examples', '?')} examples")


def _cka_cross(name: str, res: dict[str, Any]) -> FigureItem:
    """RAGHU Fig. 2: model A's layers (rows, depth up) against model B's (columns); one run at two epochs is the
    checkpoint-to-checkpoint matrix (``vitscope compare RUN@a RUN@b``)."""
    model, other = res.get("model", name), res.get("other_model", "other model")
    key = "cka_checkpoints" if res.get("over_training") else "cka_cross"
    title = f"CKA: {model} vs {other}" + (" (one run, two epochs)" if key == "cka_checkpoints" else "")
    fig = F.heatmap(res["matrix"], res["layers"], res["other_layers"], title, xlabel=f"{other} layer",
                    ylabel=f"{model} layer")
    rows = [{"model": model, "layer": a, "other_model": other, "other_layer": b, "value": res["matrix"][i][j]}
            for i, a in enumerate(res["layers"]) for j, b in enumerate(res["other_layers"])]
    examples = res.get("examples")
    return FigureItem(key, caption(key), fig, rows, f"{examples} examples" if examples else "")


def _linear_probe(name: str, rows: list[dict[str, Any]]) -> FigureItem:
    """RAGHU Fig. 12-13: few-shot probe accuracy against normalized depth, one line per model, read-out and k."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    shots = sorted({r["shots"] for r in rows})
    series: dict[str, tuple[list, list]] = {}
    styles: dict[str, tuple[int, str]] = {}
    for r in sorted(rows, key=lambda r: (models.index(r["model"]), r["readout"], r["shots"], r["normalized_depth"])):
        label = (f"{r['model']} " if len(models) > 1 else "") + f"{r['readout']}, {r['shots']}-shot"
        xs, ys = series.setdefault(label, ([], []))
        xs.append(r["normalized_depth"])
        ys.append(r["accuracy"])
        # one colour per model and k, solid for the class token, dashed for the average pool
        styles[label] = (models.index(r["model"]) * len(shots) + shots.index(r["shots"]),
                         "-" if r["readout"] == "cls" else "--")
    fig = F.lines(series, f"{name}: few-shot linear probes", "normalized depth", "held-out accuracy", logy=False,
                  ylim=(0, 1.02), styles=styles)
    out = [{k: r.get(k) for k in ("model", "layer", "depth", "normalized_depth", "readout", "shots", "accuracy",
                                  "alpha")} for r in rows]
    return FigureItem("linear_probe", caption("linear_probe"), fig, out)


def _per_head(key: str, name: str, rows: list[dict[str, Any]], ylabel: str, bound: bool = False) -> FigureItem:
    x = [r["block"] for r in rows]
    heads = [_heads(r) for r in rows]
    bounds = [r.get("max_entropy") for r in rows] if bound else None
    fig = F.per_head(x, heads, [r["value"] for r in rows], f"{name}: {caption(key).title.lower()}", "block",
                     ylabel, bound=bounds, bound_label="ln N (uniform attention)")
    out = []
    for r, hs in zip(rows, heads):
        for h, v in enumerate(hs):
            row = {"layer": r.get("layer", ""), "kind": r.get("kind", ""), "block": r["block"], "head": h,
                   "value": v, "mean_over_heads": r["value"]}
            if bound:
                row["ln_n"] = r.get("max_entropy")
            out.append(row)
    note = ""
    if bound:
        pairs = [(r["value"], r["max_entropy"]) for r in rows if r.get("value") is not None and r.get("max_entropy")]
        if pairs:
            frac = sum(v / m for v, m in pairs) / len(pairs)
            note = f"Observed: entropy is on average {100 * frac:.0f}% of ln N"
    return FigureItem(key, caption(key), fig, out, note)


def _ratio_of_norms(name: str, rows: list[dict[str, Any]]) -> FigureItem:
    series: dict[str, tuple[list[float], list[float | None]]] = {}
    out = []
    for token, label in (("cls", "class token"), ("spatial", "spatial tokens")):
        for kind in dict.fromkeys(r["kind"] for r in rows):
            sel = [r for r in rows if r["kind"] == kind and r.get(token) is not None]
            if not sel:
                continue
            series[f"{label} ({kind})"] = ([r["block"] for r in sel], [r[token] for r in sel])
            out += [{"layer": r.get("layer", ""), "kind": kind, "block": r["block"], "token": token,
                     "value": r[token]} for r in sel]
    if not series:
        raise _Missing("every ratio is missing (non-finite, e.g. a zero-initialised branch gives ||f(z)|| = 0)")
    fig = F.lines(series, f"{name}: ratio of norms ||z|| / ||f(z)||", "block", "ratio of norms", logy=True)
    return FigureItem("ratio_of_norms", caption("ratio_of_norms"), fig, out)


def _msa_spans(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """A band one sub-layer wide centred on each MSA (or GPSA) sub-layer's output (HDVW's grey areas)."""
    xs = sorted({float(r["normalized_depth"]) for r in rows})
    diffs = [b - a for a, b in zip(xs, xs[1:]) if b > a]
    half = (min(diffs) if diffs else 0.05) / 2
    return [(float(r["normalized_depth"]) - half, float(r["normalized_depth"]) + half)
            for r in rows if r["kind"] in MSA_KINDS]


def sublayer_changes(rows: list[dict[str, Any]], log: bool = False) -> str:
    """What each kind of sub-layer does to the measure: the mean change from the previous sub-layer's output
    to its own (``ln`` ratio with ``log``), per kind; only consecutive sub-layers (by ``depth``) count."""
    by_kind: dict[str, list[float]] = {}
    for prev, cur in zip(rows, rows[1:]):
        a, b = prev.get("value"), cur.get("value")
        if "depth" in cur and cur["depth"] != prev.get("depth", -2) + 1 or a is None or b is None:
            continue
        if log:
            if a <= 0 or b <= 0:
                continue
            change = math.log(b / a)
        else:
            change = b - a
        by_kind.setdefault(cur["kind"], []).append(change)
    if not by_kind:
        return ""
    what = "mean ln(after / before)" if log else "mean change"
    parts = [f"{k} {sum(v) / len(v):+.3g} ({len(v)} sub-layer{'s' if len(v) > 1 else ''})" for k, v in by_kind.items()]
    return f"Observed {what} per sub-layer kind: " + ", ".join(parts)


def _depth_measure(key: str, name: str, rows: list[dict[str, Any]], ylabel: str) -> list[FigureItem]:
    x = [r["normalized_depth"] for r in rows]
    y = [r["value"] for r in rows]
    fig = F.shaded_depth({"sub-layer output": (x, y)}, _msa_spans(rows), f"{name}: {caption(key).title.lower()}",
                         ylabel, logy=None if key == "feature_variance" else False)
    out = [{"layer": r.get("layer", ""), "kind": r["kind"], "normalized_depth": r["normalized_depth"],
            "value": r["value"]} for r in rows]
    items = [FigureItem(key, caption(key), fig, out, sublayer_changes(rows, log=key == "feature_variance"))]
    curves = [r.get("curve") for r in rows]
    if key == "fourier" and all(isinstance(c, list) and len(c) > 1 for c in curves):
        fig2 = F.colored_curves(curves, x, f"{name}: relative log amplitude")
        out2 = [{"layer": r.get("layer", ""), "normalized_depth": r["normalized_depth"], "frequency_index": i,
                 "frequency": i / (len(c) - 1), "value": v} for r, c in zip(rows, curves) for i, v in enumerate(c)]
        items.append(FigureItem("fourier_curves", caption("fourier_curves"), fig2, out2,
                                "frequency 1 = π (the highest)"))
    return items


def _gpsa_gates(name: str, rows: list[dict[str, Any]]) -> FigureItem:
    fig = F.per_head([r["block"] for r in rows], [_heads(r) for r in rows], [r["value"] for r in rows],
                     f"{name}: GPSA gates", "GPSA layer", "gate sigmoid(λ)")
    fig.axes[0].set_ylim(0, 1)
    out = [{"layer": r.get("layer", ""), "block": r["block"], "head": h, "value": v}
           for r in rows for h, v in enumerate(_heads(r))]
    return FigureItem("gpsa_gates", caption("gpsa_gates"), fig, out)


def _lesion(name: str, rows: list[dict[str, Any]]) -> FigureItem:
    studies = list(dict.fromkeys(r.get("study", "lesion") for r in rows))
    labels = [(f"{r.get('study', '')}:" if len(studies) > 1 else "") + str(r["name"]) for r in rows]
    intact = rows[0].get("intact_accuracy") if rows else None
    fig = F.bars(labels, [r["accuracy_drop"] for r in rows], f"{name}: accuracy drop when a unit is removed",
                 "accuracy drop (intact − lesioned)", kinds=[r["kind"] for r in rows])
    out = [{"study": r.get("study", ""), "name": r["name"], "kind": r["kind"], "block": r.get("block"),
            "accuracy": r.get("accuracy"), "accuracy_drop": r["accuracy_drop"],
            "nll_increase": r.get("nll_increase")} for r in rows]
    note = f"intact accuracy {intact:.3f}" if isinstance(intact, float) else ""
    return FigureItem("lesion", caption("lesion"), fig, out, note)


def _localization(name: str, rows: list[dict[str, Any]]) -> FigureItem:
    series = {"held-out accuracy": ([r["block"] for r in rows], [r["accuracy"] for r in rows])}
    if all("train_accuracy" in r for r in rows):
        series["train accuracy"] = ([r["block"] for r in rows], [r["train_accuracy"] for r in rows])
    chance = rows[0].get("chance") if rows else None
    fig = F.lines(series, f"{name}: position probe accuracy", "block", "accuracy",
                  hlines={"chance": chance} if isinstance(chance, float) else None, logy=False, ylim=(0, 1.02))
    out = [{"name": r["name"], "block": r["block"], "accuracy": r["accuracy"],
            "train_accuracy": r.get("train_accuracy"), "chance": r.get("chance")} for r in rows]
    return FigureItem("localization", caption("localization"), fig, out)


def _check_values(rows: list[dict[str, Any]], key: str = "value") -> None:
    if rows and all(r.get(key) is None for r in rows):
        raise _Missing(f"every {key!r} is missing (non-finite in the probe output)")


def probe_items(run: RunData, notes: list[str] | None = None) -> list[FigureItem]:
    """Figures of ``results.json``, in the papers' order; a measure without finite values is noted and skipped."""
    p, name, items = run.probe, run.name, []
    builders: list[tuple[str, Callable[[], list[FigureItem]]]] = [
        ("cka", lambda: [_cka(name, p["cka"])]),
        ("cka_cross", lambda: [_cka_cross(name, p["cka_cross"])]),
        ("attention_distance", lambda: [_per_head("attention_distance", name, p["attention_distance"]["rows"],
                                                  "mean attention distance (pixels)")]),
        ("attention_entropy", lambda: [_per_head("attention_entropy", name, p["attention_entropy"]["rows"],
                                                 "attention entropy (nats)", bound=True)]),
        ("nonlocality", lambda: [_per_head("nonlocality", name, p["nonlocality"]["rows"],
                                           "nonlocality (patches)")]),
        ("relative_distance", lambda: [_per_head("relative_distance", name, p["relative_distance"]["rows"],
                                                 "relative distance")]),
        ("gpsa_gates", lambda: [_gpsa_gates(name, p["gpsa_gates"]["rows"])]),
        ("ratio_of_norms", lambda: [_ratio_of_norms(name, p["ratio_of_norms"]["rows"])]),
        ("fourier", lambda: _depth_measure("fourier", name, p["fourier"]["rows"], "Δ log amplitude (highest f)")),
        ("feature_variance", lambda: _depth_measure("feature_variance", name, p["feature_variance"]["rows"],
                                                    "feature map variance")),
        ("lesion", lambda: [_lesion(name, p["lesion"]["rows"])]),
        ("localization", lambda: [_localization(name, p["localization"]["rows"])]),
        ("linear_probe", lambda: [_linear_probe(name, p["linear_probe"]["rows"])]),
    ]
    for key, build in builders:
        if key in p and (p[key].get("rows") or key.startswith("cka")):
            try:
                if key not in ("cka", "cka_cross", "ratio_of_norms", "lesion", "localization", "linear_probe"):
                    _check_values(p[key]["rows"])
                items += build()
            except _Missing as e:
                _logger.warning("%s: no %s figure: %s", run.path, key, e)
                if notes is not None:
                    notes.append(f"{key}: no figure, {e}")
    return items


# ---------------------------------------------------------------------------------------- training figures


def _training_curves(name: str, metrics: list[dict[str, Any]]) -> FigureItem:
    ep = [r["epoch"] for r in metrics]
    acc = {k.replace("_", " "): (ep, [r.get(k) for r in metrics])
           for k in ("val_top1", "val_ema_top1") if any(k in r for r in metrics)}
    loss = {k.replace("_", " "): (ep, [r.get(k) for r in metrics])
            for k in ("train_loss", "val_nll") if any(k in r for r in metrics)}
    specs = [(s, lab) for s, lab in ((acc, "top-1 accuracy (%)"), (loss, "loss / NLL (nats)")) if s]
    if not specs:
        raise _Missing("metrics.jsonl has no val_top1, train_loss or val_nll")
    fig = F.panels(specs, f"{name}: training curves", "epoch")
    keys = ("epoch", "train_loss", "val_top1", "val_nll", "val_ece", "val_brier", "val_ema_top1")
    out = [{k: r.get(k) for k in keys if any(k in m for m in metrics)} for r in metrics]
    return FigureItem("training_curves", caption("training_curves"), fig, out)


def _train_probe(name: str, measure: str, records: list[dict[str, Any]]) -> FigureItem:
    records = sorted(records, key=lambda r: r["epoch"])
    layers = list(dict.fromkeys(layer for r in records for layer in r["layers"]))
    x = [r["epoch"] + 1 for r in records]
    series = {}
    out = []
    for layer in layers:
        mean, lo, hi = [], [], []
        for r in records:
            vals = r["values"][r["layers"].index(layer)] if layer in r["layers"] else None
            heads = vals if isinstance(vals, list) else [vals]
            finite = [v for v in heads if isinstance(v, (int, float)) and math.isfinite(v)]
            mean.append(_mean(finite))
            lo.append(min(finite) if finite else None)
            hi.append(max(finite) if finite else None)
            out += [{"epoch": r["epoch"], "epochs_trained": r["epoch"] + 1, "layer": layer, "head": h, "value": v}
                    for h, v in enumerate(heads)]
        label = f"GPSA layer {layer}" if measure == "gpsa_gates" and layer.isdigit() else layer
        series[label] = (mean, lo, hi)
    key = f"train_{measure}"
    title = caption(key).title if key in ("train_gpsa_gates", "train_nonlocality", "train_attention_entropy",
                                          "train_attention_distance") else f"{measure} over training"
    fig = F.band_lines(x, series, f"{name}: {title[0].lower() + title[1:]}", "epochs trained (0 = init)",
                       TRAIN_PROBE_LABELS.get(measure, measure))
    return FigureItem(key, caption(key), fig, out)


# ------------------------------------------------------------------------------------ curvature figures


def negative_fraction(h: dict[str, Any]) -> float | None:
    """Fraction of negative eigenvalues of one spectrum: from its eigenvalues; else the SLQ weight on negative
    nodes (mean over probes); else the trapezoid integral of the density over negative eigenvalues."""
    if "eigenvalues" in h:
        e = h["eigenvalues"]
        return sum(1 for v in e if v < 0) / len(e)
    dens = h.get("density", {})
    if "nodes" in dens:
        fr = []
        for ts, ws in zip(dens["nodes"], dens["weights"]):
            total = sum(w for w in ws if w is not None)
            if total > 0:
                fr.append(sum(w for t, w in zip(ts, ws) if t is not None and w is not None and t < 0) / total)
        return sum(fr) / len(fr) if fr else None
    if dens:
        pairs = [(a, b) for a, b in zip(dens["grid"], dens["density"]) if a is not None and b is not None]
        total = neg = 0.0
        for (x0, y0), (x1, y1) in zip(pairs, pairs[1:]):
            total += (x1 - x0) * (y0 + y1) / 2
            if x1 <= 0:
                neg += (x1 - x0) * (y0 + y1) / 2
            elif x0 < 0:  # the segment crosses 0: the part left of it, density interpolated linearly
                y_at_0 = y0 + (y1 - y0) * (0 - x0) / (x1 - x0)
                neg += (0 - x0) * (y0 + y_at_0) / 2
        return neg / total if total > 0 else None
    return None


def _main_group(h: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    groups = h["groups"]
    return ("all", groups["all"]) if "all" in groups else next(iter(groups.items()))


def _hessian(name: str, h: dict[str, Any]) -> FigureItem:
    spectra, out, notes = {}, [], []
    many = len(h["groups"]) > 1
    for g, spec in h["groups"].items():
        frac = negative_fraction(spec)
        label = (f"{g} parameters" if many else name) + (f" (negative: {frac:.1%})" if frac is not None else "")
        dens = spec.get("density")
        spectra[label] = (spec.get("eigenvalues"), (dens["grid"], dens["density"]) if dens else None)
        out += [{"group": g, "index": i, "eigenvalue": v} for i, v in enumerate(spec.get("eigenvalues", []))]
        if dens:
            out += [{"group": g, "grid": x, "density": d} for x, d in zip(dens["grid"], dens["density"])]
        n = len(spec.get("eigenvalues", []))
        notes.append((f"{g}: " if many else "") + (f"{n} eigenvalues, " if n else "")
                     + (f"negative fraction {frac:.3f}" if frac is not None else "no negative fraction"))
    fig = F.eigen_density(f"{name}: Hessian eigenvalue spectrum", spectra)
    return FigureItem("hessian", caption("hessian"), fig, out, "; ".join(notes))


def _landscape(name: str, ls: dict[str, Any]) -> FigureItem:
    if "y" in ls:
        fig = F.contour(ls["x"], ls["y"], ls["loss"], f"{name}: loss landscape")
        out = [{"x": x, "y": y, "loss": ls["loss"][j][i]} for j, y in enumerate(ls["y"]) for i, x in enumerate(ls["x"])]
    else:
        fig = F.lines({name: (ls["x"], ls["loss"])}, f"{name}: loss along a random direction", "step along direction",
                      "loss", logy=False, markers=False)
        out = [{"x": x, "loss": v} for x, v in zip(ls["x"], ls["loss"])]
    return FigureItem("landscape", caption("landscape"), fig, out)


# ----------------------------------------------------------------------------------- robustness figures


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


# ------------------------------------------------------------------------------------ figures on images


def _grid_rows(values: Any, **fixed: Any) -> list[dict[str, Any]]:
    """One row per cell of a (h, w) map: ``fixed`` columns, then row, col and the value."""
    h, w = values.shape
    flat = values.ravel().tolist()
    return [{**fixed, "row": i // w, "col": i % w, "value": v} for i, v in enumerate(flat)]


def attention_items(run: RunData) -> list[FigureItem]:
    """Figures of ``attention.npz`` (``vitscope attention``): ViT Fig. 6 and 7, CONVIT Fig. 5."""
    from vitscope.reports import image_figures as IF

    a, name, items = run.attention, run.name, []
    labels = a.meta.get("labels") if isinstance(a.meta.get("labels"), list) else []
    n_img = a.images.shape[0]
    img_note = f"{n_img} image{'s' * (n_img > 1)} ({', '.join(str(x) for x in labels)})" if labels else \
        f"{n_img} images"
    if a.patch_components is not None:
        fig = IF.patch_components_figure(a, f"{name}: patch-embedding filters, first {len(a.patch_components)} "
                                            "principal components")
        rows = [{"component": k, "explained_variance_ratio": float(a.patch_explained[k]), "channel": c, "y": y,
                 "x": x, "value": float(a.patch_components[k, c, y, x])}
                for k in range(a.patch_components.shape[0]) for c in range(a.patch_components.shape[1])
                for y in range(a.patch_components.shape[2]) for x in range(a.patch_components.shape[3])]
        share = float(a.patch_explained.sum())
        items.append(FigureItem("patch_embedding_components", caption("patch_embedding_components"), fig, rows,
                                f"Observed: these components explain {100 * share:.0f}% of the filters' variance"))
    if a.position_similarity is not None:
        h, w = a.position_grid
        fig = IF.position_similarity_figure(a, f"{name}: position-embedding similarity ({h}x{w} patches)")
        sim = a.position_similarity
        rows = []
        for i in range(h * w):
            rows += _grid_rows(sim[i].reshape(h, w), position=i, position_row=i // w, position_col=i % w)
        items.append(FigureItem("position_embedding_similarity", caption("position_embedding_similarity"), fig,
                                rows, _position_note(sim, h, w)))
    if a.rollout is not None:
        fig = IF.rollout_figure(a, f"{name}: attention rollout ({a.rollout_source})")
        rows = []
        for b in range(n_img):
            rows += _grid_rows(a.rollout[b], image=b, label=labels[b] if b < len(labels) else "")
        items.append(FigureItem("attention_rollout", caption("attention_rollout"), fig, rows,
                                f"{img_note}; read-out: {a.rollout_source}"))
    if a.query_maps:
        fig = IF.query_maps_figure(a, title=f"{name}: attention of query patch {a.query}, layers (rows) x heads "
                                            "(columns), per image")
        rows = []
        for layer, kind, cell, m in zip(a.layers, a.kinds, a.query_cells, a.query_maps):
            for b in range(m.shape[0]):
                for hd in range(m.shape[1]):
                    rows += _grid_rows(m[b, hd], image=b, layer=layer, kind=kind, head=hd, query_row=cell[0],
                                       query_col=cell[1])
        items.append(FigureItem("attention_query_maps", caption("attention_query_maps"), fig, rows,
                                f"{img_note}; query patch {a.query} of a {a.query_grid[0]}x{a.query_grid[1]} grid"))
    if a.gpsa_gates is not None and a.gpsa_positional is not None:
        fig = IF.gpsa_figure(a, f"{name}: GPSA gates and positional attention of patch {a.query}")
        rows = []
        for i, layer in enumerate(a.gpsa_layers or [str(i) for i in range(len(a.gpsa_gates))]):
            for hd in range(a.gpsa_gates.shape[1]):
                rows += _grid_rows(a.gpsa_positional[i, hd], layer=layer, head=hd, gate=float(a.gpsa_gates[i, hd]))
        items.append(FigureItem("gpsa_positional", caption("gpsa_positional"), fig, rows,
                                f"mean gate {float(a.gpsa_gates.mean()):.3f}"))
    return items


def _position_note(sim: Any, h: int, w: int) -> str:
    """Mean similarity of neighbours vs. of distant positions, and of same row/column vs. others (ViT Fig. 7)."""
    import numpy as np

    r, c = np.divmod(np.arange(h * w), w)
    dist = np.hypot(r[:, None] - r[None], c[:, None] - c[None])
    off = ~np.eye(h * w, dtype=bool)
    near, far = sim[(dist == 1)], sim[off & (dist > max(h, w) / 2)]
    same = sim[off & ((r[:, None] == r[None]) | (c[:, None] == c[None]))]
    other = sim[(r[:, None] != r[None]) & (c[:, None] != c[None])]
    parts = []
    if near.size and far.size:
        parts.append(f"mean similarity of adjacent patches {near.mean():.3f} vs. distant ones {far.mean():.3f}")
    if same.size and other.size:
        parts.append(f"same row or column {same.mean():.3f} vs. others {other.mean():.3f}")
    return ("Observed: " + "; ".join(parts)) if parts else ""


# --------------------------------------------------------------------------------------------- sections


def run_section(run: RunData) -> Section:
    """Every figure the data of one directory supports (none is made for missing data)."""
    source = "; ".join(f"{p} ({', '.join(fs)})" for p, fs in run.sources)
    sec = Section(run.name, slug(run.name), source, list(run.files))
    if run.metrics:
        try:
            sec.items.append(_training_curves(run.name, run.metrics))
        except _Missing as e:
            sec.notes.append(f"training curves: no figure, {e}")
    by_measure: dict[str, list[dict[str, Any]]] = {}
    for rec in run.train_probes:
        by_measure.setdefault(rec["measure"], []).append(rec)
    order = ["gpsa_gates", "nonlocality", "attention_entropy", "attention_distance"]
    for m in sorted(by_measure, key=lambda m: (order.index(m) if m in order else len(order), m)):
        sec.items.append(_train_probe(run.name, m, by_measure[m]))
    sec.items += probe_items(run, sec.notes)
    if run.hessian:
        sec.items.append(_hessian(run.name, run.hessian))
    if run.landscape:
        sec.items.append(_landscape(run.name, run.landscape))
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
            g, spec = _main_group(r.hessian)
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
