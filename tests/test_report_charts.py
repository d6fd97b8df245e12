"""The report's matplotlib charts: which exist, that text stays text, that their data is drawn,
and that drawing them leaves no global state behind."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import matplotlib
import pytest
from report_samples import sample_report, sample_scores

from abliterate.report.charts import (
    BASELINE_COLOR,
    EDITED_COLOR,
    PALETTE,
    Figure,
    all_figures,
    candidate_figures,
    category_figure,
    pareto_figure,
    strength_figure,
)
from abliterate.report.schema import Report, SelectionScores, migrate

SVG = "{http://www.w3.org/2000/svg}"


def _report(**kwargs: bool) -> Report:
    return Report.model_validate(migrate(sample_report(**kwargs)))


def _scores() -> SelectionScores:
    return SelectionScores.model_validate(sample_scores())


def _texts(figure: Figure) -> list[str]:
    root = ET.fromstring(figure.svg)  # also proves the document is well-formed XML
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def _group(figure: Figure, gid: str) -> ET.Element:
    root = ET.fromstring(figure.svg)
    found = [g for g in root.iter(f"{SVG}g") if g.get("id") == gid]
    assert len(found) == 1, f"{gid} in {figure.name}"
    return found[0]


@pytest.fixture(scope="module")
def figures() -> dict[str, Figure]:
    return {f.name: f for f in all_figures(_report(optimized=True, evaluated=True), _scores())}


def test_which_charts_a_report_gets() -> None:
    names = [f.name for f in all_figures(_report(), _scores())]
    assert names == ["rates", "kl", "categories", "candidates_refusal", "candidates_kl"]
    # Uniform strengths are said in a sentence; no scores, no per-layer charts.
    assert strength_figure(_report()) is None and candidate_figures(None) == []
    raw = sample_report(evaluated=True)
    raw.update(baseline=None, baseline_model=None)
    for key in ("kl_divergence", "kl_divergence_multi_token", "kl_tokens"):
        raw["edited"].pop(key)
    names = [f.name for f in all_figures(Report.model_validate(migrate(raw)))]
    assert names == ["rates", "categories", "over_refusal"]


def test_text_is_text_and_every_chart_is_titled(figures: dict[str, Figure]) -> None:
    assert len(figures) == 8
    for f in figures.values():
        assert f.svg.startswith("<svg ") and "<?xml" not in f.svg and "<!DOCTYPE" not in f.svg
        root = ET.fromstring(f.svg)
        assert root.get("aria-label") == f.title and root.findtext(f"{SVG}title") == f.title
        texts = _texts(f)
        assert f.title in texts
        # Glyphs drawn as outlines would be <path> definitions named after the font.
        assert "DejaVuSans-" not in f.svg and len(texts) > 5
        # Nothing remote and nothing that changes between runs (dates, random ids).
        assert "<metadata" not in f.svg and "http://purl.org" not in f.svg
        assert f.caption and not f.caption.endswith(" ")


def test_pareto_chart_draws_every_trial(figures: dict[str, Figure]) -> None:
    report = _report(optimized=True)
    opt = report.optimization
    assert opt is not None
    chart = figures["pareto"]
    rest = _group(chart, "pareto-trials").iter(f"{SVG}use")
    front = _group(chart, "pareto-front").iter(f"{SVG}use")
    n_front = sum(t.pareto for t in opt.trials)
    assert (len(list(rest)), len(list(front))) == (len(opt.trials) - n_front, n_front)
    texts = _texts(chart)
    assert "chosen: trial 6" in texts and "unedited model" in texts and "Pareto front" in texts
    # KL spans 0.01-0.37: a log axis with plain labels, not TeX.
    assert {"0.01", "0.1"} <= set(texts) and not any("$" in t for t in texts)
    assert "first-token KL divergence (nats), log scale" in texts
    assert pareto_figure(_report()) is None


def test_candidate_sites_keep_their_colours_in_any_order() -> None:
    raw = sample_scores()
    raw["scores"].reverse()  # post, mid, pre: the order a run with a degenerate "pre" gives
    refusal, kl = candidate_figures(SelectionScores.model_validate(raw))
    for figure in (refusal, kl):
        for site, color in zip(("pre", "mid", "post"), PALETTE, strict=False):
            line = _group(figure, f"site-{site}")
            assert color.lower() in (line.find(f"{SVG}path").get("style") or "").lower()  # type: ignore[union-attr]
            assert len(list(line.iter(f"{SVG}use"))) == 19  # one marker per scored layer
        texts = _texts(figure)
        assert "chosen: 12/pre" in texts and "pruned above layer 18" in texts
    assert "unedited model" in _texts(refusal) and "KL threshold" in _texts(kl)
    assert {"0.01", "0.1"} <= set(_texts(kl))  # KL over two decades: log axis


def test_bars_show_their_values(figures: dict[str, Figure]) -> None:
    rates = _texts(figures["rates"])
    assert {"88%", "17%", "25%", "5%"} <= set(rates)  # refusal and over-refusal, both sides
    assert {"0.0321", "0.0874"} <= set(_texts(figures["kl"]))
    categories = _texts(figures["categories"])
    assert "hate & <harassment>" in categories  # escaped in the SVG, text again when parsed
    assert "hate &amp; &lt;harassment&gt;" in figures["categories"].svg
    assert categories.count("100%") >= 4 and categories.count("0%") >= 5
    for color in (BASELINE_COLOR, EDITED_COLOR):
        assert f"fill: {color.lower()}" in figures["categories"].svg.lower()
    strengths = figures["strengths"]
    assert len(list(_group(strengths, "strength-attention").iter(f"{SVG}use"))) == 24


def test_untrusted_labels_are_not_math_or_markup() -> None:
    raw = sample_report()
    for c in raw["baseline"]["completions"] + raw["edited"]["completions"]:
        c["category"] = "costs $5 or $6 <b>" if c["category"] == "drugs" else c["category"]
    figure = category_figure(Report.model_validate(migrate(raw)))
    assert figure is not None and "costs $5 or $6 <b>" in _texts(figure)


def test_charts_are_deterministic_and_leave_no_global_state() -> None:
    before = dict(matplotlib.rcParams)
    first = all_figures(_report(optimized=True), _scores())
    second = all_figures(_report(optimized=True), _scores())
    assert [f.svg for f in first] == [f.svg for f in second]
    assert dict(matplotlib.rcParams) == before
    # Ids referenced inside one chart (markers, clip paths) are unique across the page.
    defined: dict[str, str] = {}
    for f in first:
        for ref in set(re.findall(r'(?:url\(#|xlink:href="#)([^)"]+)', f.svg)):
            assert defined.setdefault(ref, f.name) == f.name, ref
