"""Figures of ``vitscope hessian`` and ``landscape`` outputs: Hessian spectra and loss landscapes (HDVW)."""
from __future__ import annotations

from typing import Any

from vitscope.reports import figures as F
from vitscope.reports.captions import caption
from vitscope.reports.loaders import RunData
from vitscope.reports.sections._common import (
    FigureItem,
)


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


def main_group(h: dict[str, Any]) -> tuple[str, dict[str, Any]]:
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


def curvature_items(run: RunData) -> list[FigureItem]:
    """The Hessian spectrum and the loss landscape, where the run has them."""
    items = []
    if run.hessian:
        items.append(_hessian(run.name, run.hessian))
    if run.landscape:
        items.append(_landscape(run.name, run.landscape))
    return items
