"""The HTML and Markdown reports: sections, escaping, robustness, and rendering in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from report_samples import INJECTION, sample_report, sample_scores

from abliterate.report.breakdown import refusal_by_category
from abliterate.report.html import flatten, render_html, without_completions
from abliterate.report.markdown import render_markdown, write_reports

TITLES_RUN = (
    "Refusal rate before and after",
    "KL divergence from the original",
    "Refusal rate by category",
    "Refusal score by layer",
    "KL divergence by layer",
)
TITLES_OPTIMIZED = (*TITLES_RUN, "Optimization: refusal vs. KL", "Ablation strength by layer")
TITLE_OVER_REFUSAL = "Over-refusal by category"


def _svg_titles(html: str) -> list[str]:
    return re.findall(r'<svg[^>]*aria-label="([^"]*)"', html)


def test_run_report_has_every_plot_and_no_optional_section() -> None:
    html = render_html(sample_report(), sample_scores())
    assert _svg_titles(html) == list(TITLES_RUN)
    assert 'id="optimization"' not in html and "Benchmarks" not in html
    assert "Judges" not in html and "over-refusal" not in html


def test_optimized_and_evaluated_report_adds_their_sections() -> None:
    html = render_html(sample_report(optimized=True, evaluated=True), sample_scores())
    assert sorted(_svg_titles(html)) == sorted([*TITLES_OPTIMIZED, TITLE_OVER_REFUSAL])
    assert "<h3>Pareto front</h3>" in html and "6 ★ chosen" in html
    assert "chosen: trial 6" in html and "Choice: lowest KL among front trials" in html
    # The trials hold the objective the search named, and confirmations when it made them.
    assert "<th>refusal prob</th>" in html and "<th>confirmed refusal rate</th>" in html
    pareto = html.split('id="fig-pareto"')[1].split("</svg>")[0]
    assert "unedited model" in pareto
    assert "<h3>Benchmarks</h3>" in html and "abliterate_arithmetic" in html
    assert "classifier:org/refusal · refusal_rate" in html  # per-judge rates, as percentages
    assert "classifier:org/refusal · n_unparsed.over_refusal" in html
    assert "<h3>Judge agreement</h3>" in html and "markers vs classifier:org/refusal" in html
    assert "fluency · harmful.distinct_1" in html and "reference_cross_entropy" in html
    assert "Over-refusal" in html and "25.0% <span>→</span> 5.0%" in html
    assert "Over-refusal by category" in html and "All 4 over-refusal completions" in html
    # Over-refusal completions go to their own section, not into the measurements table.
    measurements = html.split('id="measurements"')[1].split("</section>")[0]
    assert "kill -9" not in measurements and "kill -9 &lt;pid&gt;" in html


def test_model_output_is_escaped_and_the_page_is_inert() -> None:
    html = render_html(sample_report(), sample_scores())
    assert INJECTION not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<script" not in html.lower() and "<img" not in html.lower()
    # The model name and a category also carry markup; both arrive as text.
    assert "Qwen2.5-Coder-0.5B-Instruct &lt;demo&gt;" in html
    assert "hate &amp; &lt;harassment&gt;" in html
    assert "Content-Security-Policy" in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )


def test_every_number_of_the_json_is_listed() -> None:
    report, scores = sample_report(evaluated=True), sample_scores()
    html = render_html(report, scores)
    leaves = flatten(without_completions(report))
    assert not any("completions" in path for path, _ in leaves)
    assert ("edited.over_refusal.by_category.medical", 0.1) in leaves
    assert f"report.json: {len(leaves)} values" in html
    assert f"scores.json: {len(flatten(scores))} values" in html
    for path in ("edited.kl_divergence_multi_token", "edit.mlp[23]", "baseline.benchmarks"
                 ".abliterate_arithmetic.acc", "checks.hooks_vs_weights_max_abs_diff"):  # fmt: skip
        assert f"<code>{path}</code>" in html


def test_side_by_side_completions_put_refused_baselines_first() -> None:
    report = sample_report()
    html = render_html(report, sample_scores())
    examples = html.split('id="examples"')[1].split("<details>")[0]
    assert examples.count("<tr>") == 1 + report["n_examples"]  # header + examples
    assert examples.count("badge refused") == report["n_examples"]  # the baselines refused
    assert examples.count("badge complied") == report["n_examples"]  # the edit answered
    assert "All 24 completions" in html


def test_category_breakdown_counts() -> None:
    rows = {r.category: r for r in refusal_by_category(sample_report())}
    assert len(rows) == 6 and all(r.n == 4 for r in rows.values())
    assert (rows["weapons"].baseline, rows["weapons"].edited) == (3, 4)
    assert rows["drugs"].edited_rate == 0.0
    report = sample_report()
    for c in report["baseline"]["completions"] + report["edited"]["completions"]:
        del c["category"]
    assert refusal_by_category(report) == []


@pytest.mark.parametrize(
    "report",
    [
        {},
        {"model": {"name": "m"}, "baseline": {"refusal_rate": 1.0}, "edited": {"refusal_rate": 0}},
        {"baseline": None, "edited": {"refusal_rate": 0.5, "judges": {"markers": 0.5}}},
        {"baseline": {"completions": [{"prompt": "p", "response": "r", "refused": True}]},
         "edited": {"completions": []}, "optimization": {"trials": [{"number": 1}]},
         "edit": {"attention": [None, "x"]}, "checks": {"export_reload_max_abs_diff": None}},
    ],
)  # fmt: skip
def test_partial_reports_render(report: dict[str, Any]) -> None:
    html = render_html(report, {"scores": []})
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


def test_report_without_baseline_shows_the_model_alone() -> None:
    report = {"baseline": None, "baseline_model": None, "edited": {"refusal_rate": 0.25}}
    html = render_html(report)
    assert "25.0%</div>" in html and "no baseline measured" in html and "→" not in html


def test_markdown_report_links_html_and_breaks_down_categories() -> None:
    md = render_markdown(sample_report())
    assert "[report.html](report.html)" in md
    assert "## Refusals by category" in md
    assert "| weapons | 4 | 75% (3/4) | 100% (4/4) | +25 pp |" in md
    assert "| hate & <harassment> |" in md


def test_write_reports_writes_html_with_scores(tmp_path: Path) -> None:
    (tmp_path / "scores.json").write_text(json.dumps(sample_scores()))
    write_reports(tmp_path, sample_report(), None)
    assert json.loads((tmp_path / "report.json").read_text()) == sample_report()
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Refusal score by layer" in html
    # report.md shows the same charts from plots/*.svg.
    svgs = sorted(p.name for p in (tmp_path / "plots").glob("*.svg"))
    assert svgs == sorted(["rates.svg", "kl.svg", "categories.svg", "candidates_refusal.svg",
                           "candidates_kl.svg"])  # fmt: skip
    md = (tmp_path / "report.md").read_text()
    for name in svgs:
        assert f"(plots/{name})" in md


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}",
    ]  # fmt: skip
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, timeout=60, check=True
    )


def test_html_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium or Chrome on PATH (make test installs Debian's chromium as root)")
    page = tmp_path / "report.html"
    report = sample_report(optimized=True, evaluated=True)
    page.write_text(render_html(report, sample_scores()), encoding="utf-8")
    url = page.as_uri()

    dom = _chromium(browser, tmp_path / "profile-dom", "--dump-dom", url).stdout
    # The browser parsed every chart as SVG, with its title, and no injected element survived.
    assert dom.count("<svg") == len(TITLES_OPTIMIZED) + 1
    for title in (*TITLES_OPTIMIZED, TITLE_OVER_REFUSAL):
        assert f"<title>{title}</title>" in dom
    assert "<script" not in dom and "<img" not in dom
    assert "&lt;script&gt;" in dom

    png = tmp_path / "report.png"
    _chromium(browser, tmp_path / "profile-png", f"--screenshot={png}", "--window-size=1200,2400",
              url)  # fmt: skip
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (1200, 2400)
    # A blank page compresses to a few kilobytes; charts and tables do not.
    assert png.stat().st_size > 50_000


def test_candidate_sites_keep_their_colours_in_any_order() -> None:
    from abliterate.report.charts import candidate_figures
    from abliterate.report.plots import PALETTE

    scores = sample_scores()
    scores["scores"].reverse()  # post, mid, pre: the order a run with a degenerate "pre" gives
    refusal, kl = candidate_figures(scores)
    for figure in (refusal, kl):
        strokes = re.findall(r'<polyline [^>]*stroke="(#[0-9A-Fa-f]+)"', figure.svg)
        assert strokes == list(PALETTE[:3])  # pre, mid, post
    assert "chosen: 12/pre" in refusal.svg


def test_report_command_rerenders_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from abliterate.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(sample_report(optimized=True)))
    (run / "scores.json").write_text(json.dumps(sample_scores()))
    assert main(["report", str(run)]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    html = (run / "report.html").read_text(encoding="utf-8")
    assert sorted(_svg_titles(html)) == sorted(TITLES_OPTIMIZED)
    assert len(list((run / "plots").glob("*.svg"))) == len(TITLES_OPTIMIZED)

    (run / "scores.json").write_text("{not json")
    assert main(["report", str(run)]) == 2
    assert "scores.json is not valid JSON" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "holds no report.json" in capsys.readouterr().err


def test_examples_show_the_edit_across_categories() -> None:
    from abliterate.report.html import pick_examples

    def pair(cat: str, base_refused: bool, edit_refused: bool) -> tuple[dict, dict]:
        b = {"prompt": cat, "refused": base_refused, "category": cat}
        return b, {"prompt": cat, "refused": edit_refused, "category": cat}

    pairs = [pair("a", True, False), pair("a", True, False), pair("a", False, False),
             pair("b", True, True), pair("c", True, False), pair("b", True, False)]  # fmt: skip
    picked = [(b["category"], b["refused"], e["refused"]) for b, e in pick_examples(pairs, 4)]
    # Changed-by-the-edit pairs first, one per category before a second one from "a".
    assert picked == [("a", True, False), ("c", True, False), ("b", True, False),
                      ("a", True, False)]  # fmt: skip
