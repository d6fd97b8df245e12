"""Small, dependency-free SVG charts for reports: lines, grouped bars and scatter plots.

Reports are opened offline, so every chart is a self-contained ``<svg>`` string (no scripts,
no external fonts or stylesheets) that can be inlined into HTML or saved as an ``.svg`` file.
Each chart has a title, axes with "nice" ticks, axis labels and a legend; every data point
carries a ``<title>`` child, which browsers show as a tooltip. All text is XML-escaped, since
labels can come from prompt categories or model names.

Colours are the Okabe-Ito palette, which stays distinguishable for colour-blind readers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import TypeGuard

# Okabe & Ito (2008): distinguishable under the common forms of colour blindness.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#999999")
BASELINE_COLOR = "#8C96A3"  # the unedited model: a quiet grey-blue
EDITED_COLOR = "#D55E00"  # the edited model: the palette's vermillion

WIDTH, HEIGHT = 640, 320
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif"
_CHAR_W = 0.58  # average glyph width in em, to estimate text widths without a font engine


@dataclass(frozen=True)
class Series:
    """A named sequence of ``(x, y)`` points; non-finite values are skipped.

    Attributes:
        name: Legend entry.
        points: The data; for line charts, consecutive points are joined in x order.
        color: CSS colour (default: the next palette colour).
        tooltips: One hover text per point (default: the point's coordinates).
    """

    name: str
    points: Sequence[tuple[float, float]]
    color: str | None = None
    tooltips: Sequence[str] | None = None


@dataclass(frozen=True)
class BarSeries:
    """One bar per category; None leaves a gap (the value was not measured)."""

    name: str
    values: Sequence[float | None]
    color: str | None = None


@dataclass(frozen=True)
class Highlight:
    """A point to mark with a ring and a label (e.g. the chosen candidate)."""

    x: float
    y: float
    label: str


@dataclass(frozen=True)
class RefLine:
    """A dashed horizontal reference line at ``y`` (e.g. a threshold or a baseline value)."""

    y: float
    label: str


def _finite(v: float | None) -> TypeGuard[float]:
    return v is not None and math.isfinite(v)


def _text_width(text: str, size: float) -> float:
    return len(text) * size * _CHAR_W


def nice_step(span: float, target_ticks: int = 5) -> float:
    """A step of 1, 2 or 5 times a power of ten giving about ``target_ticks`` intervals."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target_ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * magnitude:
            return m * magnitude
    return 10 * magnitude  # pragma: no cover - the loop always returns


def nice_ticks(lo: float, hi: float, target_ticks: int = 5) -> list[float]:
    """Ticks at multiples of :func:`nice_step` covering ``[lo, hi]`` (extended outwards)."""
    if hi < lo:
        raise ValueError(f"empty interval [{lo}, {hi}]")
    if hi == lo:
        # A constant series still needs an axis: pad by a unit of its own magnitude.
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, target_ticks)
    start, stop = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    # Round away binary noise (0.30000000000000004) so labels and equality checks are clean.
    return [round(i * step, 12) for i in range(start, stop + 1)]


