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

import numpy as np

__all__ = ["METRICS", "Metric", "compute_metric", "metric_needs", "parse_metric"]


@dataclass(frozen=True)
class Metric:
    fn: Callable[[dict[str, Any], str], float]
    needs: tuple[str, ...]  # "eval", "hessian", "frequency", "localization", "train_probes", "skip_removal",
    # "cbs_scale", or "probe:<measure>"
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

    Only two cases leave a row of ``kind`` out, both because its input was not measured: the first row (where
    the capture records the patch embedding / stem output as layer 0, that row is the stem, of its own kind, and
    the first MSA or conv block has its input) and a sub-layer whose input map is 1 x 1 (absent from the probe)
    or, for ``fourier_change``, too small to represent the frequency compared.
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


HIGH_FREQ = 0.75  # x pi: the highest frequency an 8 x 8 map represents (k = 3 of 8)


def _at_frequency(row: dict[str, Any], f: float) -> float | None:
    """A Fourier row's delta log amplitude at normalized frequency ``f`` (x pi), interpolated linearly along its
    half-diagonal (``frequencies``: 2k/h); None when its map is too small to represent ``f``."""
    freqs, curve = row["frequencies"], row["curve"]
    if f > freqs[-1] + 1e-9:
        return None
    return float(np.interp(f, freqs, curve))


def _fourier_changes(rows: list[dict[str, Any]], kind: str, f: float) -> list[float]:
    """Change across each sub-layer of ``kind`` of the delta log amplitude at one normalized frequency ``f``
    (x pi) for every map size (HDVW reads each map at its own highest frequency: 0.94, 0.88, 0.75, 0.5 pi for
    a ResNet's 32, 16, 8, 4 px stages, so averaging those mixes frequencies). A sub-layer whose input or output
    map cannot represent ``f`` (a 4 x 4 map reaches 0.5 pi) is not counted, the stated rule of this metric;
    rows without ``frequencies`` (older analyses) fall back to each row's last entry."""
    if not rows or "frequencies" not in rows[0]:
        return _changes(rows, kind, log=False)
    at_f = [{**r, "value": _at_frequency(r, f)} for r in rows]
    # a row left out here also leaves the next sub-layer without a measured input (``_changes`` skips it)
    return _changes([r for r in at_f if r["value"] is not None], kind, log=False)


def _fourier_change(a: dict[str, Any], arg: str) -> float:
    """``kind[@f]``: mean change of the delta log amplitude at normalized frequency ``f`` (x pi, default
    ``HIGH_FREQ``) across the sub-layers of ``kind``."""
    kind, _, f = arg.partition("@")
    freq = float(f) if f else HIGH_FREQ
    return _mean(_fourier_changes(_rows(a, "fourier"), kind, freq),
                 f"change of the delta log amplitude at {freq:g} pi across {kind} sub-layers")


def _variance_change(a: dict[str, Any], kind: str) -> float:
    return _mean(_changes(_rows(a, "feature_variance"), kind, log=True), f"variance log-ratio across {kind}")


def _high_freq_drop(a: dict[str, Any], arg: str) -> float:
    threshold = float(arg) if arg else 0.7
    freq = a["robustness"]["frequency"]
    drops = [d for f, d in zip(freq["freqs"], freq["error_increase"]) if f >= threshold - 1e-9]
    return _mean(drops, f"accuracy drop under noise at frequencies >= {threshold}")


BLOCK_KINDS = ("mlp", "conv", "downsample")  # the output of a block: a transformer's MLP sub-layer, a CNN block


def _cka_offdiag(a: dict[str, Any], arg: str) -> float:
    """Mean CKA between distinct layers; ``blocks``: only block outputs (``BLOCK_KINDS``: a transformer's MLP
    sub-layer outputs, every CNN block; not the stem / patch embedding), so a ViT and a ResNet are compared at
    one granularity (RAGHU compares blocks); ``blocks<K>``: ``K`` block outputs at equally spaced normalized
    depths (block ``round(i (n - 1) / (K - 1))`` of ``n``, i = 0 .. K-1), so two models of different depth are
    compared over the same depth span with the same number of pairs (K (K - 1))."""
    mat = a["probe"]["cka"]["matrix"]
    n = len(mat)
    keep = list(range(n))
    if arg.startswith("blocks"):
        kinds = {r["depth"]: r["kind"] for r in _rows(a, "cka")}
        keep = [i for i in range(n) if kinds.get(i) in BLOCK_KINDS]
        if arg != "blocks":
            try:
                k = int(arg[len("blocks"):])
            except ValueError:
                raise ValueError(f"cka_offdiag takes blocks or blocks<K>, got {arg!r}") from None
            if not 2 <= k <= len(keep):
                raise ValueError(f"cka_offdiag:{arg}: the model has {len(keep)} block outputs; K must be 2-{len(keep)}")
            keep = [keep[round(i * (len(keep) - 1) / (k - 1))] for i in range(k)]
    elif arg:
        raise ValueError(f"cka_offdiag takes no argument, blocks or blocks<K>, got {arg!r}")
    return _mean([mat[i][j] for i in keep for j in keep if i != j], "off-diagonal CKA")


