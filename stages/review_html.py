"""The review report's building blocks and their rendering: one self-contained HTML page and Markdown.

stages/review.py builds a list of Sections from the pipeline's files and MLflow; this module turns
them into text. The page has no script and loads nothing: CSS inline, charts as inline SVG, and a
Content-Security-Policy that forbids every fetch and script, so it reads the same offline, from an
MLflow artifact view or a mail attachment. Every piece of text from the data goes through
html.escape (HTML) or md_text (Markdown), so a row holding <script> is shown, never run.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


@dataclass
class Text:
    text: str


@dataclass
class Code:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list]
    caption: str = ""


@dataclass
class Chart:
    """kind line: series {name: [(x, y)]}; kind bars: categories on x, series {name: [count per category]}."""
    kind: str
    title: str
    x_label: str
    y_label: str
    series: dict
    categories: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    blocks: list


def cell(value) -> str:
    """A table cell as text: whole floats as integers, others to 6 significant digits, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.6g}"
    return str(value)


# ---------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}
caption{text-align:left;font-weight:600;padding:.3em 0}
th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}
pre{background:#f6f8fa;border:1px solid #ddd;padding:.8em;overflow-x:auto}
figure{margin:.6em 0 1.2em}figcaption{font-weight:600}
nav a{margin-right:1em}
.answers td{max-width:22em;white-space:pre-wrap;word-break:break-word}
"""
# No script, no fetch: the page cannot load or run anything even if some text escaped escaping.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def html_table(table: Table) -> str:
    cls = ' class="answers"' if any(len(str(c)) > 80 for row in table.rows for c in row) else ""
    out = [f"<table{cls}>"]
    if table.caption:
        out.append(f"<caption>{html.escape(table.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.headers) + "</tr></thead><tbody>")
    for row in table.rows:
        out.append("<tr>" + "".join(f'<td class="num">{html.escape(cell(c))}</td>' if is_number(c)
                                    else f"<td>{html.escape(cell(c))}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def svg_chart(chart: Chart, width: int = 680, height: int = 300) -> str:
    left, right, top, bottom = 60, 150, 20, 45
    plot_w, plot_h = width - left - right, height - top - bottom
    if chart.kind == "line":
        xs = [x for points in chart.series.values() for x, _ in points]
        ys = [y for points in chart.series.values() for _, y in points]
        x_low, x_high = min(xs), max(xs)
        y_low, y_high = min(0.0, min(ys)), max(ys)
    else:
        x_low, x_high = 0, max(len(chart.categories), 1)
        y_low, y_high = 0.0, max([v for values in chart.series.values() for v in values] + [1])
    x_high = x_high if x_high > x_low else x_low + 1
    y_high = y_high if y_high > y_low else y_low + 1

    def sx(x):
        return left + (x - x_low) / (x_high - x_low) * plot_w

    def sy(y):
        return top + plot_h - (y - y_low) / (y_high - y_low) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'viewBox="0 0 {width} {height}" font-size="11" font-family="sans-serif">',
           f"<title>{html.escape(chart.title)}</title>",
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#999"/>']
    for y in ticks(y_low, y_high):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 5}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    if chart.kind == "line":
        for x in ticks(x_low, x_high):
            out.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 15}" text-anchor="middle">{x:g}</text>')
        for i, (name, points) in enumerate(chart.series.items()):
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
            out.append(f'<polyline fill="none" stroke="{COLORS[i % len(COLORS)]}" stroke-width="1.5" points="{path}"/>')
    else:
        n_series, slot = len(chart.series), plot_w / max(len(chart.categories), 1)
        bar = slot * 0.8 / max(n_series, 1)
        for c, label in enumerate(chart.categories):
            out.append(f'<text x="{left + (c + 0.5) * slot:.1f}" y="{top + plot_h + 15}" text-anchor="middle">'
                       f"{html.escape(label)}</text>")
            for i, values in enumerate(chart.series.values()):
                x, y = left + c * slot + slot * 0.1 + i * bar, sy(values[c])
                out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{top + plot_h - y:.1f}" '
                           f'fill="{COLORS[i % len(COLORS)]}"><title>{html.escape(label)}: {values[c]}</title></rect>')
    for i, name in enumerate(chart.series):
        y = top + 12 + i * 16
        out.append(f'<rect x="{left + plot_w + 10}" y="{y - 9}" width="10" height="10" fill="{COLORS[i % len(COLORS)]}"/>'
                   f'<text x="{left + plot_w + 24}" y="{y}">{html.escape(name)}</text>')
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle">{html.escape(chart.x_label)}</text>'
               f'<text transform="translate(14 {top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f"{html.escape(chart.y_label)}</text></svg>")
    return "\n".join(out)


def html_block(block) -> str:
    if isinstance(block, Text):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Code):
        return f"<pre><code>{html.escape(block.text)}</code></pre>"
    if isinstance(block, Table):
        return html_table(block)
    if isinstance(block, Chart):
        return f"<figure><figcaption>{html.escape(block.title)}</figcaption>\n{svg_chart(block)}</figure>"
    raise TypeError(f"unknown block {type(block).__name__}")


def anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower())


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections)
    body = [f'<section id="{anchor(s.title)}"><h2>{html.escape(s.title)}</h2>\n'
            + "\n".join(html_block(b) for b in s.blocks) + "</section>" for s in sections]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<link rel="icon" href="data:,">\n<title>{html.escape(title)}</title>\n<style>{CSS}</style></head>\n'
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>{nav}</nav>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------- Markdown

def md_text(text: str) -> str:
    """Text safe in Markdown: HTML characters as entities (Markdown passes raw HTML through), pipes and
    backticks escaped, newlines as spaces so a table row stays one line."""
    text = html.escape(str(text), quote=False).replace("|", "\\|").replace("`", "\\`")
    return " ".join(text.split("\n")).replace("\r", " ")


def md_table(table: Table) -> str:
    out = [f"**{md_text(table.caption)}**\n"] if table.caption else []
    out.append("| " + " | ".join(md_text(h) for h in table.headers) + " |")
    out.append("|" + "|".join("---:" if table.rows and is_number(table.rows[0][i]) else "---"
                              for i in range(len(table.headers))) + "|")
    out += ["| " + " | ".join(md_text(cell(c)) for c in row) + " |" for row in table.rows]
    return "\n".join(out)


def chart_as_table(chart: Chart, max_points: int = 12) -> Table:
    """Markdown has no charts: the chart's numbers, a line thinned to about max_points points."""
    if chart.kind == "bars":
        return Table([chart.x_label, *chart.series], [[c, *(v[i] for v in chart.series.values())]
                                                      for i, c in enumerate(chart.categories)], chart.title)
    rows = []
    for name, points in chart.series.items():
        every = max(1, math.ceil(len(points) / max_points))
        kept = points[::every] + ([points[-1]] if (len(points) - 1) % every else [])
        rows += [[name, x, y] for x, y in kept]
    return Table(["series", chart.x_label, chart.y_label], rows, chart.title)


def md_block(block) -> str:
    if isinstance(block, Text):
        return md_text(block.text)
    if isinstance(block, Code):
        return f"```\n{block.text}\n```"
    if isinstance(block, Table):
        return md_table(block)
    if isinstance(block, Chart):
        return md_table(chart_as_table(block))
    raise TypeError(f"unknown block {type(block).__name__}")


def render_markdown(title: str, subtitle: str, sections: list[Section]) -> str:
    parts = [f"# {md_text(title)}", md_text(subtitle)]
    for s in sections:
        parts.append(f"## {md_text(s.title)}")
        parts += [md_block(b) for b in s.blocks]
    return "\n\n".join(parts) + "\n"
