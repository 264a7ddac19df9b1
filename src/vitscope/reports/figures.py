"""The papers' figure types, one function each: plain numbers in, a matplotlib ``Figure`` out.

Figures are built and encoded by ``vitscope.reports.render`` (``matplotlib.figure.Figure`` with an Agg canvas,
never pyplot).
"""
from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

from vitscope.reports.render import blank

_logger = logging.getLogger(__name__)

__all__ = [
    "new_figure", "heatmap", "per_head", "lines", "shaded_depth", "colored_curves", "band_lines", "bars",
    "eigen_density", "contour", "reliability", "panels",
]

SIZE = (4.8, 3.2)
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22"]
KIND_COLORS = {"msa": "#d62728", "gpsa": "#ff7f0e", "mlp": "#1f77b4", "conv": "#2ca02c"}
SHADE = "#f4c7c3"


def new_figure(size: tuple[float, float] = SIZE) -> tuple[Figure, object]:
    """A figure with one axes and the report's style."""
    fig = blank(size, 1)
    return fig, fig.axes[0]


def _title(ax, title: str) -> None:
    ax.set_title(textwrap.fill(title, 52), fontsize=10)


def _arr(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _log_if_wide(ax, values: np.ndarray) -> None:
    v = values[np.isfinite(values)]
    if v.size and (v > 0).all() and v.max() / v.min() > 30:
        ax.set_yscale("log")


def heatmap(matrix: Sequence[Sequence[float | None]], row_labels: Sequence[str], col_labels: Sequence[str],
            title: str, xlabel: str = "layer", ylabel: str = "layer", vmin: float = 0.0, vmax: float = 1.0,
            cbar_label: str = "CKA") -> Figure:
    """Matrix with the origin at the bottom left (RAGHU's CKA plots); tick labels thinned to about 12."""
    m = np.array([_arr(r) for r in matrix])
    fig, ax = new_figure((4.6, 3.9))
    ax.grid(False)
    im = ax.imshow(m, origin="lower", cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
    fig.colorbar(im, ax=ax, label=cbar_label, shrink=0.9)
    for labels, setter, rot in ((col_labels, ax.set_xticks, 60), (row_labels, ax.set_yticks, 0)):
        step = max(1, math.ceil(len(labels) / 12))
        idx = list(range(0, len(labels), step))
        setter(idx, [_short(labels[i]) for i in idx], rotation=rot, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    return fig


def _short(name: str, width: int = 16) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def per_head(x: Sequence[float], heads: Sequence[Sequence[float | None]], mean: Sequence[float | None],
             title: str, xlabel: str, ylabel: str, bound: Sequence[float | None] | None = None,
             bound_label: str = "", xticklabels: Sequence[str] | None = None) -> Figure:
    """One dot per head at each layer's x, the mean over heads as a line, an optional dashed bound."""
    fig, ax = new_figure()
    xs = _arr(x)
    for i, (xi, hs) in enumerate(zip(xs, heads)):
        h = _arr(hs)
        jitter = np.linspace(-0.12, 0.12, len(h)) if len(h) > 1 else np.zeros(1)
        ax.scatter(xi + jitter, h, s=16, color=COLORS[0], alpha=0.65, linewidths=0,
                   label="head" if i == 0 else None)
    ax.plot(xs, _arr(mean), "-o", color=COLORS[1], ms=3, lw=1.4, label="mean over heads")
    if bound is not None:
        ax.plot(xs, _arr(bound), "--", color="k", lw=1.0, label=bound_label)
    if xticklabels is not None:
        step = max(1, math.ceil(len(xs) / 14))
        ax.set_xticks(xs[::step], list(xticklabels)[::step], fontsize=7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    every = np.concatenate([_arr(h) for h in heads] + [_arr(mean), _arr(bound or [])])
    every = every[np.isfinite(every)]
    if every.size and every.min() >= 0:  # distances, entropies, gates: show them from zero
        ax.set_ylim(0, 1.08 * float(every.max()) or 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    ax.legend(fontsize=7, frameon=False)
    return fig


def lines(series: Mapping[str, tuple[Sequence[float], Sequence[float | None]]], title: str, xlabel: str,
          ylabel: str, hlines: Mapping[str, float] | None = None, logy: bool | None = None,
          markers: bool = True, xticks: tuple[Sequence[float], Sequence[str]] | None = None,
          ylim: tuple[float, float] | None = None, styles: Mapping[str, tuple[int, str]] | None = None) -> Figure:
    """Labelled (x, y) series; ``hlines`` adds dashed reference levels; ``logy=None`` picks log for wide ranges;
    ``styles`` maps a label to (colour index, line style), e.g. one colour per model, one style per attack."""
    fig, ax = new_figure()
    every = []
    for i, (label, (x, y)) in enumerate(series.items()):
        ys = _arr(y)
        every.append(ys)
        c, ls = (styles or {}).get(label, (i, "-"))
        ax.plot(_arr(x), ys, ls, marker="o" if markers else None, ms=3, lw=1.4, color=COLORS[c % len(COLORS)],
                label=label)
    for j, (label, level) in enumerate((hlines or {}).items()):
        ax.axhline(level, ls="--", lw=1.0, color=["k", "#777777", "#aaaaaa"][j % 3], label=label)
    if logy or (logy is None and every):
        if logy:
            ax.set_yscale("log")
        else:
            _log_if_wide(ax, np.concatenate(every))
    if ax.get_yscale() == "log" and every:
        v = np.concatenate(every)
        v = v[np.isfinite(v) & (v > 0)]
        if v.size and v.max() / v.min() < 20:  # less than about a decade: plain numbers, not 2 x 10^0
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    if xticks is not None:
        ax.set_xticks(list(xticks[0]), list(xticks[1]), fontsize=7, rotation=45 if len(xticks[0]) > 8 else 0)
    elif xlabel in ("block", "epoch"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    if len(series) + len(hlines or {}) > 1:
        ax.legend(fontsize=7, frameon=False)
    return fig


def panels(specs: Sequence[tuple[Mapping[str, tuple[Sequence[float], Sequence[float | None]]], str]],
           title: str, xlabel: str) -> Figure:
    """Side-by-side panels sharing x, each ``(series, ylabel)`` (e.g. accuracy and NLL over epochs)."""
    fig = blank((2.5 * len(specs) + 0.4, 3.2), len(specs))
    for k, (series, ylabel) in enumerate(specs):
        ax = fig.axes[k]
        for i, (label, (x, y)) in enumerate(series.items()):
            ax.plot(_arr(x), _arr(y), "-o", ms=3, lw=1.4, color=COLORS[(i + 2 * k) % len(COLORS)], label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(textwrap.fill(title, 70), fontsize=10)
    return fig


def shaded_depth(series: Mapping[str, tuple[Sequence[float], Sequence[float | None]]],
                 shaded: Sequence[tuple[float, float]], title: str, ylabel: str, logy: bool | None = None,
                 shade_label: str = "MSA") -> Figure:
    """Values against normalized depth with spans shaded (HDVW Fig. 2b/9: MSA sub-layers in grey-red)."""
    fig = lines(series, title, "normalized depth", ylabel, logy=logy)
    ax = fig.axes[0]
    for i, (lo, hi) in enumerate(shaded):
        ax.axvspan(lo, hi, color=SHADE, alpha=0.6, lw=0, zorder=0, label=shade_label if i == 0 else None)
    if shaded:
        ax.legend(fontsize=7, frameon=False)
    ax.set_xlim(min([-0.03] + [lo for lo, _ in shaded]), max([1.03] + [hi for _, hi in shaded]))
    return fig


def colored_curves(curves: Sequence[Sequence[float | None]], depths: Sequence[float], title: str) -> Figure:
    """One curve per layer over frequency 0..pi, coloured by normalized depth (HDVW Fig. 2a)."""
    fig, ax = new_figure()
    norm = Normalize(0.0, 1.0)
    cmap = matplotlib.colormaps["plasma"]
    for c, d in zip(curves, depths):
        y = _arr(c)
        ax.plot(np.linspace(0, 1, len(y)), y, color=cmap(norm(d)), lw=1.1)
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="normalized depth")
    ax.set_xticks([0, 0.5, 1], ["0", "0.5π", "1.0π"])
    ax.set_xlabel("frequency")
    ax.set_ylabel("Δ log amplitude")
    _title(ax, title)
    return fig


def band_lines(x: Sequence[float], series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
               title: str, xlabel: str, ylabel: str) -> Figure:
    """Per label a mean line with a min-max band (e.g. GPSA gates over training, band over heads)."""
    fig, ax = new_figure()
    xs = _arr(x)
    for i, (label, (mean, lo, hi)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        ax.fill_between(xs, _arr(lo), _arr(hi), color=color, alpha=0.15, lw=0)
        ax.plot(xs, _arr(mean), "-o", ms=3, lw=1.4, color=color, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    ax.legend(fontsize=7, frameon=False, ncol=2 if len(series) > 6 else 1)
    return fig


def bars(labels: Sequence[str], values: Sequence[float | None], title: str, ylabel: str,
         kinds: Sequence[str] | None = None, hline: tuple[str, float] | None = None,
         markers: Mapping[str, Sequence[float | None]] | None = None,
         ylim: tuple[float, float] | None = None) -> Figure:
    """Bars per unit, coloured by kind (msa/mlp/conv...), optional dashed level and marker series."""
    fig, ax = new_figure((max(4.8, 0.25 * len(labels) + 1.6), 3.4))
    x = np.arange(len(labels))
    colors = [KIND_COLORS.get(k.split("+")[0], COLORS[0]) for k in kinds] if kinds else COLORS[0]
    ax.bar(x, np.nan_to_num(_arr(values)), color=colors, width=0.75)
    if kinds:
        for k in dict.fromkeys(kinds):
            ax.bar([np.nan], [np.nan], color=KIND_COLORS.get(k.split("+")[0], COLORS[0]), label=k)
    for i, (label, ys) in enumerate((markers or {}).items()):
        ax.plot(x, _arr(ys), ["v", "^", "s"][i % 3], color="k", ms=4, ls="none", label=label)
    if hline is not None:
        ax.axhline(hline[1], ls="--", color="k", lw=1.0, label=hline[0])
    ax.axhline(0, color="k", lw=0.6)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xticks(x, [_short(str(lab), 18) for lab in labels], rotation=60 if len(labels) > 4 else 0,
                  ha="right" if len(labels) > 4 else "center", fontsize=7)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    if kinds or markers or hline:
        ax.legend(fontsize=7, frameon=False)
    return fig


def eigen_density(title: str, spectra: Mapping[str, tuple[Sequence[float] | None,
                                                         tuple[Sequence[float], Sequence[float]] | None]],
                  bins: int = 60) -> Figure:
    """Hessian spectra: per label a histogram density of its eigenvalues (HDVW), or its density curve when only
    that is given; a dashed line at 0; log density when the heights span more than 50x (long tails)."""
    fig, ax = new_figure()
    eigs = [np.asarray(e, float) for e, _ in spectra.values() if e is not None and len(e)]
    edges = None
    if eigs:
        allv = np.concatenate(eigs)
        lo, hi = float(allv.min()), float(allv.max())
        edges = np.linspace(lo - 0.5, hi + 0.5, bins + 1) if lo == hi else np.linspace(lo, hi, bins + 1)
    heights = []
    for i, (label, (e, dens)) in enumerate(spectra.items()):
        color = COLORS[i % len(COLORS)]
        if e is not None and len(e):
            v = np.asarray(e, float)
            heights.append(np.histogram(v, bins=edges, density=True)[0])
            ax.hist(v, bins=edges, density=True, histtype="stepfilled", alpha=0.3, color=color, edgecolor=color,
                    label=label)
        elif dens is not None:  # only a density (e.g. stochastic Lanczos quadrature): draw the curve
            heights.append(_arr(dens[1]))
            ax.plot(_arr(dens[0]), _arr(dens[1]), lw=1.4, color=color, label=label)
    ax.axvline(0, color="k", lw=0.8, ls="--")
    h = np.concatenate(heights) if heights else np.zeros(0)
    h = h[np.isfinite(h) & (h > 0)]
    if h.size and h.max() / h.min() > 50:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(h.min() / 2, h.max() * 1e-4))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    _title(ax, title)
    ax.legend(fontsize=7, frameon=False)
    return fig


def contour(x: Sequence[float], y: Sequence[float], z: Sequence[Sequence[float | None]], title: str,
            zlabel: str = "loss") -> Figure:
    """Filled contour of a 2-D landscape ``z[y][x]`` (log-spaced levels when the range is wide)."""
    fig, ax = new_figure((4.6, 3.9))
    zz = np.array([_arr(r) for r in z])
    finite = zz[np.isfinite(zz)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
        levels = np.geomspace(finite.min(), finite.max(), 25)
    else:
        levels = 25
    cs = ax.contourf(_arr(x), _arr(y), zz, levels=levels, cmap="viridis")
    ax.contour(_arr(x), _arr(y), zz, levels=cs.levels, colors="white", linewidths=0.3, alpha=0.6)
    fig.colorbar(cs, ax=ax, label=zlabel, format="%.3g")
    ax.plot([0], [0], "r+", ms=10, mew=1.5)
    ax.grid(False)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    _title(ax, title)
    return fig


def reliability(lower: Sequence[float], upper: Sequence[float], accuracy: Sequence[float | None],
                confidence: Sequence[float | None], count: Sequence[int], title: str) -> Figure:
    """Reliability diagram: per-bin accuracy bars, mean confidence markers, the diagonal, bin counts."""
    fig, ax = new_figure((4.4, 3.9))
    lo, hi = _arr(lower), _arr(upper)
    acc, conf = _arr(accuracy), _arr(confidence)
    ax.bar(lo, np.nan_to_num(acc), width=hi - lo, align="edge", color=COLORS[0], alpha=0.8, edgecolor="white",
           label="accuracy")
    ax.plot((lo + hi) / 2, conf, "o", color=COLORS[1], ms=4, label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="k", lw=1.0, label="perfect calibration")
    total = max(1, sum(int(c) for c in count))
    for l_, h_, c in zip(lo, hi, count):
        if c:
            ax.text((l_ + h_) / 2, 0.02, f"{100 * int(c) / total:.0f}%", ha="center", fontsize=6, color="white")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    _title(ax, title)
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    return fig
