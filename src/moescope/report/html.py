"""The report page: one self-contained HTML file, plotly's JavaScript embedded once, no network to view.

The page records its own health for headless checks: every script error and ``console.error`` is kept,
and once the page has loaded ``<body>`` gets ``data-figures-expected``, ``data-figures-rendered`` (plotly
graphs that drew an SVG) and ``data-errors`` (a JSON list), which `chromium --dump-dom` shows.
"""

from __future__ import annotations

import dataclasses
import html
from typing import Any

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #1d2430;
       background: #f6f7f9; }
header { background: #1d2430; color: #fff; padding: 20px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 24px; }
header p { margin: 0; color: #c7cdd8; font-size: 14px; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 32px 48px; }
h2 { font-size: 19px; margin: 28px 0 10px; border-bottom: 2px solid #d9dde5; padding-bottom: 4px; }
.verdicts { display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: 14px; }
.card { background: #fff; border-radius: 8px; padding: 14px 16px; box-shadow: 0 1px 3px rgba(0,0,0,.08);
        border-left: 6px solid #8a94a6; }
.card.good { border-left-color: #2e9e5b; } .card.warn { border-left-color: #d08a11; }
.card.info { border-left-color: #3a6fd8; } .card.wide { grid-column: span 2; }
.card h3 { margin: 0 0 6px; font-size: 15px; } .card .big { font-size: 22px; font-weight: 600; margin: 2px 0 6px; }
.card p { margin: 4px 0; font-size: 13.5px; line-height: 1.4; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { padding: 3px 8px; text-align: right; border-bottom: 1px solid #e3e6ec; }
th:first-child, td:first-child { text-align: left; }
code { background: #eef1f6; padding: 1px 4px; border-radius: 3px; font-size: 12.5px; word-break: break-all; }
.figure { background: #fff; border-radius: 8px; padding: 10px 12px 4px; margin: 14px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,.08); }
.figure .read { font-size: 14px; margin: 2px 4px 6px; } .figure .read b { color: #3a6fd8; }
footer { font-size: 12px; color: #68728a; margin-top: 30px; }
"""

_HEALTH_HEAD = """
window.__moescopeErrors = [];
window.addEventListener('error', function (e) { window.__moescopeErrors.push(String(e.message || e)); });
(function () { var ce = console.error; console.error = function () {
  window.__moescopeErrors.push(Array.prototype.join.call(arguments, ' ')); ce.apply(console, arguments); }; })();
"""

_HEALTH_TAIL = """
window.addEventListener('load', function () { setTimeout(function () {
  var plots = document.querySelectorAll('.js-plotly-plot');
  var drawn = 0; plots.forEach(function (p) { if (p.querySelector('svg.main-svg')) { drawn += 1; } });
  document.body.dataset.figuresExpected = String(document.querySelectorAll('.figure').length);
  document.body.dataset.figuresRendered = String(drawn);
  document.body.dataset.errors = JSON.stringify(window.__moescopeErrors);
}, 500); });
"""


@dataclasses.dataclass(frozen=True)
class Card:
    """A verdict: title, the headline, sentences, a tone (good | warn | info) and optional table rows."""

    title: str
    headline: str
    lines: tuple[str, ...] = ()
    tone: str = "info"
    table: tuple[tuple[str, ...], ...] = ()
    wide: bool = False  # spans two grid columns (for a wider table)


@dataclasses.dataclass(frozen=True)
class Figure:
    """One figure: its section, the sentence saying what to read from it, and the plotly figure."""

    section: str
    read: str
    figure: Any


def _card(c: Card) -> str:
    rows = ""
    if c.table:
        head, *body = c.table
        rows = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
        rows += "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in body) + "</table>"
    lines = "".join(f"<p>{line}</p>" for line in c.lines)  # lines may hold <code>: built by us, escaped there
    wide = " wide" if c.wide else ""
    return (
        f'<div class="card {c.tone}{wide}"><h3>{html.escape(c.title)}</h3>'
        f'<div class="big">{html.escape(c.headline)}</div>{lines}{rows}</div>'
    )


def render(title: str, subtitle: str, cards: list[Card], figures: list[Figure], footer: str) -> str:
    """The whole page as one string."""
    from plotly.offline import get_plotlyjs

    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>",
        f"<script>{_HEALTH_HEAD}</script>",
        f"<script>{get_plotlyjs()}</script></head><body>",
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header><main>",
        "<h2>Verdicts</h2><div class='verdicts'>",
        *(_card(c) for c in cards),
        "</div>",
    ]
    section = None
    for i, f in enumerate(figures):
        if f.section != section:
            section = f.section
            parts.append(f"<h2>{html.escape(section)}</h2>")
        div = f.figure.to_html(
            full_html=False, include_plotlyjs=False, div_id=f"fig{i}", config={"displaylogo": False, "responsive": True}
        )
        parts.append(f"<div class='figure'><div class='read'><b>Read:</b> {html.escape(f.read)}</div>{div}</div>")
    parts.append(f"<footer>{html.escape(footer)}</footer></main>")
    parts.append(f"<script>{_HEALTH_TAIL}</script></body></html>")
    return "".join(parts)
