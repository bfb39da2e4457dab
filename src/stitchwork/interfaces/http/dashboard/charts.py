"""Charts drawn on the server as inline SVG: no script, no inline style (the page's CSP forbids both), every
label escaped. Colours come from CSS classes (``bar``, ``bar-0`` … ``bar-5``, ``axis``, ``label``)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from markupsafe import Markup, escape

__all__ = ["bars", "stacked_bars", "time_bars"]

_WIDTH = 640
_ROW = 22
_LABEL = 190


def _number(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1_000:.0f}k"
    if value != int(value):
        return f"{value:.4g}"
    return f"{int(value):,}"


def _clean(value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) and number > 0 else 0.0


def _short(label: str, limit: int = 28) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _svg(height: int, title: str, body: list[str]) -> Markup:
    head = (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_WIDTH} {height}" '
            f'width="{_WIDTH}" height="{height}" role="img" aria-label="{escape(title)}">'
            f"<title>{escape(title)}</title>")
    return Markup(head + "".join(body) + "</svg>")  # every piece is escaped above, or numeric


def bars(items: Sequence[tuple[str, float]], *, title: str, unit: str = "") -> Markup:
    """Horizontal bars, one per (label, value), largest first as given."""
    return stacked_bars([(label, [value]) for label, value in items], title=title, unit=unit, series=())


def stacked_bars(items: Sequence[tuple[str, Sequence[float]]], *, title: str, series: Sequence[str],
                 unit: str = "", limit: int = 20, colors: Sequence[int] = ()) -> Markup:
    """Horizontal bars split into segments, one per ``series`` name (coloured ``bar-<colors[i]>``, default
    ``bar-<i>``), with a legend; at most ``limit`` bars."""
    rows = [(str(label), [_clean(v) for v in values]) for label, values in items][:limit]
    if not rows:
        return _svg(30, title, ['<text class="label" x="4" y="20">no data yet</text>'])
    shade = [colors[i] if i < len(colors) else i for i in range(max(len(series), 1))]
    top = max(sum(values) for _, values in rows) or 1.0
    span = _WIDTH - _LABEL - 70
    body = []
    x, y = float(_LABEL), 4
    for i, name in enumerate(series if len(series) > 1 else ()):
        shown = _short(name, 20)
        width = 16 + 6.5 * len(shown) + 14
        if x + width > _WIDTH and x > _LABEL:
            x, y = float(_LABEL), y + 18
        body.append(f'<rect class="bar-{shade[i] % 6}" x="{x:.1f}" y="{y}" width="12" height="12"/>'
                    f'<text class="label" x="{x + 16:.1f}" y="{y + 11}">{escape(shown)}</text>')
        x += width
    legend = y + 18 if len(series) > 1 else 0
    for row, (label, values) in enumerate(rows):
        y = legend + row * _ROW
        body.append(f'<text class="label" x="{_LABEL - 6}" y="{y + 15}" text-anchor="end">'
                    f'<title>{escape(label)}</title>{escape(_short(label))}</text>')
        x = float(_LABEL)
        for i, value in enumerate(values):
            width = span * value / top
            if width > 0:
                body.append(f'<rect class="bar-{shade[i % len(shade)] % 6}" x="{x:.1f}" y="{y + 3}" '
                            f'width="{max(width, 1):.1f}" height="{_ROW - 6}"><title>{escape(label)}: '
                            f"{escape(_number(value))}{escape(unit)}</title></rect>")
            x += width
        body.append(f'<text class="value" x="{x + 4:.1f}" y="{y + 15}">{escape(_number(sum(values)))}'
                    f"{escape(unit)}</text>")
    return _svg(legend + len(rows) * _ROW + 4, title, body)


def time_bars(points: Sequence[tuple[float, float]], *, title: str, unit: str = "") -> Markup:
    """Vertical bars over time (``(bucket start, value)``), with the first and last bucket's time below."""
    if not points:
        return _svg(30, title, ['<text class="label" x="4" y="20">no data yet</text>'])
    values = [_clean(v) for _, v in points]
    top = max(values) or 1.0
    height, base = 160, 130
    step = (_WIDTH - 60) / len(points)
    body = [f'<line class="axis" x1="50" y1="{base}" x2="{_WIDTH - 6}" y2="{base}"/>',
            f'<text class="label" x="44" y="14" text-anchor="end">{escape(_number(top))}</text>',
            f'<text class="label" x="44" y="{base}" text-anchor="end">0</text>']
    for i, ((ts, _), value) in enumerate(zip(points, values, strict=True)):
        bar = (base - 10) * value / top
        stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))
        body.append(f'<rect class="bar-1" x="{50 + i * step + 1:.1f}" y="{base - bar:.1f}" '
                    f'width="{max(step - 2, 1):.1f}" height="{bar:.1f}"><title>{escape(stamp)} UTC: '
                    f"{escape(_number(value))}{escape(unit)}</title></rect>")
    first = time.strftime("%m-%d %H:%M", time.gmtime(points[0][0]))
    last = time.strftime("%m-%d %H:%M", time.gmtime(points[-1][0]))
    body.append(f'<text class="label" x="50" y="{base + 18}">{escape(first)} UTC</text>')
    body.append(f'<text class="label" x="{_WIDTH - 6}" y="{base + 18}" text-anchor="end">{escape(last)} UTC</text>')
    return _svg(height, title, body)
