"""One self-contained HTML page: inline CSS, figures as base64 PNG, no network access of any kind.

A small inline script marks the page once loaded: ``<body data-images-ok="true|false" data-images="N"
data-broken-images="K">``, so a headless browser can check that every figure decoded.
"""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["render_page", "figure_html", "table_html"]

CSS = """
:root { --fg: #1d2430; --muted: #5b6573; --line: #dde2e8; --accent: #2b5fab; --bg: #f7f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: var(--fg); background: var(--bg); }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 24px; }
header p { margin: 0; color: var(--muted); font-size: 13px; }
.layout { display: flex; align-items: flex-start; }
nav { position: sticky; top: 0; flex: 0 0 230px; max-height: 100vh; overflow-y: auto; padding: 18px 14px 18px 22px;
      font-size: 13px; border-right: 1px solid var(--line); background: #fff; }
nav h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 0 0 8px; }
nav ol { list-style: none; padding: 0; margin: 0; }
nav li { margin: 2px 0; }
nav ol ol { padding-left: 12px; margin-bottom: 6px; }
nav a { color: var(--fg); text-decoration: none; }
nav a:hover { color: var(--accent); text-decoration: underline; }
nav > ol > li > a { font-weight: 600; }
main { flex: 1; min-width: 0; padding: 10px 32px 40px; }
section.model { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 6px 22px 20px;
                margin: 18px 0; }
section.model > h2 { font-size: 20px; margin: 14px 0 2px; }
.src { color: var(--muted); font-size: 12px; margin: 0 0 10px; word-break: break-all; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 18px; }
figure { margin: 0; padding: 10px; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figure img { display: block; width: 100%; height: auto; }
figcaption { font-size: 13px; line-height: 1.45; margin-top: 6px; }
figcaption .t { font-weight: 600; display: block; font-size: 14px; }
figcaption .paper { color: #6b3d00; }
figcaption .note, figcaption .files { color: var(--muted); font-size: 12px; }
figcaption .files a { color: var(--accent); }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 6px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 12px; text-align: right; }
th { background: #f0f3f7; font-weight: 600; }
td:first-child, th:first-child, td:nth-child(2), th:nth-child(2) { text-align: left; }
.caption { font-size: 13px; color: var(--muted); max-width: 1000px; }
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) { broken++; imgs[i].setAttribute('data-broken', '1'); }
  }
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-broken-images', String(broken));
  document.body.setAttribute('data-images-ok', broken === 0 ? 'true' : 'false');
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if "accuracy" in key:
            return f"{100 * v:.2f}%"
        return f"{v:.4f}"
    return _e(v)


def table_html(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """An HTML table of ``rows`` over ``columns`` = [(key, header)]; accuracies shown in %."""
    head = "".join(f"<th>{_e(h)}</th>" for _, h in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k), k)}</td>" for k, _ in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_html(anchor: str, png: bytes, title: str, definition: str, finding: str, note: str,
                links: dict[str, str], alt: str) -> str:
    """A captioned figure: the PNG embedded as base64, links to the PNG/SVG/CSV files next to the page."""
    data = base64.b64encode(png).decode("ascii")
    files = " · ".join(f'<a href="{_e(href)}">{_e(kind)}</a>' for kind, href in links.items())
    note_html = f'<span class="note">{_e(note)}.</span> ' if note else ""
    return (f'<figure id="{_e(anchor)}"><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f'<figcaption><span class="t">{_e(title)}</span>{_e(definition)} '
            f'<span class="paper"><em>Paper:</em> {_e(finding)}</span> {note_html}'
            f'<span class="files">Files: {files}</span></figcaption></figure>')


def render_page(title: str, subtitle: str, summary: str, sections: Sequence[dict[str, Any]]) -> str:
    """The page: header, table of contents, summary, then one block per section.

    ``sections``: ``{"anchor", "title", "source", "figures": [(anchor, title, html)]}``.
    """
    toc = ['<li><a href="#summary">Summary</a></li>']
    body = [f'<section class="model" id="summary"><h2>Summary</h2>{summary}</section>']
    for s in sections:
        sub = "".join(f'<li><a href="#{_e(a)}">{_e(t)}</a></li>' for a, t, _ in s["figures"])
        toc.append(f'<li><a href="#{_e(s["anchor"])}">{_e(s["title"])}</a><ol>{sub}</ol></li>')
        figs = "".join(h for _, _, h in s["figures"])
        src = f'<p class="src">{_e(s["source"])}</p>' if s.get("source") else ""
        src += "".join(f'<p class="src">Note: {_e(n)}.</p>' for n in s.get("notes", []))
        body.append(f'<section class="model" id="{_e(s["anchor"])}"><h2>{_e(s["title"])}</h2>{src}'
                    f'<div class="grid">{figs}</div></section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header>"
            f"<div class=\"layout\"><nav><h2>Contents</h2><ol>{''.join(toc)}</ol></nav>"
            f"<main>{''.join(body)}</main></div><script>{SCRIPT}</script></body></html>\n")
