"""Memoized text measurement while the report draws its figures (the same bytes, less matplotlib work).

matplotlib lays out every text anew each time it is measured: several times per draw (tick labels for the
layout, the axis label, the sibling axes) and again in each figure and each output format, and its own cache of
text sizes lives with one renderer, i.e. one figure and format. The report draws ~120 figures whose ~19,000
text layouts are ~1,200 distinct ones (the same tick labels, fonts and titles). ``text_caches()`` memoizes, for
as long as it is active, a text's layout (``Text._get_layout``) and string sizes across renderers, keyed on
everything they are computed from, so the figures are the same to the byte.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import matplotlib
from matplotlib import text as mtext
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.transforms import Bbox

__all__ = ["text_caches"]

_MAX_ENTRIES = 50_000  # per cache; then it starts afresh (the report needs a few thousand)
_RC_KEYS = ("text.hinting", "text.hinting_factor", "text.kerning_factor", "text.antialiased")


def _renderer_kind(renderer) -> type | None:
    """The class that measures text for ``renderer``, or None where results are not known to be shareable.

    Agg measures with its own FreeType font at its dpi; SVG (inside matplotlib's mixed-mode renderer) measures
    through ``TextToPath`` at a fixed scale. Both depend on nothing but the text, font and dpi."""
    if type(renderer) is RendererAgg:
        return RendererAgg
    inner = getattr(renderer, "_renderer", None)  # MixedModeRenderer: vector renderer unless rasterizing
    if type(renderer).__name__ == "MixedModeRenderer" and type(inner).__name__ == "RendererSVG":
        return type(inner)
    return None


class _Caches:
    def __init__(self) -> None:
        self.layout: dict = {}
        self.metrics: dict = {}
        self.state: tuple | None = None

    def check(self) -> None:
        """Start afresh when anything the cached values depend on globally has changed (rcParams, version)."""
        state = (matplotlib.__version__, tuple(matplotlib.rcParams[k] for k in _RC_KEYS))
        if state != self.state or len(self.layout) > _MAX_ENTRIES or len(self.metrics) > _MAX_ENTRIES:
            self.layout.clear()
            self.metrics.clear()
            self.state = state


_CACHES = _Caches()
_ORIGINAL_LAYOUT = mtext.Text._get_layout
_ORIGINAL_METRICS = mtext._get_text_metrics_with_cache


def _cached_metrics(renderer, text, fontprop, ismath, dpi):
    kind = _renderer_kind(renderer)
    if kind is None or ismath == "TeX":
        return _ORIGINAL_METRICS(renderer, text, fontprop, ismath, dpi)
    key = (kind, getattr(renderer, "dpi", None), text, hash(fontprop), ismath, dpi)
    out = _CACHES.metrics.get(key)
    if out is None:
        out = _CACHES.metrics[key] = _ORIGINAL_METRICS(renderer, text, fontprop, ismath, dpi)
    return out


def _cached_layout(self: mtext.Text, renderer):
    kind = _renderer_kind(renderer)
    if kind is None or self.get_usetex():
        return _ORIGINAL_LAYOUT(self, renderer)
    # Everything ``Text._get_layout`` reads: the (wrapped) string, font, rotation, alignments, line spacing,
    # maths parsing and the figure's dpi; plus the renderer's kind and dpi for the sizes it measures.
    key = (kind, getattr(renderer, "dpi", None), self.get_figure(root=True).dpi, self._get_wrapped_text(),
           hash(self._fontproperties), self.get_rotation(), self.get_rotation_mode(), self._horizontalalignment,
           self._verticalalignment, self._get_multialignment(), self._linespacing, self.get_parse_math())
    hit = _CACHES.layout.get(key)
    if hit is None:
        bbox, info, corner = _ORIGINAL_LAYOUT(self, renderer)
        hit = _CACHES.layout[key] = (bbox.get_points().copy(), tuple(info), corner)
    points, info, corner = hit
    return Bbox(points.copy()), list(info), corner  # a fresh Bbox and list: callers may change theirs


@contextlib.contextmanager
def text_caches() -> Iterator[None]:
    """While active, text layouts and sizes are memoized across figures, renderers and draws (see module)."""
    if mtext.Text._get_layout is _cached_layout:  # nested: the outer one restores
        yield
        return
    _CACHES.check()
    mtext.Text._get_layout = _cached_layout
    mtext._get_text_metrics_with_cache = _cached_metrics
    try:
        yield
    finally:
        mtext.Text._get_layout = _ORIGINAL_LAYOUT
        mtext._get_text_metrics_with_cache = _ORIGINAL_METRICS