def _attn_distance(a: dict[str, Any], arg: str) -> float:
    rows = _rows(a, "attention_distance")
    if arg == "first":
        rows = [min(rows, key=lambda r: r["depth"])]
    else:
        rows = _split(rows, arg)
    return _mean([r["value"] for r in rows], f"attention distance ({arg})")


def _relative_distance(a: dict[str, Any], arg: str) -> float:
    """CB's relative distance of interaction (attention-weighted distance between token positions in [0, 1]^2,
    self-attention left out; ``vitscope.measures.relative_distance``), averaged over the layers of ``arg``."""
    if arg not in ("", "early", "late"):
        raise ValueError(f"relative_distance takes no argument, early or late, got {arg!r}")
    return _mean([r["value"] for r in _split(_rows(a, "relative_distance"), arg)], f"relative distance ({arg})")


def _block_outputs(a: dict[str, Any], cka: dict[str, Any]) -> list[int]:
    """Indices of the block outputs (``BLOCK_KINDS``) in a probe's CKA rows, in depth order (block 0, 1, ...)."""
    kinds = {r["depth"]: r["kind"] for r in cka["rows"]}
    return [i for i in range(len(cka["matrix"])) if kinds.get(i) in BLOCK_KINDS]


def _cka_across_skip(a: dict[str, Any], arg: str) -> float:
    """RAGHU's skip removal: mean CKA between the block outputs before the block whose skip was removed (blocks
    0 .. k-1) and those from it on (k .. n-1), in the trained model (``intact``) or with that skip removed
    (``removed``; ``run_skip_cka``): a skip that propagates the representation keeps the two sides alike."""
    sk = a.get("skip_removal")
    if sk is None:
        raise ValueError("the analysis has no skip_removal entry (the study needs 'skip_removal')")
    if arg not in ("intact", "removed"):
        raise ValueError(f"cka_across_skip takes intact or removed, got {arg!r}")
    cka = sk["cka"] if arg == "removed" else a["probe"]["cka"]
    blocks, k = _block_outputs(a, cka), int(sk["block"])
    if len(blocks) != int(sk["n_blocks"]) or not 0 < k < len(blocks):
        raise ValueError(f"cka_across_skip: {len(blocks)} block outputs for {sk['n_blocks']} blocks, removed skip "
                         f"at block {k}; it needs one output per block and a block with blocks on both sides")
    mat = cka["matrix"]
    return _mean([mat[i][j] for i in blocks[:k] for j in blocks[k:]], f"CKA across the removed skip ({arg})")


def _cbs_scale(a: dict[str, Any], arg: str) -> float:
    """Mean learned CBS scale lambda (``vitscope.layers.cbs_scales``) over the channels of the CB modules in the
    ``early`` / ``late`` half of the blocks (``_halves``: equal halves), or of all of them."""
    layers = a.get("cbs_scale")
    if layers is None:
        raise ValueError("the analysis has no cbs_scale entry (the study needs 'cbs_scale')")
    return _mean([x for v in _halves(list(layers), arg) for x in v], f"CBS scale ({arg or 'all'})")


def _head_spread(a: dict[str, Any], arg: str) -> float:
    """Standard deviation over heads of the mean attention distance, averaged over the layers of ``arg``."""
    spreads = []
    for r in _split(_rows(a, "attention_distance"), arg):
        h = r["heads"]
        m = sum(h) / len(h)
        spreads.append(math.sqrt(sum((x - m) ** 2 for x in h) / len(h)))
    return _mean(spreads, f"head spread of attention distance ({arg})")


