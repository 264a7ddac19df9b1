"""``build_report``: output directories in, one self-contained HTML page plus PNG/SVG/CSV per figure out."""
from __future__ import annotations

import csv
import datetime
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vitscope.io.atomic import atomic_write_bytes
from vitscope.reports import figures as F
from vitscope.reports.captions import caption
from vitscope.reports.html import figure_html, render_page, table_html
from vitscope.reports.loaders import load_runs
from vitscope.reports.sections import Section, comparison_section, run_section, summary_rows

_logger = logging.getLogger(__name__)

__all__ = ["build_report", "FIGURES_DIR"]

FIGURES_DIR = "figures"
SUMMARY_COLUMNS = [("model", "model"), ("source", "source"), ("examples", "examples"), ("accuracy", "top-1"),
                   ("nll", "NLL"), ("ece", "ECE"), ("brier", "Brier"), ("occlusion_accuracy", "occlusion top-1")]


def csv_bytes(rows: Sequence[dict[str, Any]]) -> bytes:
    """Rows as CSV; columns in first-seen order, None as an empty cell, floats with full precision (repr)."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue().encode("utf-8")


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    taken.add(out)
    return out


def build_report(run_dirs: Sequence[str | os.PathLike], out_html: str | os.PathLike,
                 title: str = "vitscope report") -> Path:
    """Write one self-contained HTML report of every output directory in ``run_dirs`` to ``out_html``.

    Each directory may hold ``vitscope probe``, ``train``, ``hessian``, ``landscape`` and ``robustness``
    outputs (see ``vitscope.reports.loaders``); a figure is drawn only for data that is present. Every
    figure is also written as ``figures/<model>/<figure>.png``, ``.svg`` and ``.csv`` (the plotted numbers)
    next to the page, plus ``figures/summary.csv``. All files are written atomically.

    Returns:
        The path of the HTML page.

    Raises:
        FileNotFoundError / ValueError: a directory is missing, holds nothing recognizable (the message
            lists the expected files) or a file lacks a needed field.
    """
    out = Path(out_html)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the HTML file to write, e.g. {out / 'report.html'}")
    run_dirs = list(run_dirs)
    runs = load_runs(run_dirs)
    fig_root = out.parent / FIGURES_DIR
    sections: list[Section] = [run_section(r) for r in runs]
    comparison = comparison_section(runs)
    if comparison is not None:
        sections.insert(0, comparison)
    taken: set[str] = {"summary", FIGURES_DIR}
    page_sections = []
    total = sum(len(s.items) for s in sections)
    bar = tqdm(total=total, desc="report", disable=None, leave=False)
    for sec in sections:
        sec.slug = _unique(sec.slug, taken)
        figs, keys = [], set()
        for item in sec.items:
            key = _unique(item.key, keys)
            anchor = f"{sec.slug}--{key}"
            base = fig_root / sec.slug / key
            png = F.to_bytes(item.figure, "png")
            item.figure.set_layout_engine("none")  # keep the layout of the PNG draw; the SVG need not redo it
            atomic_write_bytes(base.with_suffix(".png"), png)
            atomic_write_bytes(base.with_suffix(".svg"), F.to_bytes(item.figure, "svg"))
            atomic_write_bytes(base.with_suffix(".csv"), csv_bytes(item.rows))
            rel = f"{FIGURES_DIR}/{sec.slug}/{key}"
            links = {"PNG": rel + ".png", "SVG": rel + ".svg", "CSV": rel + ".csv"}
            alt = f"{sec.title}: {item.caption.title}"
            figs.append((anchor, item.caption.title,
                         figure_html(anchor, png, item.caption.title, item.caption.definition, item.caption.finding,
                                     item.note, links, alt)))
            item.figure.clear()
            bar.update(1)
        page_sections.append({"anchor": sec.slug, "title": sec.title, "source": sec.path, "figures": figs,
                              "notes": sec.notes})
    bar.close()
    rows = summary_rows(runs)
    atomic_write_bytes(fig_root / "summary.csv", csv_bytes(rows))
    cap = caption("summary")
    summary = (table_html(rows, SUMMARY_COLUMNS) if rows else "<p>No accuracy recorded in these outputs.</p>")
    summary += (f'<p class="caption">{cap.definition} <em>Paper:</em> {cap.finding} '
                f'Data: <a href="{FIGURES_DIR}/summary.csv">summary.csv</a>.</p>')
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_dirs = len(run_dirs)
    subtitle = (f"{n_dirs} output director{'y' if n_dirs == 1 else 'ies'}, {len(runs)} model{'s' * (len(runs) > 1)}, "
                f"{total} figures; generated {stamp}")
    page = render_page(title, subtitle, summary, page_sections)
    atomic_write_bytes(out, page.encode("utf-8"))
    _logger.info("wrote %s with %d figures (files under %s)", out, total, fig_root)
    return out
