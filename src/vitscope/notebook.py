"""Results in a notebook: tidy tables (pandas) and the report's own figures for any result object.

Every result object (``ProbeResult``, ``SpectrumResult``, ``LandscapeResult``, ``AttentionMaps``,
``RobustnessResult``) has ``to_pandas()``, a tidy ``pandas.DataFrame`` with one row per value (per layer, head,
eigenvalue, grid point ...), and ``plot(key=None)``, the figure ``vitscope report`` draws for that result,
as a ``matplotlib.figure.Figure`` (built by the report's own section code, so a notebook and a report show the
same picture). ``report(...)`` builds the HTML report from Python.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["tidy_rows", "frame", "report_items", "report_figures", "report_figure", "report_rows", "report"]

# Columns of a probe row that say where a value was measured; every other field is a measured value.
ID_KEYS = ("layer", "name", "kind", "block", "depth", "normalized_depth", "other_layer", "other_depth", "other_kind",
           "position", "gate", "shots")


def tidy_rows(measure: str, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One output row per measured value of per-layer ``rows`` (a probe table): the row's location columns
    (``ID_KEYS`` and any other text field), then ``statistic``, ``head`` (per-head values; None for the layer's
    value), ``index`` (position in a per-layer curve, e.g. Fourier's frequencies; None otherwise) and ``value``."""
    out = []
    for row in rows:
        where = {k: v for k, v in row.items() if k in ID_KEYS or isinstance(v, str)}
        for key, v in row.items():
            if key in where:
                continue
            base = {"measure": measure, **where, "statistic": "value" if key == "heads" else key}
            if isinstance(v, (list, tuple)):
                pos = "head" if key == "heads" else "index"
                out += [{**base, "head": i if pos == "head" else None, "index": i if pos == "index" else None,
                         "value": _num(x)} for i, x in enumerate(v)]
            elif isinstance(v, (int, float)) or v is None:
                out.append({**base, "head": None, "index": None, "value": _num(v)})
    return out


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def frame(records: list[dict[str, Any]]) -> Any:
    """``pandas.DataFrame(records)`` (columns in first-seen order); pandas is imported here, on use."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("to_pandas() needs pandas: pip install pandas (or pip install 'vitscope[dev]')") from None
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    return pd.DataFrame.from_records(records, columns=columns)


def report_items(name: str, **data: Any) -> list[Any]:
    """The report's ``FigureItem``s (key, figure, the rows it plots, caption) for one output.

    ``data`` are ``reports.RunData`` fields as the report reads them from disk: ``probe`` (``ProbeResult.to_dict()``),
    ``hessian``, ``landscape`` (their ``to_dict()``), ``robustness`` (``evaluate_robustness``'s dict), ``attention``
    (an ``AttentionMaps``), ``meta``. The items are built by ``reports.sections.run_section``, the report's code.
    """
    import json

    from vitscope.io.atomic import json_safe
    from vitscope.reports import loaders
    from vitscope.reports.sections import run_section

    read = {"probe": loaders._load_probe, "hessian": loaders._load_hessian, "landscape": loaders._load_landscape,
            "robustness": loaders._load_robustness}  # what the report does to each file it reads
    for kind, load in read.items():
        if data.get(kind) is not None:  # through JSON, as written to disk and read back by the report
            data[kind] = load(Path(f"<{kind} result>"), json.loads(json.dumps(json_safe(data[kind]))))
    return run_section(loaders.RunData(path=Path("."), name=name, **data)).items


def report_figures(name: str, **data: Any) -> dict[str, Any]:
    """The figures ``vitscope report`` draws for one output (see ``report_items``), by key."""
    return {item.key: item.figure for item in report_items(name, **data)}


def report_rows(name: str, **data: Any) -> Any:
    """Tidy ``pandas.DataFrame`` of the rows the report's figures plot (its CSV files), with a ``figure`` column."""
    return frame([{"figure": item.key, **row} for item in report_items(name, **data) for row in item.rows])


def report_figure(name: str, key: str | None = None, **data: Any) -> Any:
    """One of ``report_figures(name, **data)``: ``key``'s, or the first when ``key`` is None."""
    figures = report_figures(name, **data)
    if not figures:
        raise ValueError(f"the report draws no figure for this result of {name} (no finite values to plot)")
    if key is None:
        return next(iter(figures.values()))
    if key not in figures:
        raise ValueError(f"no figure {key!r} for this result; it has {', '.join(figures)}")
    return figures[key]


def report(*run_dirs: str | os.PathLike | Iterable[str | os.PathLike], out: str | os.PathLike = "report.html",
           title: str = "vitscope report", workers: int | None = None, svg: bool = False) -> Path:
    """``vitscope report RUN_DIR... --out OUT`` from Python: one self-contained HTML page (``reports.build_report``)
    of the output directories (``report("runs/a", "runs/b")`` or ``report(["runs/a", "runs/b"])``); returns its
    path; ``svg`` also writes each figure as SVG. A result object is saved to a directory first (``result.save(dir)``)
    and that directory is passed."""
    from vitscope.reports import build_report

    dirs: list[str | os.PathLike] = []
    for d in run_dirs:
        dirs += [d] if isinstance(d, (str, os.PathLike)) else list(d)
    if not dirs:
        raise ValueError("report() needs at least one output directory (of vitscope probe / train / hessian ...)")
    return build_report([str(d) for d in dirs], str(out), title=title, workers=workers, svg=svg)
