"""Figures of ``vitscope probe`` outputs: CKA, attention measures per head, norms, Fourier and variance over depth,
GPSA gates, lesion and localization (ViT, HDVW, RAGHU, ConViT, CB)."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from vitscope.reports import figures as F
from vitscope.reports.captions import caption
from vitscope.reports.loaders import RunData
from vitscope.reports.sections._common import (
    MSA_KINDS,
    FigureItem,
    _check_values,
    _heads,
    _Missing,
)

_logger = logging.getLogger(__name__)


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
