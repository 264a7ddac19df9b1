"""Memoized text measurement while the report draws its figures (the same bytes, less matplotlib work).

matplotlib lays out every text anew each time it is measured: several times per draw (tick labels for the
layout, the axis label, the sibling axes) and again in each figure and each output format, and its own cache of
text sizes lives with one renderer, i.e. one figure and format. The report draws ~120 figures whose ~19,000
text layouts are ~1,200 distinct ones (the same tick labels, fonts and titles). ``text_caches()`` memoizes, for
as long as it is active, a text's layout (``Text._get_layout``) and string sizes across renderers, keyed on
everything they are computed from, so the figures are the same to the byte.

For the PNG (Agg), it also memoizes the glyph layout of each string (FreeType/HarfBuzz shaping: 2,300 strings
drawn, 570 distinct) and the bitmap of each glyph at each sub-pixel offset (17,000 glyphs drawn, 5,700
distinct): FreeType places a glyph at 1/64 pixel, so a glyph rendered at offset ``(X mod 64, Y mod 64)`` and
moved by whole pixels is the bitmap it renders at ``(X, Y)``. Used only with the matplotlib whose private
drawing path it mirrors (``RendererAgg._draw_text_glyphs_and_boxes``); any other draws as before.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import matplotlib
import numpy as np
from matplotlib import text as mtext
from matplotlib.backends import backend_agg
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.ft2font import FT2Font
from matplotlib.transforms import Bbox

__all__ = ["text_caches"]

# The matplotlib releases whose private text path (``Text._get_layout``, ``_get_text_metrics_with_cache``, the
# Agg glyph drawing) these caches mirror and were checked against (same bytes); any other draws as before.
_CHECKED_MINOR_VERSIONS = ((3, 11),)
_SUPPORTED = tuple(int(v) for v in matplotlib.__version__.split(".")[:2]) in _CHECKED_MINOR_VERSIONS
_MAX_ENTRIES = 50_000  # per cache; then it starts afresh (the report needs a few thousand)
_RC_PREFIXES = ("text.", "mathtext.", "font.")  # rcParams that text sizes and glyphs depend on (stored values)


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
        self.shaped: dict = {}
        self.glyphs: dict = {}
        self.state: tuple | None = None

    def check(self) -> None:
        """Start afresh when anything the cached values depend on globally has changed (rcParams, version)."""
        state = (matplotlib.__version__, repr(sorted((k, v) for k, v in dict.items(matplotlib.rcParams)
                                                    if k.startswith(_RC_PREFIXES))))
        caches = (self.layout, self.metrics, self.shaped, self.glyphs)
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


_ORIGINAL_DRAW_TEXT = RendererAgg.draw_text
# The private drawing path of matplotlib 3.11 that ``_cached_draw_text`` mirrors; absent: Agg is left alone.
_AGG_GLYPHS = (hasattr(RendererAgg, "_draw_text_glyphs_and_boxes") and hasattr(backend_agg, "get_hinting_flag")
               and hasattr(backend_agg, "RenderMode")
               and all(hasattr(FT2Font, a) for a in ("_layout", "_set_transform", "_render_glyph")))


def _cached_draw_text(self: RendererAgg, gc, x, y, s, prop, angle, ismath=False, mtext=None):
    """``RendererAgg.draw_text`` of plain antialiased text, with the string's shaping and each glyph's bitmap
    memoized (``RendererAgg.draw_text`` + ``_draw_text_glyphs_and_boxes`` of matplotlib 3.11, same pixels)."""
    features = mtext.get_fontfeatures() if mtext is not None else None
    language = mtext.get_language() if mtext is not None else None
    if ismath or not gc.get_antialiased() or not isinstance(language, (str, type(None))):
        return _ORIGINAL_DRAW_TEXT(self, gc, x, y, s, prop, angle, ismath, mtext)
    flags = backend_agg.get_hinting_flag()
    size = prop.get_size_in_points()
    key = (s, hash(prop), size, self.dpi, flags, features, language)
    items = _CACHES.shaped.get(key)
    if items is None:
        font = self._prepare_font(prop)
        items = _CACHES.shaped[key] = tuple(
            (it.ft_object, it.glyph_index, it.x, it.y)
            for it in font._layout(s, flags=flags, features=features, language=language))
    # y is downwards here, FreeType's is upwards; positions in 1/64 pixel (26.6 fixed point), as matplotlib's.
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    matrix = None
    height = self.height
    glyphs = _CACHES.glyphs
    for font, index, dx, dy in items:
        X = round(0x40 * (x + dx * cos - dy * sin))
        Y = round(0x40 * (height - y + dx * sin + dy * cos))
        gkey = (font, size, self.dpi, index, angle, flags, X & 63, Y & 63)
        hit = glyphs.get(gkey)
        if hit is None:
            if matrix is None:
                matrix = (0x10000 * np.array([[cos, -sin], [sin, cos]]) @ [[1, 0], [0, 1]]).round().astype(int)
            font.set_size(size, self.dpi)
            font._set_transform(matrix, [X & 63, Y & 63])  # the sub-pixel part; whole pixels are added below
            bitmap = font._render_glyph(index, flags, backend_agg.RenderMode.NORMAL)
            hit = glyphs[gkey] = (np.array(bitmap.buffer), bitmap.left, bitmap.top)
        buffer, left, top = hit
        self._renderer.draw_text_image(buffer, left + (X >> 6), int(height) - (top + (Y >> 6)) + buffer.shape[0],
                                       0, gc)


@contextlib.contextmanager
def text_caches() -> Iterator[None]:
    """While active, text layouts and sizes are memoized across figures, renderers and draws (see module)."""
    if not _SUPPORTED or mtext.Text._get_layout is _cached_layout:  # unchecked matplotlib; or nested
        yield
        return
    _CACHES.check()
    mtext.Text._get_layout = _cached_layout
    mtext._get_text_metrics_with_cache = _cached_metrics
    if _AGG_GLYPHS:
        RendererAgg.draw_text = _cached_draw_text
    try:
        yield
    finally:
        mtext.Text._get_layout = _ORIGINAL_LAYOUT
        mtext._get_text_metrics_with_cache = _ORIGINAL_METRICS
        RendererAgg.draw_text = _ORIGINAL_DRAW_TEXT