def format_tick(value: float, step: float) -> str:
    """A tick label with just enough decimals to tell neighbouring ticks apart."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-4:
        return f"{value:.0e}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


class _Axis:
    """Maps a numeric domain onto a pixel range, linearly or logarithmically."""

    def __init__(self, values: Sequence[float], pixels: tuple[float, float], log: bool) -> None:
        self.log = log
        self.pixels = pixels
        if log:
            positive = [v for v in values if v > 0]
            if not positive:
                raise ValueError("a logarithmic axis needs positive values")
            lo_exp = math.floor(math.log10(min(positive)))
            hi_exp = math.ceil(math.log10(max(positive)))
            hi_exp = max(hi_exp, lo_exp + 1)
            self.ticks = [10.0**e for e in range(lo_exp, hi_exp + 1)]
            self.lo, self.hi = math.log10(self.ticks[0]), math.log10(self.ticks[-1])
            self.labels = [f"{t:g}" for t in self.ticks]
        else:
            self.ticks = nice_ticks(min(values), max(values))
            self.lo, self.hi = self.ticks[0], self.ticks[-1]
            step = self.ticks[1] - self.ticks[0]
            self.labels = [format_tick(t, step) for t in self.ticks]

    def accepts(self, v: float | None) -> bool:
        """Whether ``v`` can be drawn (finite, and positive on a log axis)."""
        return _finite(v) and (not self.log or v > 0)

    def __call__(self, v: float) -> float:
        t = math.log10(v) if self.log else v
        a, b = self.pixels
        return a + (t - self.lo) / (self.hi - self.lo) * (b - a)


class _Canvas:
    """An SVG document under construction, with the chart frame's layout."""

    def __init__(self, title: str, width: int, height: int) -> None:
        self.title, self.width, self.height = title, width, height
        self.parts: list[str] = []

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(
        self,
        x: float,
        y: float,
        content: str,
        *,
        size: float = 12,
        anchor: str = "start",
        weight: str = "normal",
        color: str = "#333",
        rotate: float = 0.0,
        halo: bool = False,
    ) -> None:
        transform = f' transform="rotate({rotate:g} {x:.1f} {y:.1f})"' if rotate else ""
        # A white outline under the glyphs keeps labels readable where they cross data lines.
        outline = ' stroke="#fff" stroke-width="3" paint-order="stroke"' if halo else ""
        self.add(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size:g}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{color}"{outline}{transform}>{escape(content)}</text>'
        )

    def legend(self, entries: Sequence[tuple[str, str, str]], y: float) -> None:
        """Right-aligned legend row; entries are ``(label, colour, shape)``."""
        x = self.width - 12.0
        for label, color, shape in reversed(entries):
            x -= _text_width(label, 11)
            self.text(x, y + 4, label, size=11)
            x -= 16
            if shape == "line":
                self.add(
                    f'<line x1="{x - 4:.1f}" y1="{y:.1f}" x2="{x + 10:.1f}" y2="{y:.1f}" '
                    f'stroke="{color}" stroke-width="2.5"/>'
                )
            elif shape == "dot":
                self.add(f'<circle cx="{x + 3:.1f}" cy="{y:.1f}" r="4.5" fill="{color}"/>')
            else:
                self.add(
                    f'<rect x="{x - 2:.1f}" y="{y - 5:.1f}" width="10" height="10" rx="2" '
                    f'fill="{color}"/>'
                )
            x -= 18

    def render(self) -> str:
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
            f'viewBox="0 0 {self.width} {self.height}" width="{self.width}" '
            f'height="{self.height}" font-family="{escape(FONT)}" '
            f'aria-label="{escape(self.title)}">'
            f"<title>{escape(self.title)}</title>"
            f'<rect width="{self.width}" height="{self.height}" fill="#fff"/>'
        )
        return head + "".join(self.parts) + "</svg>"


def _frame(
    canvas: _Canvas,
    x_label: str,
    y_label: str,
    y_axis: _Axis,
    plot: tuple[float, float, float, float],
    y_format: Callable[[float], str] | None = None,
) -> None:
    """Title, horizontal grid lines with y tick labels, and both axis labels."""
    left, top, right, bottom = plot
    canvas.text(12, 22, canvas.title, size=15, weight="600", color="#111")
    for tick, label in zip(y_axis.ticks, y_axis.labels, strict=True):
        y = y_axis(tick)
        canvas.add(
            f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{right:.1f}" y2="{y:.1f}" stroke="#e3e6ea"/>'
        )
        shown = y_format(tick) if y_format else label
        canvas.text(left - 6, y + 4, shown, size=11, anchor="end", color="#555")
    canvas.add(
        f'<line x1="{left:.1f}" y1="{bottom:.1f}" x2="{right:.1f}" y2="{bottom:.1f}" '
        'stroke="#666"/>'
    )
    mid_y = (top + bottom) / 2
    canvas.text(16, mid_y, y_label, size=12, anchor="middle", color="#444", rotate=-90)
    canvas.text(
        (left + right) / 2, canvas.height - 10, x_label, size=12, anchor="middle", color="#444"
    )


def _x_ticks(canvas: _Canvas, x_axis: _Axis, bottom: float) -> None:
    for tick, label in zip(x_axis.ticks, x_axis.labels, strict=True):
        x = x_axis(tick)
        canvas.add(
            f'<line x1="{x:.1f}" y1="{bottom:.1f}" x2="{x:.1f}" y2="{bottom + 4:.1f}" '
            'stroke="#666"/>'
        )
        canvas.text(x, bottom + 17, label, size=11, anchor="middle", color="#555")


