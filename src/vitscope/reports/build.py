"""``build_report``: output directories in, one self-contained HTML page plus PNG/CSV (and SVG) per figure out."""
from __future__ import annotations

import csv
import datetime
import gc
import io
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vitscope.io.atomic import atomic_write_bytes
from vitscope.reports import render as R
from vitscope.reports.captions import caption
from vitscope.reports.html import figure_html, render_page, table_html
from vitscope.reports.loaders import RunData, load_runs
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
    writer = csv.writer(buf, lineterminator="\n")  # writes None (and a missing key) as an empty cell
    writer.writerow(columns)
    writer.writerows([r.get(k) for k in columns] for r in rows)
    return buf.getvalue().encode("utf-8")


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    taken.add(out)
    return out


_WORKER_RUNS: list[RunData] = []  # in a render worker: the loaded runs, handed over by the fork (no pickling)
_WORKER_SVG = [False]  # in a render worker: whether to draw SVG too


def _render_section(runs: list[RunData], task: int, freeze: bool = False,
                    svg: bool = False) -> tuple[Section, list[tuple[bytes, bytes | None, bytes]]] | None:
    """Build section ``task`` (-1: the comparison across runs, else run ``task``) and encode its figures.

    Returns the section (its items keep key, caption and note; figure and rows are dropped, they are not
    needed once encoded) and per item its PNG, SVG (None unless ``svg``) and CSV bytes, or None when there is no
    such section.
    ``freeze`` (a render worker, which exits after the build): the built figures are left out of every later
    garbage collection (``gc.freeze``), which otherwise walks all of them again and again while they are drawn
    (0.1 s per section here); they are freed with the worker, their pixel buffers when drawn.
    """
    with R.figure_templates():  # blank figures are built once and copied
        sec = comparison_section(runs) if task < 0 else run_section(runs[task])
        if sec is None:
            return None
        if freeze:
            gc.freeze()
        files = []
        for item in sec.items:
            png, svg_data = R.render(item.figure, svg=svg)
            files.append((png, svg_data, csv_bytes(item.rows)))
            # No ``figure.clear()``: it clears every axes first (re-creating their ticks), a third of a draw.
            if freeze:  # a frozen figure is never collected: release its pixel buffer (the Agg renderer) now
                R.release(item.figure)
            item.figure, item.rows = None, []  # type: ignore[assignment]  # encoded: nothing left to send back
    return sec, files


def _worker_init(runs: list[RunData], svg: bool) -> None:
    _WORKER_RUNS[:] = runs
    _WORKER_SVG[0] = svg
    # Drawing makes and drops artists by the thousand: a young-generation collection every 20,000 allocations
    # instead of 700 finds most of them already freed (0.35 s -> 0.10 s of collections on the demo, same peak
    # memory). Only in the worker, which exits after the build.
    gc.set_threshold(20_000, 20, 100)
    torch = sys.modules.get("torch")
    if torch is not None:  # a forked child must not enter the parent's OpenMP pool (as DataLoader workers do)
        torch.set_num_threads(1)


def _default_workers(n_tasks: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(n_tasks, cpus))


def _worker_task(task: int) -> tuple[Section, list[tuple[bytes, bytes, bytes]]] | None:
    return _render_section(_WORKER_RUNS, task, freeze=True, svg=_WORKER_SVG[0])


def _rendered_sections(runs: list[RunData], tasks: list[int], workers: int, bar,
                       svg: bool) -> Iterator[tuple[Section, list] | None]:
    """``_render_section`` of every task, in order: in ``workers`` forked processes (Linux), else here.

    A worker that dies (killed, out of memory, a crash in a native library) fails the build with a one-line
    error instead of leaving it waiting forever, as ``multiprocessing.Pool`` would for the lost task.
    """
    if workers > 1 and len(tasks) > 1 and sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("fork")  # workers inherit the loaded runs and the imported modules
        # Frozen objects are left out of the workers' garbage collections, which would otherwise walk (and
        # copy-on-write) every object inherited from this process: 12% less CPU in the workers here.
        gc.freeze()
        try:
            with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=_worker_init,
                                     initargs=(runs, svg)) as pool:
                # Largest sections first (by the files found; the comparison last), so that the last one to
                # start is small and the workers finish together; results are still taken in page order.
                order = sorted(tasks, key=lambda t: -1 if t < 0 else len(runs[t].files), reverse=True)
                pending = {t: pool.submit(_worker_task, t) for t in order}
                for t in tasks:
                    try:
                        res = pending[t].result()
                    except BrokenProcessPool as e:
                        raise RuntimeError(
                            "a report worker process died while drawing the figures (killed or out of memory?); "
                            "rerun, or build with workers=1 (vitscope report --workers 1)") from e
                    bar.update(1)
                    yield res
        finally:
            gc.unfreeze()
    else:
        for t in tasks:
            res = _render_section(runs, t, svg=svg)
            bar.update(1)
            yield res


