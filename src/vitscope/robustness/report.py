"""Tables and figures of ``evaluate_robustness`` results, written atomically (JSON, CSV, PNG).

Figures follow the papers' plots: the reliability diagram with confidence histogram (HDVW's
``ops/tests.py``), accuracy against noise frequency (HDVW Fig. 2c), accuracy against eps (CB) and
accuracy per corruption and severity.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from vitscope.io.atomic import atomic_write_json, json_safe, write_csv

_logger = logging.getLogger(__name__)

__all__ = ["result_tables", "save_results", "figures"]


def result_tables(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Flat rows per table: ``summary`` (measure, setting, value, accuracy) and one table per measure."""
    summary: list[dict[str, Any]] = [
        {"measure": "clean", "setting": "", "value": "", "accuracy": results["clean"]["accuracy"]}
    ]
    tables: dict[str, list[dict[str, Any]]] = {"summary": summary}
    if "calibration" in results:
        cal = results["calibration"]
        for key in ("nll", "top1", "top5", "brier", "ece", "signed_ece", "adaptive_ece", "mce"):
            summary.append({"measure": "calibration", "setting": key, "value": cal[key], "accuracy": ""})
        tables["calibration_bins"] = [dict(row) for row in cal["reliability"]]
    if "occlusion" in results:
        occ = results["occlusion"]
        summary.append({"measure": "occlusion", "setting": "fraction", "value": occ["fraction"],
                        "accuracy": occ["accuracy"]})
    adv = []
    for attack in ("fgsm", "pgd"):
        if attack in results:
            for e, a in zip(results[attack]["eps"], results[attack]["accuracy"]):
                adv.append({"attack": attack, "eps": e, "eps_255": e * 255, "accuracy": a})
                summary.append({"measure": attack, "setting": "eps", "value": e, "accuracy": a})
    if adv:
        tables["adversarial"] = adv
    if "frequency" in results:
        fr = results["frequency"]
        tables["frequency"] = [
            {"freq": f, "accuracy": a, "error_increase": d}
            for f, a, d in zip(fr["freqs"], fr["accuracy"], fr["error_increase"])
        ]
        summary += [{"measure": "frequency", "setting": "freq", "value": f, "accuracy": a}
                    for f, a in zip(fr["freqs"], fr["accuracy"])]
    if "corruptions" in results:
        co = results["corruptions"]
        rows = []
        for name, accs in co["accuracy"].items():
            for s, a, d in zip(co["severities"], accs, co["error_increase"][name]):
                rows.append({"corruption": name, "severity": s, "accuracy": a, "error_increase": d})
                summary.append({"measure": "corruption", "setting": f"{name}", "value": s, "accuracy": a})
        tables["corruptions"] = rows
    return tables


def figures(results: dict[str, Any], title: str = "") -> dict[str, Any]:
    """Matplotlib figures (``vitscope.reports.render.figure``: no pyplot state) for the measures present."""
    from vitscope.reports.render import figure

    figs: dict[str, Any] = {}
    if "calibration" in results:
        cal = results["calibration"]
        rows = cal["reliability"]
        fig = figure((9, 4), layout=None)
        ax_h, ax_r = fig.subplots(1, 2)
        lo = [r["lower"] for r in rows]
        width = [r["upper"] - r["lower"] for r in rows]
        n = max(cal["n"], 1)
        ax_h.bar(lo, [r["count"] / n for r in rows], width=width, align="edge", edgecolor="black", color="tab:green")
        ax_h.set(xlim=(0, 1), xlabel="confidence", ylabel="fraction of examples", title="confidence histogram")
        acc = [r["accuracy"] if r["accuracy"] is not None else 0.0 for r in rows]
        ax_r.bar(lo, acc, width=width, align="edge", edgecolor="black", color="tab:red", alpha=0.8)
        ax_r.plot([0, 1], [0, 1], linestyle=":", color="black")
        ax_r.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
                 title=f"reliability (ECE {100 * cal['ece']:.2f}%)")
        fig.suptitle(title)
        fig.tight_layout()
        figs["reliability"] = fig
    if "frequency" in results:
        fr = results["frequency"]
        fig = figure((5, 4), layout=None)
        ax = fig.subplots()
        ax.plot(fr["freqs"], fr["accuracy"], marker="o", label="noisy")
        ax.axhline(results["clean"]["accuracy"], linestyle="--", color="gray", label="clean")
        ax.set(xlabel=f"noise frequency (normalized, {fr['scale']}; band width {fr['width']})", ylabel="accuracy",
               title=f"{title} band noise, L2 = {fr['eps']:.3g}".strip())
        ax.legend()
        fig.tight_layout()
        figs["frequency"] = fig
    attacks = [a for a in ("fgsm", "pgd") if a in results]
    if attacks:
        fig = figure((5, 4), layout=None)
        ax = fig.subplots()
        for a in attacks:
            eps = [0.0] + [e * 255 for e in results[a]["eps"]]
            ax.plot(eps, [results["clean"]["accuracy"]] + results[a]["accuracy"], marker="o", label=a.upper())
        ax.set(xlabel="eps (x 1/255, L-inf)", ylabel="accuracy", title=f"{title} adversarial".strip())
        ax.legend()
        fig.tight_layout()
        figs["adversarial"] = fig
    if "corruptions" in results:
        co = results["corruptions"]
        names = list(co["accuracy"])
        sev = co["severities"]
        fig = figure((max(6, 0.9 * len(names) + 2), 4), layout=None)
        ax = fig.subplots()
        w = 0.8 / max(len(sev), 1)
        for j, s in enumerate(sev):
            ax.bar([i + j * w for i in range(len(names))], [co["accuracy"][n][j] for n in names], width=w,
                   label=f"severity {s}")
        ax.axhline(results["clean"]["accuracy"], linestyle="--", color="gray", label="clean")
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names, rotation=30, ha="right")
        ax.set(ylabel="accuracy", title=f"{title} corruptions".strip())
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        figs["corruptions"] = fig
    return figs


def save_results(
    results: dict[str, Any], out_dir: str | os.PathLike, meta: dict[str, Any] | None = None, plots: bool = True
) -> list[Path]:
    """Write ``results.json``, one CSV per table and PNG figures into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = json_safe({"meta": meta or {}, **results})
    written = [out / "results.json"]
    atomic_write_json(written[0], payload)
    for name, rows in result_tables(results).items():
        path = out / f"{name}.csv"
        write_csv(path, rows)
        written.append(path)
    if plots:
        from vitscope.reports.render import save

        for name, fig in figures(results, title=str((meta or {}).get("model", ""))).items():
            written.append(save(fig, out / f"{name}.png", dpi=120))
    _logger.info("wrote %d files to %s", len(written), out)
    return written