def _colors(n: int, given: Sequence[str | None]) -> list[str]:
    return [c or PALETTE[i % len(PALETTE)] for i, c in zip(range(n), given, strict=True)]


def _ref_lines(
    canvas: _Canvas, lines: Sequence[RefLine], y_axis: _Axis, left: float, right: float
) -> None:
    for ref in lines:
        if not y_axis.accepts(ref.y):
            continue
        y = y_axis(ref.y)
        canvas.add(
            f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{right:.1f}" '
            f'y2="{y:.1f}" stroke="#444" stroke-dasharray="5 4" stroke-width="1.2"/>'
        )
        canvas.text(right - 4, y - 5, ref.label, size=10.5, anchor="end", color="#333", halo=True)


def _highlights(canvas: _Canvas, marks: Sequence[Highlight], x_axis: _Axis, y_axis: _Axis) -> None:
    for mark in marks:
        if not (x_axis.accepts(mark.x) and y_axis.accepts(mark.y)):
            continue
        x, y = x_axis(mark.x), y_axis(mark.y)
        canvas.add(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="8" fill="none" stroke="#111" '
            f'stroke-width="2"><title>{escape(mark.label)}</title></circle>'
        )
        # Put the label on whichever side of the ring has room.
        right_side = x + 12 + _text_width(mark.label, 11) < canvas.width - 8
        canvas.text(
            x + 12 if right_side else x - 12,
            y - 10,
            mark.label,
            size=11,
            anchor="start" if right_side else "end",
            weight="600",
            color="#111",
            halo=True,
        )


def _layout(
    width: int, height: int, bottom_extra: float = 0.0
) -> tuple[float, float, float, float]:
    # Room for the title and legend above, tick labels and the axis label below.
    return (64.0, 62.0, width - 20.0, height - 44.0 - bottom_extra)


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    highlights: Sequence[Highlight] = (),
    ref_lines: Sequence[RefLine] = (),
    log_y: bool = False,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """Lines with point markers, one per series, joined in x order.

    Raises:
        ValueError: no series has a drawable point.
    """
    return _xy_chart(
        series,
        title=title,
        x_label=x_label,
        y_label=y_label,
        highlights=highlights,
        ref_lines=ref_lines,
        log_x=False,
        log_y=log_y,
        joined=[True] * len(series),
        width=width,
        height=height,
    )


def scatter_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    joined: Sequence[bool] | None = None,
    highlights: Sequence[Highlight] = (),
    ref_lines: Sequence[RefLine] = (),
    log_x: bool = False,
    log_y: bool = False,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """Points per series; ``joined[i]`` also draws series ``i`` as a line (e.g. a front).

    Raises:
        ValueError: no series has a drawable point.
    """
    return _xy_chart(
        series,
        title=title,
        x_label=x_label,
        y_label=y_label,
        highlights=highlights,
        ref_lines=ref_lines,
        log_x=log_x,
        log_y=log_y,
        joined=joined or [False] * len(series),
        width=width,
        height=height,
    )


def _xy_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    highlights: Sequence[Highlight],
    ref_lines: Sequence[RefLine],
    log_x: bool,
    log_y: bool,
    joined: Sequence[bool],
    width: int,
    height: int,
) -> str:
    left, top, right, bottom = _layout(width, height)

    def usable(p: tuple[float, float]) -> bool:
        return (
            _finite(p[0]) and _finite(p[1]) and (not log_x or p[0] > 0) and (not log_y or p[1] > 0)
        )

    xs = [p[0] for s in series for p in s.points if usable(p)]
    ys = [p[1] for s in series for p in s.points if usable(p)]
    if not xs:
        raise ValueError(f"chart '{title}' has no finite data points to draw")
    ys += [r.y for r in ref_lines if _finite(r.y) and (not log_y or r.y > 0)]
    x_axis = _Axis(xs, (left, right), log_x)
    y_axis = _Axis(ys, (bottom, top), log_y)
    canvas = _Canvas(title, width, height)
    _frame(canvas, x_label, y_label, y_axis, (left, top, right, bottom))
    _x_ticks(canvas, x_axis, bottom)
    _ref_lines(canvas, ref_lines, y_axis, left, right)
    colors = _colors(len(series), [s.color for s in series])
    for s, color, join in zip(series, colors, joined, strict=True):
        tips = list(s.tooltips) if s.tooltips is not None else [None] * len(s.points)
        pts = [(p, t) for p, t in zip(s.points, tips, strict=True) if usable(p)]
        pts.sort(key=lambda pt: pt[0][0])
        if join and len(pts) > 1:
            path = " ".join(f"{x_axis(p[0]):.1f},{y_axis(p[1]):.1f}" for p, _ in pts)
            canvas.add(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" '
                'stroke-linejoin="round"/>'
            )
        radius = 3.2 if join else 4.5
        opacity = "1" if join else "0.75"
        for (x, y), tip in pts:
            label = tip if tip is not None else f"{s.name}: ({x:g}, {y:g})"
            canvas.add(
                f'<circle cx="{x_axis(x):.1f}" cy="{y_axis(y):.1f}" r="{radius}" fill="{color}" '
                f'fill-opacity="{opacity}" stroke="#fff" stroke-width="0.8">'
                f"<title>{escape(label)}</title></circle>"
            )
    _highlights(canvas, highlights, x_axis, y_axis)
    entries = [
        (s.name, c, "line" if j else "dot") for s, c, j in zip(series, colors, joined, strict=True)
    ]
    canvas.legend(entries, 38)
    return canvas.render()