def build_report(run_dirs: Sequence[str | os.PathLike], out_html: str | os.PathLike,
                 title: str = "vitscope report", workers: int | None = None, svg: bool = False) -> Path:
    """Write one self-contained HTML report of every output directory in ``run_dirs`` to ``out_html``.

    Each directory may hold ``vitscope probe``, ``train``, ``hessian``, ``landscape``, ``robustness`` and
    ``attention`` outputs (see ``vitscope.reports.loaders``); a figure is drawn only for data that is present.
    Every figure is also written as ``figures/<model>/<figure>.png`` and ``.csv`` (the plotted numbers) next to
    the page, plus ``figures/summary.csv``; with ``svg`` also as ``.svg``. All files are written atomically.

    Args:
        workers: processes that draw the sections (one per model, plus the comparison) in parallel, forked
            from this one (Linux; elsewhere everything is drawn here); default one per available CPU, at most
            one per section. 1 draws everything in this process. The files are the same either way.
        svg: also write each figure as SVG (text kept as text; drawing it costs about a third of the build).

    Returns:
        The path of the HTML page.

    Raises:
        FileNotFoundError / ValueError: a directory is missing, holds nothing recognizable (the message
            lists the expected files) or a file lacks a needed field.
    """
    out = Path(out_html)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the HTML file to write, e.g. {out / 'report.html'}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    run_dirs = list(run_dirs)
    runs = load_runs(run_dirs)
    fig_root = out.parent / FIGURES_DIR
    tasks = [-1] + list(range(len(runs))) if len(runs) > 1 else [0]  # the comparison first, as on the page
    taken: set[str] = {"summary", FIGURES_DIR}
    page_sections = []
    total = 0
    bar = tqdm(total=len(tasks), desc="report", unit="section", disable=None, leave=False)
    # Files are written by threads while the figures are drawn: each atomic write waits on its fsync, and
    # many fsyncs in flight share the file system's journal commits.
    with ThreadPoolExecutor(max_workers=8) as writer:
        writes = []
        try:
            for res in _rendered_sections(runs, tasks, workers or _default_workers(len(tasks)), bar, svg):
                if res is None:
                    continue
                sec, files = res
                sec.slug = _unique(sec.slug, taken)
                figs, keys = [], set()
                for item, (png, svg_data, csv_data) in zip(sec.items, files):
                    key = _unique(item.key, keys)
                    anchor = f"{sec.slug}--{key}"
                    base = fig_root / sec.slug / key
                    rel = f"{FIGURES_DIR}/{sec.slug}/{key}"
                    links = {"PNG": rel + ".png", "SVG": rel + ".svg", "CSV": rel + ".csv"}
                    for name, data in zip(list(links), (png, svg_data, csv_data)):
                        if data is None:  # no SVG drawn
                            del links[name]
                        else:
                            writes.append(writer.submit(atomic_write_bytes, base.with_suffix("." + name.lower()), data))
                    alt = f"{sec.title}: {item.caption.title}"
                    figs.append((anchor, item.caption.title,
                                 figure_html(anchor, png, item.caption.title, item.caption.definition,
                                             item.caption.finding, item.note, links, alt)))
                total += len(figs)
                page_sections.append({"anchor": sec.slug, "title": sec.title, "source": sec.path, "figures": figs,
                                      "notes": sec.notes})
            rows = summary_rows(runs)
            writes.append(writer.submit(atomic_write_bytes, fig_root / "summary.csv", csv_bytes(rows)))
        finally:
            bar.close()
            for w in writes:  # every write finishes (or fails) before the page is written
                w.result()
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
