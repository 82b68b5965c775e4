"""A tiny pure-Python PNG chart: line series over time, with axes and labels.

No plotting library: a ``Canvas`` is an RGB pixel buffer with lines, rectangles and a 3x5 bitmap
font, and ``Canvas.png()`` encodes it with ``zlib`` and ``struct`` (PNG colour type 2, 8 bits,
filter 0 on every row). ``render_chart`` stacks panels on one time axis; ``loadtest_panels``
composes the load-test figure from a report: throughput with the predicted rate, cumulative sent
messages against the predicted progress (both ending at the predicted finish), latency percentiles.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitoring.chart import BLACK, GRID, PNG_SIGNATURE, Canvas, Colour

__all__ = [
    "PNG_SIGNATURE",
    "Canvas",
    "Marker",
    "Panel",
    "Series",
    "loadtest_panels",
    "nice_ticks",
    "render_chart",
    "render_loadtest_chart",
]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        high = low + 1.0
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


def _label(value: float) -> str:
    if abs(value) >= 10_000:
        return f"{value / 1000:g}K"
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}"


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]
    colour: Colour


@dataclass(frozen=True, slots=True)
class Marker:
    """A vertical line at time ``x`` (e.g. the predicted finish), drawn dashed."""

    name: str
    x: float
    colour: Colour


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    series: Sequence[Series]
    #: A horizontal reference line (e.g. the rate limit), drawn dashed.
    reference: float | None = None
    reference_name: str = ""
    markers: Sequence[Marker] = ()


def _draw_panel(canvas: Canvas, panel: Panel, box: tuple[int, int, int, int], x_max: float) -> None:
    left, top, right, bottom = box
    values = [v for s in panel.series for _, v in s.points if math.isfinite(v)]
    if panel.reference is not None:
        values.append(panel.reference)
    y_ticks = nice_ticks(0.0, max(values, default=1.0) or 1.0)
    y_top = y_ticks[-1]
    x_ticks = nice_ticks(0.0, x_max or 1.0, 8)
    x_end = x_ticks[-1]

    def sx(x: float) -> int:
        return left + round((right - left) * x / x_end)

    def sy(y: float) -> int:
        return bottom - round((bottom - top) * y / y_top)

    canvas.text(left, top - 14, panel.title, scale=2)
    for tick in y_ticks:
        y = sy(tick)
        canvas.line(left, y, right, y, GRID)
        label = _label(tick)
        canvas.text(left - 6 - Canvas.text_width(label, 2), y - 5, label, scale=2)
    for tick in x_ticks:
        x = sx(tick)
        canvas.line(x, top, x, bottom, GRID)
        label = _label(tick)
        canvas.text(x - Canvas.text_width(label, 2) // 2, bottom + 6, label, scale=2)
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    if panel.reference is not None:
        y = sy(panel.reference)
        for x in range(left, right, 12):
            canvas.line(x, y, min(x + 6, right), y, (200, 0, 0), width=2)
    for marker in panel.markers:
        x = sx(marker.x)
        for y in range(top, bottom, 12):
            canvas.line(x, y, x, min(y + 6, bottom), marker.colour, width=2)
    for series in panel.series:
        points = [(sx(x), sy(y)) for x, y in series.points if math.isfinite(y)]
        if len(points) == 1:
            x, y = points[0]
            canvas.rect(x - 2, y - 2, x + 2, y + 2, series.colour)
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            canvas.line(x0, y0, x1, y1, series.colour, width=2)
    legend_x = right - 10
    names = [(s.name, s.colour) for s in panel.series]
    if panel.reference is not None:
        names.append((panel.reference_name, (200, 0, 0)))
    names.extend((marker.name, marker.colour) for marker in panel.markers)
    for i, (name, colour) in enumerate(names):
        width = Canvas.text_width(name, 2)
        y = top + 6 + 16 * i
        canvas.rect(legend_x - width - 22, y, legend_x - width - 10, y + 9, colour)
        canvas.text(legend_x - width, y, name, scale=2)


def render_chart(
    path: Path, panels: Sequence[Panel], *, title: str, x_label: str = "SECONDS", width: int = 1000
) -> Path:
    """Write the panels stacked vertically (shared time axis) as a PNG file at ``path``."""
    panel_h = 300
    height = 50 + len(panels) * (panel_h + 60) + 20
    canvas = Canvas(width, height)
    canvas.text(20, 12, title, scale=2)
    xs = [x for p in panels for s in p.series for x, _ in s.points]
    xs.extend(marker.x for p in panels for marker in p.markers)
    x_max = max(xs, default=1.0)
    top = 60
    for panel in panels:
        _draw_panel(canvas, panel, (100, top + 20, width - 30, top + panel_h), x_max)
        top += panel_h + 60
    canvas.text(width // 2 - Canvas.text_width(x_label, 2) // 2, height - 22, x_label, scale=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canvas.png())
    return path


#: Colours of the load-test figure.
BLUE: Colour = (31, 119, 180)
ORANGE: Colour = (255, 127, 14)
GREEN: Colour = (44, 160, 44)
RED: Colour = (214, 39, 40)
PURPLE: Colour = (148, 103, 189)


def loadtest_panels(report: Mapping[str, Any]) -> list[Panel]:
    """The load-test figure's panels, from a report of ``loadtest.runner`` (its JSON form).

    The prediction is drawn where the figures are: the predicted rate as a flat line over the
    predicted duration on the throughput panel, the predicted progress (0 to every accepted
    message at the predicted finish) beside the cumulative sent curve, and the predicted finish
    as a vertical line on both.
    """
    samples = report["samples"]
    prediction = report["prediction"]
    predicted_s = float(prediction["predicted_s"])
    predicted_rate = float(prediction.get("predicted_rate") or 0.0)
    accepted = float(report["accepted"])
    finish = [Marker("PREDICTED FINISH", predicted_s, PURPLE)] if predicted_s > 0 else []
    throughput = [
        Series("PIPELINE MSG/S", [(s["t"], s["rate"]) for s in samples], BLUE),
        Series("PROVIDER MSG/S", [(t, float(n)) for t, n in report["provider_per_second"] if t >= 0], ORANGE),
    ]
    if predicted_rate > 0 and predicted_s > 0:
        throughput.append(Series("PREDICTED MSG/S", [(0.0, predicted_rate), (predicted_s, predicted_rate)], GREEN))
    progress = [
        Series("SENT", [(0.0, 0.0)] + [(s["t"], float(s.get("sent", s["done"]))) for s in samples], BLUE),
    ]
    if predicted_s > 0:
        progress.append(Series("PREDICTED", [(0.0, 0.0), (predicted_s, accepted)], GREEN))
    nan = float("nan")
    latency = [
        Series(
            name.upper() + " MS",
            [(s["t"], s[name + "_ms"] if s[name + "_ms"] is not None else nan) for s in samples],
            c,
        )
        for name, c in (("p50", GREEN), ("p95", ORANGE), ("p99", RED))
    ]
    limit = report["provider"]["rate_limit"]
    return [
        Panel("THROUGHPUT (MSG/S)", throughput, reference=limit, reference_name="LIMIT", markers=finish),
        Panel("MESSAGES SENT (CUMULATIVE)", progress, reference=accepted, reference_name="ACCEPTED", markers=finish),
        Panel("SEND LATENCY (MS)", latency),
    ]


def render_loadtest_chart(report: Mapping[str, Any], path: Path) -> Path:
    """Write the load-test figure of ``report`` as a PNG file at ``path``."""
    title = (
        f"DISPATCH LOADTEST {report['channel']} {report['accepted']:,} MSGS {report['workers']} WORKERS "
        f"MEAN {report['throughput']['mean']:,.0f}/S PREDICTED {report['prediction']['predicted_s']:,.1f} S"
    )
    return render_chart(path, loadtest_panels(report), title=title)