def bar_chart(
    categories: Sequence[str],
    series: Sequence[BarSeries],
    *,
    title: str,
    y_label: str,
    x_label: str = "",
    y_max: float | None = None,
    value_format: Callable[[float], str] = lambda v: f"{v:.3g}",
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """Grouped bars: one group per category, one bar per series, each labelled with its value.

    Args:
        y_max: Fix the top of the axis (e.g. 1.0 for rates); default: from the data.
        value_format: Formats bar labels and y ticks (e.g. as percentages).

    Raises:
        ValueError: no categories, a series of the wrong length, or no value to draw.
    """
    if not categories:
        raise ValueError(f"chart '{title}' has no categories")
    for s in series:
        if len(s.values) != len(categories):
            raise ValueError(
                f"series '{s.name}' has {len(s.values)} values for {len(categories)} categories"
            )
    values = [v for s in series for v in s.values if _finite(v)]
    if not values:
        raise ValueError(f"chart '{title}' has no finite values to draw")
    # Long category names are drawn slanted, which needs more room below the axis.
    longest = max(_text_width(c, 11) for c in categories)
    band_guess = (width - 84) / len(categories)
    slanted = longest > band_guess - 6
    extra = min(70.0, longest * 0.6) if slanted else 0.0
    left, top, right, bottom = _layout(width, height, extra)
    lo = min(0.0, *values)
    hi = max(values) if y_max is None else max(y_max, *values)
    y_axis = _Axis([lo, hi], (bottom, top), log=False)
    canvas = _Canvas(title, width, height)
    _frame(canvas, x_label, y_label, y_axis, (left, top, right, bottom), value_format)
    band = (right - left) / len(categories)
    # Bars fill most of their band, but stay slim when there are only a few of them.
    inner = min(band * 0.78, 64.0 * len(series))
    bar_w = inner / max(1, len(series))
    colors = _colors(len(series), [s.color for s in series])
    zero = y_axis(0.0)
    for i, cat in enumerate(categories):
        x0 = left + i * band + (band - inner) / 2
        for j, (s, color) in enumerate(zip(series, colors, strict=True)):
            v = s.values[i]
            if not _finite(v):
                continue
            y = y_axis(v)
            x = x0 + j * bar_w
            canvas.add(
                f'<rect x="{x + 1:.1f}" y="{min(y, zero):.1f}" width="{max(bar_w - 2, 1):.1f}" '
                f'height="{max(abs(zero - y), 0.8):.1f}" fill="{color}" rx="1.5">'
                f"<title>{escape(f'{cat} · {s.name}: {value_format(v)}')}</title></rect>"
            )
            if bar_w >= 22:
                canvas.text(
                    x + bar_w / 2,
                    min(y, zero) - 4,
                    value_format(v),
                    size=10,
                    anchor="middle",
                    color="#333",
                )
        cx = left + (i + 0.5) * band
        if slanted:
            canvas.text(cx + 4, bottom + 14, cat, size=11, anchor="end", color="#333", rotate=-35)
        else:
            canvas.text(cx, bottom + 17, cat, size=11, anchor="middle", color="#333")
    canvas.legend([(s.name, c, "box") for s, c in zip(series, colors, strict=True)], 38)
    return canvas.render()
