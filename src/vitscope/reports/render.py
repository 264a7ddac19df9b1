"""The one figure-rendering path: a figure with an Agg canvas in, PNG / SVG bytes or an atomically written file out.

Every figure of the package (the report's, the attention images', robustness' and curvature's) is built with
``figure()`` (``matplotlib.figure.Figure`` with an Agg canvas, never pyplot: no global state, no GUI backend,
garbage-collected like any object) and encoded here, through matplotlib's public API only: ``savefig`` with
its own PNG writer (Pillow) and SVG writer.

The same figure gives the same bytes in every run: the PNG has no time stamp or software tag, and the SVG no date,
and its element ids are hashes of what it draws. matplotlib makes them random (a uuid per id) unless the
``svg.hashsalt`` rcParam is set, so a fixed salt (``SVG_SALT``) is used where the user set none; and it hashes a
clip rectangle's coordinates at full float64 precision while the file prints them to 6 decimals, so each clip
path's id is made here from its printed definition (clip paths that print the same become one): an axes placed
a rounding error (an ulp) differently draws the same file, as it draws the same pixels.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import AutoLocator, FixedFormatter, FixedLocator, MaxNLocator, ScalarFormatter

from vitscope.io.atomic import atomic_write_bytes

__all__ = ["figure", "blank", "figure_templates", "to_bytes", "render", "lay_out", "save", "release",
           "PNG_COMPRESS", "DPI", "SVG_SALT"]

DPI = 130  # the report's resolution
PNG_COMPRESS = 1  # zlib level of the PNG files (Pillow's writer, through savefig's ``pil_kwargs``)
COLORBAR_LABEL = "<colorbar>"  # the label matplotlib gives a colour bar's axes (``Figure.colorbar``)
SVG_SALT = "vitscope"  # svg.hashsalt where the user set none: SVG element ids hash their content, not a uuid


def figure(size: tuple[float, float], layout: str | None = "constrained", dpi: float = 100) -> Figure:
    """A ``Figure`` of ``size`` inches with an Agg canvas (no pyplot)."""
    fig = Figure(figsize=size, dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


_TEMPLATES: dict[tuple, bytes] = {}  # pickled blank figures by (size, number of axes), for the rcParams below
_TEMPLATES_RC: str | None = None
_TEMPLATES_ON = False
TEMPLATE_TICKS = 8  # major ticks per axis in a template (an axis makes more when it needs them)


@contextlib.contextmanager
def figure_templates() -> Iterator[None]:
    """While active, each blank figure (size, number of axes) is built and styled once, then copied.

    A figure and its axes take ~4 ms to build (the axes' spines, axis objects and their first ticks, each from
    rcParams), each further tick ~0.45 ms (five artists); unpickling a pickled blank figure that already has
    ``TEMPLATE_TICKS`` ticks per axis takes ~2.5 ms (matplotlib supports pickling figures; the copies draw the
    same bytes: ticks an axis does not use are not drawn). The templates are kept for the next context (the
    next section) unless matplotlib's rcParams have changed in between."""
    global _TEMPLATES_ON, _TEMPLATES_RC
    if _TEMPLATES_ON:  # nested
        yield
        return
    rc = repr(sorted(dict.items(matplotlib.rcParams)))  # the stored values (reading "backend" would pick one)
    if rc != _TEMPLATES_RC or len(_TEMPLATES) > 64:
        _TEMPLATES.clear()
        _TEMPLATES_RC = rc
    _TEMPLATES_ON = True
    try:
        yield
    finally:
        _TEMPLATES_ON = False


def blank(size: tuple[float, float], n_axes: int) -> Figure:
    """A figure of ``n_axes`` axes side by side in the report's style (a copy of a template where active)."""
    key = (tuple(size), n_axes)
    if _TEMPLATES_ON and key in _TEMPLATES:
        fig = pickle.loads(_TEMPLATES[key])  # our own bytes, made below in this process
        FigureCanvasAgg(fig)
        return fig
    fig = figure(size)
    for k in range(n_axes):
        _style(fig.add_subplot(1, n_axes, k + 1) if n_axes > 1 else fig.add_subplot())
    if not _TEMPLATES_ON:
        return fig
    for ax in fig.axes:  # the ticks an axis usually draws, made here once (as matplotlib makes them, from the
        for axis in (ax.xaxis, ax.yaxis):  # first tick): ~0.1 ms each to unpickle, ~0.45 ms to make
            axis.get_major_ticks(TEMPLATE_TICKS)
    _TEMPLATES[key] = pickle.dumps(fig)
    return blank(size, n_axes)


def _style(ax) -> None:
    ax.grid(True, alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)
    ax.xaxis.label.set_size(9)
    ax.yaxis.label.set_size(9)
    try:
        ax.ticklabel_format(useOffset=False)
    except AttributeError:  # log or categorical axes
        pass


def to_bytes(fig: Figure, fmt: str, dpi: int = DPI, **savefig: Any) -> bytes:
    """The figure encoded as ``png`` (matplotlib's writer, zlib level ``PNG_COMPRESS``, no software tag) or
    ``svg`` (text as ``<text>`` elements, no date); ``savefig`` adds ``Figure.savefig`` options."""
    buf = io.BytesIO()
    if fmt == "png":
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None},
                    pil_kwargs={"compress_level": PNG_COMPRESS}, **savefig)
        return buf.getvalue()
    if fmt != "svg":
        raise ValueError(f"figures are written as png or svg, not {fmt!r}")
    # text as <text> elements (browsers and editors render it), not as glyph paths: 3-4x faster, smaller
    salt = matplotlib.rcParams["svg.hashsalt"] or SVG_SALT
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", dpi=dpi, metadata={"Date": None}, **savefig)
    return _printed_clip_ids(buf.getvalue(), salt)


