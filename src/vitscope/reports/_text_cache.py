"""Memoized text measurement while the report draws its figures (the same bytes, less matplotlib work).

matplotlib lays out every text anew each time it is measured: several times per draw (tick labels for the
layout, the axis label, the sibling axes) and again in each figure and each output format, and its own cache of
text sizes lives with one renderer, i.e. one figure and format. The report draws ~120 figures whose ~19,000
text layouts are ~1,200 distinct ones (the same tick labels, fonts and titles). ``text_caches()`` memoizes, for
as long as it is active, a text's layout (``Text._get_layout``) and string sizes across renderers, keyed on
everything they are computed from, so the figures are the same to the byte.

Text is drawn as matplotlib draws it: an earlier version also memoized Agg's glyph bitmaps through matplotlib's
private drawing path; it saved ~0.3 s of the demo's ~9 s of CPU and failed intermittently inside FreeType
("invalid outline") once caches carried over between builds, so it was removed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import matplotlib
from matplotlib import text as mtext
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.transforms import Bbox

__all__ = ["text_caches"]

# The matplotlib releases whose private text path (``Text._get_layout``, ``_get_text_metrics_with_cache``, the
# text measurement) these caches mirror and were checked against (same bytes); any other draws as before.
_CHECKED_MINOR_VERSIONS = ((3, 11),)
_SUPPORTED = tuple(int(v) for v in matplotlib.__version__.split(".")[:2]) in _CHECKED_MINOR_VERSIONS
_MAX_ENTRIES = 50_000  # per cache; then it starts afresh (the report needs a few thousand)
_RC_PREFIXES = ("text.", "mathtext.", "font.")  # rcParams that text sizes depend on (stored values)


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
        state = (matplotlib.__version__, repr(sorted((k, v) for k, v in dict.items(matplotlib.rcParams)
                                                    if k.startswith(_RC_PREFIXES))))
        caches = (self.layout, self.metrics)
        if state != self.state or any(len(c) > _MAX_ENTRIES for c in caches):
            for c in caches:
                c.clear()
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
    if not _SUPPORTED or mtext.Text._get_layout is _cached_layout:  # unchecked matplotlib; or nested
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
