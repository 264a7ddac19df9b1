"""The scalar quantities the study recipes compare, each read from one trained model's analysis outputs.

An analysis is a dict with any of: ``eval`` (``evaluate_classifier``), ``probe`` (``ProbeResult.to_dict()``),
``train_probes`` (the run's ``probes.jsonl`` records), ``hessian`` (``run_hessian``), ``robustness``
(``run_robustness``). A metric is ``name`` or ``name:arg`` (e.g. ``fourier_change:msa``); ``METRICS`` maps
each name to its function and to what it needs computed. Depth splits use the probe's
``normalized_depth`` (sub-layer index / (count - 1)): "early" is < 0.5, "late" >= 0.5.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["METRICS", "Metric", "compute_metric", "metric_needs", "parse_metric"]


@dataclass(frozen=True)
class Metric:
    fn: Callable[[dict[str, Any], str], float]
    needs: tuple[str, ...]  # "eval", "hessian", "frequency", "train_probes", or "probe:<measure>"
    doc: str


def _mean(values: Sequence[float | None], what: str) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        raise ValueError(f"no finite value for {what}; the model may lack the layers this metric needs")
    return sum(vals) / len(vals)


def _rows(a: dict[str, Any], measure: str) -> list[dict[str, Any]]:
    try:
        return a["probe"][measure]["rows"]
    except KeyError:
        raise ValueError(f"the analysis has no {measure!r} probe; the model may not support it") from None


def _split(rows: list[dict[str, Any]], half: str) -> list[dict[str, Any]]:
    if half == "early":
        return [r for r in rows if r["normalized_depth"] < 0.5]
    if half == "late":
        return [r for r in rows if r["normalized_depth"] >= 0.5]
    return rows


def _accuracy(a: dict[str, Any], arg: str) -> float:
    return float(a["eval"]["accuracy"])


def _balanced(a: dict[str, Any], arg: str) -> float:
    return float(a["eval"]["balanced_accuracy"])


def _entropy(a: dict[str, Any], arg: str) -> float:
    return _mean([r["value"] for r in _split(_rows(a, "attention_entropy"), arg)], f"attention entropy ({arg})")


def _entropy_rel(a: dict[str, Any], arg: str) -> float:
    rows = _split(_rows(a, "attention_entropy"), arg)
    return _mean([r["value"] / r["max_entropy"] for r in rows], "attention entropy / ln N")


KINDS = ("msa", "gpsa", "mlp", "conv", "downsample", "smoothing")


def _changes(rows: list[dict[str, Any]], kind: str, log: bool) -> list[float]:
    """Change of a per-sub-layer value across each sub-layer of ``kind`` (its output minus its input, the
    previous sub-layer's output). ``kind`` is a capture kind (``msa``, ``gpsa``, ``mlp``, ``conv`` = conv blocks
    that keep the map size, ``downsample`` = strided / pooling blocks, ``smoothing`` = spatial-smoothing layers,
    e.g. the blurs between the stages of a smoothing ResNet), optionally with ``_early`` / ``_late``
    (normalized depth < / >= 0.5: HDVW notes early MSAs can act unlike late ones).

    Only two cases leave a row of ``kind`` out, both because its input was not measured: the first sub-layer
    (the stem's output is not captured) and a sub-layer whose input map is 1 x 1 (absent from the probe).
    Any other row of ``kind`` that cannot be used (a missing value, or a variance <= 0 for the log ratio)
    raises ``ValueError`` naming it, rather than being dropped silently."""
    base, _, half = kind.partition("_")
    if base not in KINDS or half not in ("", "early", "late"):
        raise ValueError(f"sub-layer kind must be one of {', '.join(KINDS)}, optionally with _early or _late; "
                         f"got {kind!r}")
    by_depth = {r["depth"]: r for r in rows}
    out = []
    for d, r in sorted(by_depth.items()):
        if r["kind"] != base:
            continue
        if half and (r["normalized_depth"] < 0.5) != (half == "early"):
            continue
        prev = by_depth.get(d - 1)
        if prev is None:  # its input was not measured (first sub-layer, or a 1 x 1 input map)
            continue
        name = r.get("layer", f"depth {d}")
        for row in (r, prev):
            v = row["value"]
            if v is None or not math.isfinite(float(v)) or (log and float(v) <= 0):
                raise ValueError(f"sub-layer {row.get('layer', row['depth'])!r} has value {v!r}, so the change across "
                                 f"{kind} sub-layer {name!r} is undefined; check the probe's rows")
        if log:
            out.append(math.log(r["value"] / prev["value"]))
        else:
            out.append(r["value"] - prev["value"])
    return out


def _fourier_change(a: dict[str, Any], kind: str) -> float:
    return _mean(_changes(_rows(a, "fourier"), kind, log=False), f"high-frequency change across {kind} sub-layers")


def _variance_change(a: dict[str, Any], kind: str) -> float:
    return _mean(_changes(_rows(a, "feature_variance"), kind, log=True), f"variance log-ratio across {kind}")


def _high_freq_drop(a: dict[str, Any], arg: str) -> float:
    threshold = float(arg) if arg else 0.7
    freq = a["robustness"]["frequency"]
    drops = [d for f, d in zip(freq["freqs"], freq["error_increase"]) if f >= threshold - 1e-9]
    return _mean(drops, f"accuracy drop under noise at frequencies >= {threshold}")


def _cka_offdiag(a: dict[str, Any], arg: str) -> float:
    """Mean CKA between distinct layers; ``blocks``: only block outputs (a transformer's MLP sub-layer outputs,
    every CNN block), so a ViT and a ResNet are compared at one granularity (RAGHU compares blocks)."""
    mat = a["probe"]["cka"]["matrix"]
    n = len(mat)
    keep = list(range(n))
    if arg == "blocks":
        kinds = {r["depth"]: r["kind"] for r in _rows(a, "cka")}
        keep = [i for i in range(n) if kinds.get(i) not in ("msa", "gpsa")]
    elif arg:
        raise ValueError(f"cka_offdiag takes no argument or 'blocks', got {arg!r}")
    return _mean([mat[i][j] for i in keep for j in keep if i != j], "off-diagonal CKA")


def _attn_distance(a: dict[str, Any], arg: str) -> float:
    rows = _rows(a, "attention_distance")
    if arg == "first":
        rows = [min(rows, key=lambda r: r["depth"])]
    else:
        rows = _split(rows, arg)
    return _mean([r["value"] for r in rows], f"attention distance ({arg})")


def _head_spread(a: dict[str, Any], arg: str) -> float:
    """Standard deviation over heads of the mean attention distance, averaged over the layers of ``arg``."""
    spreads = []
    for r in _split(_rows(a, "attention_distance"), arg):
        h = r["heads"]
        m = sum(h) / len(h)
        spreads.append(math.sqrt(sum((x - m) ** 2 for x in h) / len(h)))
    return _mean(spreads, f"head spread of attention distance ({arg})")


def _ratio_of_norms(a: dict[str, Any], arg: str) -> float:
    token, _, half = arg.partition("_")
    if token not in ("cls", "spatial"):
        raise ValueError(f"ratio_of_norms metric takes cls_<half> or spatial_<half>, got {arg!r}")
    rows = _split(_rows(a, "ratio_of_norms"), half)
    return _mean([r.get(token) for r in rows], f"ratio of norms ({arg})")


def _hessian_neg(a: dict[str, Any], arg: str) -> float:
    return float(a["hessian"]["negative_fraction"])


def _hessian_max_abs(a: dict[str, Any], arg: str) -> float:
    return float(a["hessian"]["max_abs_eigenvalue"])


def _gates(a: dict[str, Any], arg: str) -> float:
    """Mean GPSA gate sigmoid(gating_param) over layers and heads: ``init`` (epoch -1 of the run's probes)
    or ``final`` (the last recorded epoch)."""
    recs = [r for r in a.get("train_probes", []) if r["measure"] == "gpsa_gates"]
    if not recs:
        raise ValueError("the run recorded no gpsa_gates probe (train with probes.measures=[gpsa_gates])")
    rec = min(recs, key=lambda r: r["epoch"]) if arg == "init" else max(recs, key=lambda r: r["epoch"])
    flat = [x for v in rec["values"] for x in (v if isinstance(v, list) else [v])]
    return _mean(flat, f"GPSA gates ({arg})")


def _nonlocality(a: dict[str, Any], arg: str) -> float:
    """Nonlocality of the GPSA layers in the ``early`` or ``late`` half of the GPSA stack."""
    rows = [r for r in _rows(a, "nonlocality") if r["kind"] == "gpsa"] or _rows(a, "nonlocality")
    rows = sorted(rows, key=lambda r: r["depth"])
    half = len(rows) // 2
    part = rows[:max(half, 1)] if arg == "early" else rows[half:]
    return _mean([r["value"] for r in part], f"nonlocality ({arg} GPSA layers)")


METRICS: dict[str, Metric] = {
    "accuracy": Metric(_accuracy, ("eval",), "validation top-1 accuracy"),
    "balanced_accuracy": Metric(_balanced, ("eval",), "validation balanced accuracy (mean per-class recall)"),
    "entropy": Metric(_entropy, ("probe:attention_entropy",), "mean attention entropy (nats) [:early|late]"),
    "entropy_rel": Metric(_entropy_rel, ("probe:attention_entropy",), "attention entropy / ln N"),
    "fourier_change": Metric(_fourier_change, ("probe:fourier",),
                             "mean change of the highest-frequency delta log amplitude across sub-layers of a kind"),
    "variance_change": Metric(_variance_change, ("probe:feature_variance",),
                              "mean log ratio of feature-map variance (output / input) across sub-layers of a kind"),
    "high_freq_drop": Metric(_high_freq_drop, ("frequency",),
                             "accuracy drop under band noise at normalized frequency >= arg (default 0.7)"),
    "cka_offdiag": Metric(_cka_offdiag, ("probe:cka",), "mean CKA between distinct sub-layer outputs [:blocks]"),
    "attn_distance": Metric(_attn_distance, ("probe:attention_distance",),
                            "mean attention distance in pixels [:first|early|late]"),
    "head_spread": Metric(_head_spread, ("probe:attention_distance",),
                          "std over heads of the attention distance [:early|late]"),
    "ratio_of_norms": Metric(_ratio_of_norms, ("probe:ratio_of_norms",),
                             "||z|| / ||f(z)|| of cls or spatial tokens, early or late"),
    "hessian_negative_fraction": Metric(_hessian_neg, ("hessian",), "fraction of negative top eigenvalues"),
    "hessian_max_abs": Metric(_hessian_max_abs, ("hessian",), "largest |eigenvalue| over batches"),
    "gpsa_gates": Metric(_gates, ("train_probes",), "mean GPSA gate, init or final"),
    "nonlocality": Metric(_nonlocality, ("probe:nonlocality",), "nonlocality of early or late GPSA layers"),
}


def parse_metric(metric: str) -> tuple[str, str]:
    name, _, arg = metric.partition(":")
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return name, arg


def metric_needs(metric: str) -> tuple[str, ...]:
    return METRICS[parse_metric(metric)[0]].needs


def compute_metric(metric: str, analysis: dict[str, Any]) -> float:
    name, arg = parse_metric(metric)
    return float(METRICS[name].fn(analysis, arg))
