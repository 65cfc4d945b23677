"""Charts as inline SVG text: small pure functions, no library, nothing fetched.

A report is one HTML file that must print and open anywhere, years later, offline: its charts are
SVG elements in the page, drawn from the figures alone. Every chart has a <title> and a <desc>
naming each figure (screen readers, and a reader who copies the text), each mark a <title> of its
own (a tooltip), axis labels and a legend. Every text that reaches the SVG is escaped here: names
of departments, zones and hosts are data, and data is never markup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape
from typing import NamedTuple

Formatter = Callable[[float], str]

WIDTH = 680
FONT_SIZE = 11
AXIS_COLOR = "#6b7280"
GRID_COLOR = "#e5e7eb"


class Series(NamedTuple):
    label: str
    color: str  # a CSS colour
    values: Sequence[float]  # one per category
    dashed: bool = False  # line charts: a dashed line (peaks beside p95s)


class Limit(NamedTuple):
    """A horizontal line across a line chart: a link's capacity."""

    label: str
    value: float
    color: str = "#b91c1c"


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _number(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"


def _fmt(value: float) -> str:
    # Coordinates: two decimals are finer than any printer, and keep the file small.
    return f"{value:.2f}".rstrip("0").rstrip(".")


def nice_ticks(top: float, *, integer: bool = False, count: int = 4) -> list[float]:
    """Axis ticks from 0 to at least ``top``: steps of 1, 2, 2.5 or 5 times a power of ten."""
    if not top > 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    ticks = [0.0]
    while ticks[-1] < top:
        ticks.append(ticks[-1] + step)
    return ticks


def _open(chart_id: str, title: str, desc: str, width: float, height: float) -> list[str]:
    cid = _e(chart_id)
    return [
        f'<svg class="chart" viewBox="0 0 {_fmt(width)} {_fmt(height)}" width="{_fmt(width)}" '
        f'height="{_fmt(height)}" role="img" aria-labelledby="{cid}-title {cid}-desc" '
        f'font-size="{FONT_SIZE}">',
        f'<title id="{cid}-title">{_e(title)}</title>',
        f'<desc id="{cid}-desc">{_e(desc)}</desc>',
    ]


def _legend(series: Sequence[Series], x: float, y: float, extra: Sequence[tuple[str, str, bool]] = ()) -> str:
    """Swatches and labels in a row from (x, y); wraps are not needed for the few series we draw."""
    parts = ['<g class="legend">']
    for label, color, dashed in [*((s.label, s.color, s.dashed) for s in series), *extra]:
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        parts.append(
            f'<line x1="{_fmt(x)}" y1="{_fmt(y - 4)}" x2="{_fmt(x + 14)}" y2="{_fmt(y - 4)}" '
            f'stroke="{_e(color)}" stroke-width="6"{dash}/>'
        )
        parts.append(f'<text x="{_fmt(x + 18)}" y="{_fmt(y)}">{_e(label)}</text>')
        x += 26 + _text_width(label)
    parts.append("</g>")
    return "".join(parts)


def _text_width(text: str) -> float:
    """A rough width: CJK characters are about twice as wide as Latin ones."""
    return sum(FONT_SIZE if ord(ch) > 0x2E7F else FONT_SIZE * 0.6 for ch in text)


def _shorten(text: str, width: float) -> str:
    if _text_width(text) <= width:
        return text
    while text and _text_width(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _describe(categories: Sequence[str], series: Sequence[Series], fmt: Formatter) -> str:
    return "; ".join(
        f"{category}: " + ", ".join(f"{s.label} {fmt(s.values[i])}" for s in series)
        for i, category in enumerate(categories)
    )


def _y_axis(
    ticks: Sequence[float], left: float, right: float, top: float, bottom: float, fmt: Formatter, label: str
) -> list[str]:
    scale = (bottom - top) / ticks[-1]
    parts = []
    for tick in ticks:
        y = bottom - tick * scale
        parts.append(
            f'<line x1="{_fmt(left)}" y1="{_fmt(y)}" x2="{_fmt(right)}" y2="{_fmt(y)}" '
            f'stroke="{GRID_COLOR}"/>'
        )
        parts.append(
            f'<text x="{_fmt(left - 4)}" y="{_fmt(y + 4)}" text-anchor="end" fill="{AXIS_COLOR}">'
            f"{_e(fmt(tick))}</text>"
        )
    middle = (top + bottom) / 2
    parts.append(
        f'<text x="12" y="{_fmt(middle)}" transform="rotate(-90 12 {_fmt(middle)})" text-anchor="middle" '
        f'fill="{AXIS_COLOR}">{_e(label)}</text>'
    )
    parts.append(
        f'<line x1="{_fmt(left)}" y1="{_fmt(bottom)}" x2="{_fmt(right)}" y2="{_fmt(bottom)}" '
        f'stroke="{AXIS_COLOR}"/>'
    )
    return parts


def _x_labels(categories: Sequence[str], left: float, slot: float, y: float, x_label: str) -> list[str]:
    # At most about a dozen labels: a month of days would overlap.
    every = max(1, math.ceil(len(categories) / 12))
    parts = [
        f'<text x="{_fmt(left + slot * (i + 0.5))}" y="{_fmt(y)}" text-anchor="middle" fill="{AXIS_COLOR}">'
        f"{_e(category)}</text>"
        for i, category in enumerate(categories)
        if i % every == 0
    ]
    parts.append(
        f'<text x="{_fmt(left + slot * len(categories) / 2)}" y="{_fmt(y + 16)}" text-anchor="middle" '
        f'fill="{AXIS_COLOR}">{_e(x_label)}</text>'
    )
    return parts


def stacked_columns(
    *,
    chart_id: str,
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    fmt: Formatter = _number,
    integer: bool = True,
    height: float = 240,
) -> str:
    """Vertical bars, one per category (a day), each stacked from the series (severities, states)."""
    left, right, top = 56.0, WIDTH - 12.0, 30.0
    bottom = height - 40
    totals = [sum(s.values[i] for s in series) for i in range(len(categories))]
    ticks = nice_ticks(max(totals, default=0), integer=integer)
    scale = (bottom - top) / ticks[-1]
    slot = (right - left) / max(1, len(categories))
    bar = max(2.0, min(slot * 0.7, 40.0))
    parts = _open(chart_id, title, _describe(categories, series, fmt), WIDTH, height)
    parts.append(_legend(series, left, 14))
    parts += _y_axis(ticks, left, right, top, bottom, fmt, y_label)
    for i, category in enumerate(categories):
        x = left + slot * i + (slot - bar) / 2
        base = bottom
        for s in series:
            value = s.values[i]
            if value <= 0:
                continue
            h = value * scale
            base -= h
            parts.append(
                f'<rect x="{_fmt(x)}" y="{_fmt(base)}" width="{_fmt(bar)}" height="{_fmt(h)}" '
                f'fill="{_e(s.color)}"><title>{_e(f"{category}: {s.label} {fmt(value)}")}</title></rect>'
            )
    parts += _x_labels(categories, left, slot, bottom + 14, x_label)
    parts.append("</svg>")
    return "".join(parts)


def stacked_bars(
    *,
    chart_id: str,
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    x_label: str,
    notes: Sequence[str] = (),
    fmt: Formatter = _number,
) -> str:
    """Horizontal bars, one per category (a department, a county), stacked from the series (states);
    ``notes`` are written after each bar (its percentage migrated)."""
    label_width, note_width, row = 150.0, 64.0, 22.0
    left, right, top = label_width + 8, WIDTH - note_width, 30.0
    height = top + row * max(1, len(categories)) + 40
    bottom = height - 40
    totals = [sum(s.values[i] for s in series) for i in range(len(categories))]
    ticks = nice_ticks(max(totals, default=0), integer=True)
    scale = (right - left) / ticks[-1]
    parts = _open(chart_id, title, _describe(categories, series, fmt), WIDTH, height)
    parts.append(_legend(series, left, 14))
    for tick in ticks:
        x = left + tick * scale
        parts.append(
            f'<line x1="{_fmt(x)}" y1="{_fmt(top)}" x2="{_fmt(x)}" y2="{_fmt(bottom)}" '
            f'stroke="{GRID_COLOR}"/>'
        )
        parts.append(
            f'<text x="{_fmt(x)}" y="{_fmt(bottom + 14)}" text-anchor="middle" fill="{AXIS_COLOR}">'
            f"{_e(fmt(tick))}</text>"
        )
    parts.append(
        f'<text x="{_fmt((left + right) / 2)}" y="{_fmt(bottom + 30)}" text-anchor="middle" '
        f'fill="{AXIS_COLOR}">{_e(x_label)}</text>'
    )
    for i, category in enumerate(categories):
        y = top + row * i + 3
        parts.append(
            f'<text x="{_fmt(label_width)}" y="{_fmt(y + 12)}" text-anchor="end">'
            f"<title>{_e(category)}</title>{_e(_shorten(category, label_width))}</text>"
        )
        x = left
        for s in series:
            value = s.values[i]
            if value <= 0:
                continue
            w = value * scale
            parts.append(
                f'<rect x="{_fmt(x)}" y="{_fmt(y)}" width="{_fmt(w)}" height="{_fmt(row - 6)}" '
                f'fill="{_e(s.color)}"><title>{_e(f"{category}: {s.label} {fmt(value)}")}</title></rect>'
            )
            x += w
        if i < len(notes):
            parts.append(f'<text x="{_fmt(x + 4)}" y="{_fmt(y + 12)}">{_e(notes[i])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_chart(
    *,
    chart_id: str,
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    fmt: Formatter = _number,
    limit: Limit | None = None,
    height: float = 240,
) -> str:
    """Lines with a point per category (a day), and an optional limit line (the link's capacity)
    the scale always reaches, so the load reads against it."""
    left, right, top = 100.0, WIDTH - 12.0, 30.0  # room for tick labels like "750.0 Mbit/s"
    bottom = height - 40
    highest = max((v for s in series for v in s.values), default=0.0)
    if limit is not None:
        highest = max(highest, limit.value)
    ticks = nice_ticks(highest)
    scale = (bottom - top) / ticks[-1]
    slot = (right - left) / max(1, len(categories))
    described = _describe(categories, series, fmt)
    if limit is not None:
        described += f"; {limit.label} {fmt(limit.value)}"
    parts = _open(chart_id, title, described, WIDTH, height)
    extra = [(limit.label, limit.color, False)] if limit is not None else []
    parts.append(_legend(series, left, 14, extra))
    parts += _y_axis(ticks, left, right, top, bottom, fmt, y_label)
    if limit is not None:
        y = bottom - limit.value * scale
        parts.append(
            f'<line x1="{_fmt(left)}" y1="{_fmt(y)}" x2="{_fmt(right)}" y2="{_fmt(y)}" '
            f'stroke="{_e(limit.color)}" stroke-width="1.5"><title>{_e(f"{limit.label} {fmt(limit.value)}")}'
            "</title></line>"
        )
    for s in series:
        points = [(left + slot * (i + 0.5), bottom - value * scale) for i, value in enumerate(s.values)]
        dash = ' stroke-dasharray="4 3"' if s.dashed else ""
        if len(points) > 1:
            path = " ".join(f"{_fmt(x)},{_fmt(y)}" for x, y in points)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{_e(s.color)}" stroke-width="2"{dash}/>'
            )
        for (x, y), category, value in zip(points, categories, s.values, strict=True):
            parts.append(
                f'<circle cx="{_fmt(x)}" cy="{_fmt(y)}" r="3" fill="{_e(s.color)}">'
                f"<title>{_e(f'{category}: {s.label} {fmt(value)}')}</title></circle>"
            )
    parts += _x_labels(categories, left, slot, bottom + 14, x_label)
    parts.append("</svg>")
    return "".join(parts)
