"""SVG charts: tick arithmetic, coordinate mapping, escaping and well-formed output."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from abliterate.report import plots

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize(
    ("lo", "hi", "ticks"),
    [
        (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0.013, 0.087, [0.0, 0.02, 0.04, 0.06, 0.08, 0.1]),
        (-2.3, 3.1, [-4.0, -2.0, 0.0, 2.0, 4.0]),
        (0.0, 18.0, [0.0, 5.0, 10.0, 15.0, 20.0]),
    ],
)
def test_nice_ticks_golden(lo: float, hi: float, ticks: list[float]) -> None:
    assert plots.nice_ticks(lo, hi) == ticks


def test_nice_ticks_of_a_constant_cover_it() -> None:
    ticks = plots.nice_ticks(5.0, 5.0)
    assert ticks[0] < 5.0 < ticks[-1]
    with pytest.raises(ValueError, match="empty interval"):
        plots.nice_ticks(1.0, 0.0)


def test_format_tick_uses_the_step_precision() -> None:
    assert [plots.format_tick(t, 0.02) for t in (0.0, 0.02, 0.1)] == ["0", "0.02", "0.10"]
    assert plots.format_tick(15.0, 5.0) == "15"
    assert plots.format_tick(2e-5, 1e-5) == "2e-05"


def _circles(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)  # also proves the document is well-formed XML
    return [c for c in root.iter(f"{SVG}circle") if c.find(f"{SVG}title") is not None]


def test_line_chart_maps_points_and_skips_missing_values() -> None:
    svg = plots.line_chart(
        [
            plots.Series("pre", [(0, 1.0), (1, 3.0), (2, math.nan), (3, 2.0)]),
            plots.Series("post", [(0, 0.5), (1, 0.5)]),
        ],
        title="Refusal <score> & KL",
        x_label="layer",
        y_label="score",
    )
    root = ET.fromstring(svg)
    assert root.find(f"{SVG}title").text == "Refusal <score> & KL"  # type: ignore[union-attr]
    assert len(root.findall(f"{SVG}polyline")) == 2
    circles = _circles(svg)
    assert len(circles) == 5  # the NaN point is skipped
    by_tip = {c.find(f"{SVG}title").text: c for c in circles}  # type: ignore[union-attr]
    p0, p1, p3 = (by_tip[f"pre: ({x}, {y})"] for x, y in ((0, 1), (1, 3), (3, 2)))
    # x grows to the right, y grows upwards (smaller pixel row).
    assert float(p0.get("cx")) < float(p1.get("cx")) < float(p3.get("cx"))  # type: ignore[arg-type]
    assert float(p1.get("cy")) < float(p3.get("cy")) < float(p0.get("cy"))  # type: ignore[arg-type]


def test_log_axis_uses_powers_of_ten_and_drops_non_positive_values() -> None:
    svg = plots.line_chart(
        [plots.Series("kl", [(0, 0.002), (1, 0.05), (2, 0.0), (3, 0.6)])],
        title="KL",
        x_label="layer",
        y_label="KL",
        log_y=True,
    )
    labels = {t.text for t in ET.fromstring(svg).iter(f"{SVG}text")}
    assert {"0.001", "0.01", "0.1", "1"} <= labels
    assert len(_circles(svg)) == 3


def test_highlight_and_reference_line_are_drawn() -> None:
    svg = plots.line_chart(
        [plots.Series("pre", [(0, 1.0), (1, -1.0)])],
        title="t",
        x_label="x",
        y_label="y",
        highlights=[plots.Highlight(1, -1.0, "chosen: 1/pre")],
        ref_lines=[plots.RefLine(2.0, "unedited model")],
    )
    texts = [t.text for t in ET.fromstring(svg).iter(f"{SVG}text")]
    assert "chosen: 1/pre" in texts and "unedited model" in texts
    assert 'stroke-dasharray="5 4"' in svg


def test_bar_heights_are_proportional_to_values() -> None:
    svg = plots.bar_chart(
        ["refusal rate", "over-refusal"],
        [plots.BarSeries("baseline", [1.0, 0.5]), plots.BarSeries("edited", [0.25, None])],
        title="Rates",
        y_label="fraction",
        y_max=1.0,
    )
    root = ET.fromstring(svg)
    bars = {
        r.find(f"{SVG}title").text: float(r.get("height"))  # type: ignore[union-attr, arg-type]
        for r in root.iter(f"{SVG}rect")
        if r.find(f"{SVG}title") is not None
    }
    assert len(bars) == 3  # the missing value leaves a gap, not a zero bar
    full = bars["refusal rate · baseline: 1"]
    assert bars["over-refusal · baseline: 0.5"] == pytest.approx(full / 2, abs=0.2)
    assert bars["refusal rate · edited: 0.25"] == pytest.approx(full / 4, abs=0.2)


def test_bar_chart_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2 values for 1 categories"):
        plots.bar_chart(["a"], [plots.BarSeries("s", [1.0, 2.0])], title="t", y_label="y")
    with pytest.raises(ValueError, match="no finite values"):
        plots.bar_chart(["a"], [plots.BarSeries("s", [None])], title="t", y_label="y")
    with pytest.raises(ValueError, match="no finite data points"):
        plots.line_chart([plots.Series("s", [(0, math.inf)])], title="t", x_label="", y_label="")


def test_scatter_joins_only_the_requested_series() -> None:
    svg = plots.scatter_chart(
        [plots.Series("trials", [(0.1, 2.0), (0.2, 1.0)]), plots.Series("front", [(0.1, 1.0)])],
        joined=[False, True],
        title="Pareto",
        x_label="KL",
        y_label="refusal",
    )
    root = ET.fromstring(svg)
    assert len(root.findall(f"{SVG}polyline")) == 0  # a one-point front has no segment
    assert len(_circles(svg)) == 3
