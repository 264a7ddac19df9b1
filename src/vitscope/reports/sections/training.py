"""Figures of ``vitscope train`` runs: training curves and the probes recorded over training."""
from __future__ import annotations

import math
from typing import Any

from vitscope.reports import figures as F
from vitscope.reports.captions import caption
from vitscope.reports.loaders import RunData
from vitscope.reports.sections._common import (
    TRAIN_PROBE_LABELS,
    FigureItem,
    _mean,
    _Missing,
)


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


def training_items(run: RunData, notes: list[str]) -> list[FigureItem]:
    """The training curves and one figure per probe recorded over training (a skipped figure: a line in
    ``notes``)."""
    items = []
    if run.metrics:
        try:
            items.append(_training_curves(run.name, run.metrics))
        except _Missing as e:
            notes.append(f"training curves: no figure, {e}")
    by_measure: dict[str, list[dict[str, Any]]] = {}
    for rec in run.train_probes:
        by_measure.setdefault(rec["measure"], []).append(rec)
    order = ["gpsa_gates", "nonlocality", "attention_entropy", "attention_distance"]
    for m in sorted(by_measure, key=lambda m: (order.index(m) if m in order else len(order), m)):
        items.append(_train_probe(run.name, m, by_measure[m]))
    return items