# matplotlib's clip path definitions (one <defs> block at the end of the file) and their uses
_CLIP_DEF = re.compile(rb'( *)<clipPath id="(p[0-9a-f]{10})">\n(.*?)\1</clipPath>\n', re.DOTALL)
_CLIP_USE = re.compile(rb'url\(#(p[0-9a-f]{10})\)')


def _printed_clip_ids(svg: bytes, salt: str) -> bytes:
    """``svg`` with each clip path's id a hash of its printed definition (the ``<rect>`` or ``<path>`` as written,
    coordinates to 6 decimals) instead of matplotlib's hash of the unrounded coordinates; definitions that print
    the same are kept once."""
    ids: dict[bytes, bytes] = {}  # matplotlib's id -> ours
    seen: set[bytes] = set()

    def definition(m: re.Match) -> bytes:
        ours = b"p" + hashlib.sha256(salt.encode() + m.group(3)).hexdigest()[:10].encode()
        ids[m.group(2)] = ours
        if ours in seen:  # printed the same as an earlier one: its uses point there
            return b""
        seen.add(ours)
        return m.group(1) + b'<clipPath id="' + ours + b'">\n' + m.group(3) + m.group(1) + b"</clipPath>\n"

    svg = _CLIP_DEF.sub(definition, svg)
    return _CLIP_USE.sub(lambda m: b"url(#" + ids.get(m.group(1), m.group(1)) + b")", svg)


def save(fig: Figure, path: str | os.PathLike, dpi: int = DPI, **savefig: Any) -> Path:
    """Write the figure to ``path`` atomically, in the format its suffix names (``.png`` or ``.svg``)."""
    path = Path(path)
    return atomic_write_bytes(path, to_bytes(fig, path.suffix.lstrip(".").lower(), dpi, **savefig))


def render(fig: Figure, dpi: int = DPI, svg: bool = True) -> tuple[bytes, bytes | None]:
    """The figure as PNG and (``svg``) SVG bytes, laid out once; the same bytes as ``to_bytes`` of each.

    ``savefig`` on a figure with a layout engine draws the whole figure twice: once with rendering disabled to
    run the layout, then for real (and again twice for the SVG). Here the layout engine runs once, at the PNG's
    resolution, and is then removed, so each format is drawn once; the titles stay where the layout put them
    and each linear axis keeps the ticks it has (``lay_out``).
    """
    lay_out(fig, dpi)
    return to_bytes(fig, "png", dpi), to_bytes(fig, "svg", dpi) if svg else None


def lay_out(fig: Figure, dpi: int = DPI) -> None:
    """Run the figure's layout engine at ``dpi``, then remove it and fix what every later draw would compute
    again the same way (the axes no longer move): the title positions and the linear axes' ticks."""
    engine = fig.get_layout_engine()
    if engine is not None and fig.axes:
        old = fig.get_dpi()
        fig.set_dpi(dpi)  # savefig would lay the figure out at the dpi it writes
        try:
            engine.execute(fig)
        finally:
            fig.set_dpi(old)
    with matplotlib.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
        fig.set_layout_engine(None)  # None, not "none": a placeholder engine would still cost savefig a draw
    _pin_titles(fig)
    _pin_ticks(fig, dpi)


def _pin_titles(fig: Figure) -> None:
    """Keep each axes' titles where the layout's last draw placed them (above any top-side tick labels).

    An axes places its titles anew at every draw (measuring its tick labels) unless ``set_title`` was given a
    ``y``; the axes no longer move, so each draw would find the same ``y``. ``set_title`` resets the font size,
    weight, alignments and pad to rcParams: the size, weight and alignments are passed as they are."""
    for ax in fig.axes:
        if not any(ax.get_title(loc) for loc in ("center", "left", "right")):
            continue
        t = ax.title
        ax.set_title(t.get_text(), y=t.get_position()[1], fontsize=t.get_fontsize(), fontweight=t.get_fontweight(),
                     verticalalignment=t.get_verticalalignment(), horizontalalignment=t.get_horizontalalignment(),
                     color=t.get_color())


def _pin_ticks(fig: Figure, dpi: int) -> None:
    """Pin each linear axis' automatic ticks to the locations and labels they have once the figure is laid out.

    Each draw asks every axis' locator and formatter again, several times (for the axis, for its label's
    position, for the sibling axes' labels), and again for each format; with the axes placed, they can only
    give these values, which the draws then take as they are (``FixedLocator``/``FixedFormatter``, the
    formatter's offset text kept). Colour bars and log axes keep their own.
    """
    old = fig.get_dpi()
    fig.set_dpi(dpi)  # as in the PNG's draw
    try:
        for ax in fig.axes:
            if ax.get_label() == COLORBAR_LABEL:
                continue
            for axis in (ax.xaxis, ax.yaxis):
                loc, fmt = axis.get_major_locator(), axis.get_major_formatter()
                if (type(loc) not in (AutoLocator, MaxNLocator) or type(fmt) is not ScalarFormatter
                        or axis.get_scale() != "linear"):
                    continue
                locs = axis.get_majorticklocs()
                fixed = FixedFormatter(fmt.format_ticks(locs))
                fixed.set_offset_string(fmt.get_offset())
                axis.set_major_locator(FixedLocator(locs))
                axis.set_major_formatter(fixed)
    finally:
        fig.set_dpi(old)


def release(fig: Figure) -> None:
    """Drop the figure's pixel buffer (its canvas' renderer) by giving it a fresh canvas: for figures that stay
    referenced (e.g. left out of garbage collection) once encoded."""
    FigureCanvasAgg(fig)