def _ratio_of_norms(a: dict[str, Any], arg: str) -> float:
    """``cls|spatial`` ``_early|_late`` [``_from<B>``]: mean ||z|| / ||f(z)|| over the sub-layers of that half;
    ``_from1`` leaves out the first block, whose class-token input is the learned class embedding (timm
    initializes it at std 1e-6, so its norm, not the skip path's share, sets that ratio: RAGHU 7's caveat)."""
    parts = arg.split("_")
    token, half = parts[0], parts[1] if len(parts) > 1 else ""
    start = 0
    if len(parts) > 2:
        if len(parts) != 3 or not parts[2].startswith("from") or not parts[2][4:].isdigit():
            raise ValueError(f"ratio_of_norms metric takes cls|spatial_<half>[_from<B>], got {arg!r}")
        start = int(parts[2][4:])
    if token not in ("cls", "spatial"):
        raise ValueError(f"ratio_of_norms metric takes cls_<half> or spatial_<half>, got {arg!r}")
    rows = [r for r in _split(_rows(a, "ratio_of_norms"), half) if r.get("block") is None or r["block"] >= start]
    return _mean([r.get(token) for r in rows], f"ratio of norms ({arg})")


def _hessian_neg(a: dict[str, Any], arg: str) -> float:
    return float(a["hessian"]["negative_fraction"])


def _hessian_max_abs(a: dict[str, Any], arg: str) -> float:
    return float(a["hessian"]["max_abs_eigenvalue"])


def _halves(items: list[Any], half: str) -> list[Any]:
    """The first or last ``len // 2`` items (``early`` / ``late``; the middle one of an odd count in neither, so
    both halves have as many layers), or all of them (``""``)."""
    if not half:
        return items
    k = len(items) // 2
    if k == 0:
        raise ValueError(f"an early/late split needs at least 2 layers, got {len(items)}")
    if half == "early":
        return items[:k]
    if half == "late":
        return items[-k:]
    raise ValueError(f"expected early or late, got {half!r}")


def _gates(a: dict[str, Any], arg: str) -> float:
    """Mean GPSA gate sigmoid(gating_param) over layers and heads at ``init`` (epoch -1 of the run's probes),
    ``best`` (the epoch whose weights were evaluated: early stopping restores the best validation epoch,
    ``training.weights_epoch``) or ``final`` (the last recorded epoch); ``best_early`` / ``best_late``: the first
    / last half of the GPSA layers only (ConViT Fig. 6: early layers keep high gates, late ones drop)."""
    when, _, half = arg.partition("_")
    recs = [r for r in a.get("train_probes", []) if r["measure"] == "gpsa_gates"]
    if not recs:
        raise ValueError("the run recorded no gpsa_gates probe (train with probes.measures=[gpsa_gates])")
    if when == "init":
        rec = min(recs, key=lambda r: r["epoch"])
    elif when == "final":
        rec = max(recs, key=lambda r: r["epoch"])
    elif when == "best":
        epoch = (a.get("training") or {}).get("weights_epoch")
        match = [r for r in recs if r["epoch"] == epoch]
        if epoch is None or not match:
            raise ValueError(f"no gpsa_gates record at the evaluated epoch {epoch!r} (training.weights_epoch); "
                             f"recorded epochs: {sorted(r['epoch'] for r in recs)}")
        rec = match[-1]
    else:
        raise ValueError(f"gpsa_gates takes init, best or final (optionally _early / _late), got {arg!r}")
    layers = [v if isinstance(v, list) else [v] for v in rec["values"]]
    return _mean([x for v in _halves(layers, half) for x in v], f"GPSA gates ({arg})")


def _nonlocality(a: dict[str, Any], arg: str) -> float:
    """Nonlocality of the GPSA layers in the ``early`` or ``late`` half of the GPSA stack, GPSA layer 0 left out:
    ConViT's exception (its first layer's attention does not follow the local-to-nonlocal trend of the others),
    so it does not stand alone for "early" in a short stack."""
    rows = [r for r in _rows(a, "nonlocality") if r["kind"] == "gpsa"] or _rows(a, "nonlocality")
    rows = sorted(rows, key=lambda r: r["depth"])[1:]
    return _mean([r["value"] for r in _halves(rows, arg)], f"nonlocality ({arg} GPSA layers after the first)")


def _freq_drop_balanced(a: dict[str, Any], arg: str) -> float:
    """Balanced-accuracy drop under band noise (``frequency_balanced``): ``high`` mean over normalized
    frequencies >= 0.7, ``low`` over 0 < f <= 0.3, ``selectivity`` high minus low (> 0: hurt more by high
    frequencies, HDVW's ResNet; a ViT's is lower)."""
    fb = a.get("frequency_balanced")
    if fb is None:
        raise ValueError("the analysis has no frequency_balanced entry (the study needs 'frequency')")

    def band(lo: float, hi: float) -> float:
        return _mean([d for f, d in zip(fb["freqs"], fb["drop"]) if lo < f <= hi + 1e-9],
                      f"balanced-accuracy drop at frequencies in ({lo}, {hi}]")

    if arg == "high":
        return band(0.7 - 1e-9, 1.0)
    if arg == "low":
        return band(0.0, 0.3)
    if arg == "selectivity":
        return band(0.7 - 1e-9, 1.0) - band(0.0, 0.3)
    raise ValueError(f"freq_drop_balanced takes high, low or selectivity, got {arg!r}")


def _localization(a: dict[str, Any], arg: str) -> float:
    """RAGHU's position probe (``run_localization``): held-out accuracy minus chance (1 / positions), at the
    ``last`` or ``first`` block or averaged over the ``early`` / ``late`` half of the blocks (depth < / >= 0.5)."""
    rows = sorted(a.get("localization", {}).get("rows", []), key=lambda r: r["block"])
    if not rows:
        raise ValueError("the analysis has no localization probe (the study needs 'localization')")
    if arg in ("last", "first"):
        rows = [rows[-1] if arg == "last" else rows[0]]
    elif arg in ("early", "late"):
        rows = [r for r in rows if (r["depth"] < 0.5) == (arg == "early")]
    elif arg:
        raise ValueError(f"localization takes first, last, early or late, got {arg!r}")
    return _mean([r["accuracy"] - r["chance"] for r in rows], f"position-probe accuracy over chance ({arg})")


METRICS: dict[str, Metric] = {
    "accuracy": Metric(_accuracy, ("eval",), "validation top-1 accuracy"),
    "balanced_accuracy": Metric(_balanced, ("eval",), "validation balanced accuracy (mean per-class recall)"),
    "entropy": Metric(_entropy, ("probe:attention_entropy",), "mean attention entropy (nats) [:early|late]"),
    "entropy_rel": Metric(_entropy_rel, ("probe:attention_entropy",), "attention entropy / ln N"),
    "fourier_change": Metric(_fourier_change, ("probe:fourier",),
                             "mean change of the delta log amplitude at one normalized frequency (kind[@f], "
                             "default 0.75 pi) across sub-layers of a kind"),
    "variance_change": Metric(_variance_change, ("probe:feature_variance",),
                              "mean log ratio of feature-map variance (output / input) across sub-layers of a kind"),
    "high_freq_drop": Metric(_high_freq_drop, ("frequency",),
                             "accuracy drop under band noise at normalized frequency >= arg (default 0.7)"),
    "freq_drop_balanced": Metric(_freq_drop_balanced, ("frequency",),
                                 "balanced-accuracy drop under band noise: high, low or selectivity (high - low)"),
    "cka_offdiag": Metric(_cka_offdiag, ("probe:cka",), "mean CKA between distinct sub-layer outputs [:blocks]"),
    "attn_distance": Metric(_attn_distance, ("probe:attention_distance",),
                            "mean attention distance in pixels [:first|early|late]"),
    "relative_distance": Metric(_relative_distance, ("probe:relative_distance",),
                                "CB's relative distance of interaction (positions in [0, 1]) [:early|late]"),
    "cka_across_skip": Metric(_cka_across_skip, ("probe:cka", "skip_removal"),
                              "mean CKA between block outputs on the two sides of a middle block, intact or "
                              "with its skip removed"),
    "cbs_scale": Metric(_cbs_scale, ("cbs_scale",), "mean learned CBS scale [:early|late] half of the blocks"),
    "head_spread": Metric(_head_spread, ("probe:attention_distance",),
                          "std over heads of the attention distance [:early|late]"),
    "ratio_of_norms": Metric(_ratio_of_norms, ("probe:ratio_of_norms",),
                             "||z|| / ||f(z)|| of cls or spatial tokens, early or late"),
    "localization": Metric(_localization, ("localization",),
                           "position-probe held-out accuracy minus chance: first, last, early or late blocks"),
    "hessian_negative_fraction": Metric(_hessian_neg, ("hessian",), "fraction of negative top eigenvalues"),
    "hessian_max_abs": Metric(_hessian_max_abs, ("hessian",), "largest |eigenvalue| over batches"),
    "gpsa_gates": Metric(_gates, ("train_probes",), "mean GPSA gate at init, best (evaluated) or final epoch"
                                                    " [_early|_late]"),
    "nonlocality": Metric(_nonlocality, ("probe:nonlocality",),
                          "nonlocality of early or late GPSA layers (GPSA layer 0 left out)"),
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
