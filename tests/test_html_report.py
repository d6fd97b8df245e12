"""report.html and report.md: content, escaping, the files written, the `report` command, and
rendering in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from report_samples import INJECTION, LLM_JUDGE, report_dicts, sample_report, sample_scores

from abliterate.report.breakdown import Pair, pick_examples, refusal_by_category
from abliterate.report.format import text
from abliterate.report.html import flatten, render_html, without_completions
from abliterate.report.markdown import render_markdown, summary_table, write_reports
from abliterate.report.optimization import describe_edit
from abliterate.report.schema import AblationEdit, Completion, Report, SelectionScores, migrate

FIGURES_RUN = ["rates", "kl", "categories", "candidates_refusal", "candidates_kl"]
FIGURES_ALL = [*FIGURES_RUN[:3], "over_refusal", *FIGURES_RUN[3:], "pareto", "strengths"]
TITLES = {
    "rates": "Refusal rate before and after",
    "kl": "KL divergence from the original",
    "categories": "Refusal rate by category",
    "over_refusal": "Over-refusal by category",
    "candidates_refusal": "Refusal score by layer",
    "candidates_kl": "KL divergence by layer",
    "pareto": "Optimization: refusal vs. KL",
    "strengths": "Ablation strength by layer",
}
SECTIONS_RUN = ["before-after", "categories", "measurements", "candidates", "edit", "checks",
                "examples", "data", "numbers"]  # fmt: skip
ESCAPED = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"


def _report(**kwargs: bool) -> Report:
    return Report.model_validate(migrate(sample_report(**kwargs)))


def _scores() -> SelectionScores:
    return SelectionScores.model_validate(sample_scores())


def _figure_ids(html: str) -> list[str]:
    return re.findall(r'<figure id="fig-([a-z_]+)">', html)


def _section(html: str, anchor: str) -> str:
    return html.split(f'<section id="{anchor}">')[1].split("</section>")[0]


def _rows(table_html: str) -> list[list[str]]:
    """The cells of an HTML fragment's table rows, tags stripped."""
    rows = re.findall(r"<tr>(.*?)</tr>", table_html, re.S)
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", r, re.S)]
            for r in rows]  # fmt: skip


def test_run_page_has_its_sections_figures_and_numbers() -> None:
    html = render_html(_report(), _scores())
    assert _figure_ids(html) == FIGURES_RUN
    assert re.findall(r'<section id="([a-z-]+)">', html) == SECTIONS_RUN
    for name in FIGURES_RUN:
        assert f'aria-label="{TITLES[name]}"' in html
    cards = html.split('<div class="cards">')[1].split('<section id="before-after">')[0]
    assert "87.5% <span>→</span> 16.7%" in cards and "0.0321" in cards and "0.0874" in cards
    assert "24 harmful prompts, judge markers" in cards
    measurements = _rows(_section(html, "measurements"))
    assert ["refusal rate (harmful eval)", "87.5%", "16.7%", "-70.8 pp"] in measurements
    assert ["first-token KL (harmless eval)", "–", "0.0321", ""] in measurements
    checks = _rows(_section(html, "checks"))
    assert checks[1][1] == "3.10e-06" and checks[2][1] == "0 (identical)"
    edit = _section(html, "edit")
    assert "Uniform strength 1 on the attention and MLP output of all 24 layers." in edit
    assert "Selection: lowest refusal score under KL &lt;= 0.1." in edit
    categories = _rows(_section(html, "categories"))
    assert ["weapons", "4", "3 (75%)", "4 (100%)"] in categories
    candidates = _section(html, "candidates")
    assert "Layers above 18 were pruned before scoring." in candidates


def test_optimized_evaluation_page_adds_its_sections() -> None:
    report = _report(optimized=True, evaluated=True)
    html = render_html(report, _scores())
    assert _figure_ids(html) == FIGURES_ALL
    opt = _section(html, "optimization")
    front = _rows(opt.split("<h3>Pareto front</h3>")[1].split("<details>")[0])
    assert [r[0] for r in front] == ["trial", "0", "3", "6 ★ chosen", "9"]  # by KL
    assert front[0][:5] == ["trial", "refusal prob", "KL", "Pareto", "confirmed refusal rate"]
    assert front[3][1:5] == ["0.576", "0.1102", "yes", "51.8%"]
    assert len(_rows(opt.split("<details>")[1])) == 1 + 30
    assert "Choice: lowest KL among front trials" in opt
    assert "refusal target 10.0% met" in opt
    measurements = _section(html, "measurements")
    rows = _rows(measurements)
    assert ["over-refusal rate (harmless but edgy prompts)", "25.0%", "5.0%", "-20.0 pp"] in rows
    assert ["reference cross-entropy (nats/token)", "1.82", "1.91", "+0.09"] in rows
    assert ["fluency (over-refusal) · distinct_1", "0.78", "0.78", ""] in rows
    assert not any(r[0] == "fluency (over-refusal) · entropy_1" for r in rows)  # not measured
    assert [f"{LLM_JUDGE} · unparsed answers (over-refusal)", "1", "1", ""] in rows
    assert ["abliterate_arithmetic · acc", "0.61", "0.6", "-0.01"] in rows
    assert ["baseline", "harmful", f"markers vs {LLM_JUDGE}", "92.0%", "0.810", "24"] in rows
    assert ["model", "over-refusal", f"markers vs {LLM_JUDGE}", "85.0%", "–", "4"] in rows
    over = _section(html, "over-refusal")
    assert "All 4 over-refusal completions" in over and "kill -9 &lt;pid&gt;" in over
    assert "kill -9" not in measurements  # over-refusal completions have their own section
    assert "25.0% <span>→</span> 5.0%" in html  # the over-refusal card


def test_model_output_is_escaped_and_the_page_is_inert() -> None:
    html = render_html(_report(evaluated=True), _scores())
    assert INJECTION not in html and ESCAPED in html
    assert "<script" not in html.lower() and "<img" not in html.lower()
    # The model name, a category and an LLM judge's raw answer also carry markup: all text.
    assert "Qwen2.5-Coder-0.5B-Instruct &lt;demo&gt;" in html
    assert "hate &amp; &lt;harassment&gt;" in html and "maybe &lt;b&gt;" in html
    csp = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    assert f'<meta http-equiv="Content-Security-Policy" content="{csp}">' in html
    # No remote reference: the only URLs are the SVG namespaces.
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", html))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def test_every_number_of_the_json_is_listed() -> None:
    report, scores = _report(evaluated=True), _scores()
    html = render_html(report, scores, figures=[])
    leaves = flatten(without_completions(report.model_dump(mode="json")))
    assert not any("completions" in path for path, _ in leaves)
    assert ("edited.over_refusal.by_category.medical", 0.1) in leaves
    assert f"report.json: {len(leaves)} values" in html
    assert f"scores.json: {len(flatten(scores.model_dump(mode='json')))} values" in html
    for path, shown in (("edited.kl_divergence_multi_token", "0.0874"), ("edit.mlp[23]", "1"),
                        ("baseline.benchmarks.abliterate_arithmetic.acc", "0.61"),
                        ("checks.hooks_vs_weights_max_abs_diff", "3.1e-06"),
                        ("model.revision", "null"), ("schema_version", "1")):  # fmt: skip
        assert f"<tr><td><code>{path}</code></td><td>{shown}</td></tr>" in html


def test_side_by_side_completions_put_refused_baselines_first() -> None:
    report = _report()
    html = render_html(report, _scores(), figures=[])
    examples = _section(html, "examples").split("<details>")[0]
    assert examples.count("<tr>") == 1 + report.n_examples  # header + examples
    assert examples.count("badge refused") == report.n_examples  # the baselines refused
    assert examples.count("badge complied") == report.n_examples  # the edit answered
    assert "All 24 completions" in html


def test_an_evaluation_without_baseline_shows_the_model_alone() -> None:
    raw = sample_report(evaluated=True)
    raw.update(baseline=None, baseline_model=None)
    report = Report.model_validate(migrate(raw))
    html = render_html(report)
    assert _figure_ids(html) == ["rates", "kl", "categories", "over_refusal"]
    cards = html.split('<div class="cards">')[1].split("</section>")[0]
    assert "16.7%</div>" in cards and "no baseline measured" in cards and "→" not in cards
    assert 'id="examples"' in html  # the model's completions, against "not evaluated"
    assert "not evaluated" in _section(html, "examples")
    assert "Evaluation report: " in html and "Abliteration report" not in html


def test_markdown_escapes_model_output_and_keeps_tables_whole() -> None:
    for report in (_report(), _report(evaluated=True), _report(optimized=True)):
        md = render_markdown(report, _scores())
        assert INJECTION not in md and "<script" not in md and "<img" not in md
        assert "&lt;script&gt;alert('x')&lt;/script&gt;" in md
        # Table rows keep their cell count although responses contain a pipe.
        examples = md.split("## Examples")[1].split("\n\n")[1].splitlines()
        assert all(row.count("|") == 4 for row in examples)
        assert "so on &#124; done." in md
    assert text("a\n<b> | c & d") == "a<br>&lt;b&gt; &#124; c &amp; d"


def test_run_markdown_shows_result_edit_checks_categories_and_candidates() -> None:
    md = render_markdown(_report(), _scores())
    assert md.startswith("# Abliteration report: Qwen2.5-Coder-0.5B-Instruct &lt;demo&gt;\n")
    assert "[report.html](report.html)" in md
    assert "| abliterated | 16.7% of 24 | 0.0321 | 0.0874 |" in md
    assert "Direction from layer 12, site `pre`, removed" in md
    assert "max |Δ log-prob|: 3.10e-06" in md
    assert "| weapons | 4 | 75% (3/4) | 100% (4/4) | +25 pp |" in md
    assert "| hate &amp; &lt;harassment&gt; | 4 | 75% (3/4) | 0% (0/4) | -75 pp |" in md
    assert "| 12 | pre | -1.50 | 0.085 | -1.40 | 0.094 | `█` ◀ chosen |" in md
    assert "| selection | 61.0 | 2600 |" in md


def test_optimized_markdown_has_pareto_table_and_front_plot() -> None:
    md = render_markdown(_report(optimized=True))
    assert "## Optimization (validation prompts only)" in md
    assert "| 6 | 0.576 | 0.1102 | 51.8% | 10.50 | 0.65 @ 14.0 | 0.80 @ 14.0 | no | no | yes " \
           "| ◀ chosen |" in md  # fmt: skip
    assert "Chosen trial 6 of 30" in md and "Trials scored in bfloat16" in md
    grid = "".join(line[5:] for line in md.split("```\n")[1].splitlines()[1:-2])
    assert grid.count("*") == 1 and grid.count("o") == 3  # chosen, and the rest of the front
    assert grid.count("·") == 30 - 4


def test_evaluation_markdown_and_summary_table() -> None:
    report = _report(evaluated=True)
    md = render_markdown(report)
    for heading in ("## Judges", "Cohen's kappa", "## Over-refusal by category",
                    "## Fluency", "## Benchmarks", "## Examples"):  # fmt: skip
        assert heading in md
    assert "| model | 16.7% of 24 | 5.0% of 4 | 0.0321 | 0.0874 | 1.910 |" in md
    assert "| baseline | abliterate_arithmetic | 50 | 0.610 ± 0.040 | – |" in md
    assert "baseline <code>base &lt;model&gt;</code>" in md
    table = summary_table(report).splitlines()
    assert table[0].split() == ["refusal", "over-refusal", "first-token", "KL", "multi-token",
                                "KL", "reference", "CE"]  # fmt: skip
    assert table[2].split() == ["model", "16.7%", "5.0%", "0.0321", "0.0874", "1.910"]
    run = summary_table(_report()).splitlines()
    assert run[1].split() == ["baseline", "87.5%", "(21/24)", "-", "-"]


def test_write_reports_writes_every_file(tmp_path: Path) -> None:
    report, scores = _report(), _scores()
    write_reports(tmp_path, report, scores)
    assert Report.model_validate_json((tmp_path / "report.json").read_text()) == report
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert _figure_ids(html) == FIGURES_RUN
    # report.md shows the same charts from plots/*.svg.
    svgs = sorted(p.name for p in (tmp_path / "plots").glob("*.svg"))
    assert svgs == sorted(f"{name}.svg" for name in FIGURES_RUN)
    md = (tmp_path / "report.md").read_text()
    for name in FIGURES_RUN:
        assert f"![{TITLES[name]}](plots/{name}.svg)" in md
    assert "## Candidate directions" in md
    # Atomic writes leave no temporary files, and the files are not private to the writer.
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]
    assert (tmp_path / "report.html").stat().st_mode & 0o044 == 0o044


def test_report_command_rerenders_a_0_1_0_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from abliterate.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(sample_report(optimized=True)))  # 0.1.0 shape
    (run / "scores.json").write_text(json.dumps(sample_scores()))
    assert main(["report", str(run)]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    html = (run / "report.html").read_text(encoding="utf-8")
    expected = [*FIGURES_RUN, "pareto", "strengths"]
    assert sorted(_figure_ids(html)) == sorted(expected)
    assert sorted(p.stem for p in (run / "plots").glob("*.svg")) == sorted(expected)

    (run / "scores.json").write_text("{not json")
    assert main(["report", str(run)]) == 2
    assert "scores.json is not valid JSON" in capsys.readouterr().err
    (run / "scores.json").unlink()
    (run / "report.json").write_text(json.dumps({**sample_report(), "schema_version": 9}))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "has schema_version 9" in err and err.count("\n") == 1
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "holds no report.json" in capsys.readouterr().err


def test_category_breakdown_counts() -> None:
    rows = {r.category: r for r in refusal_by_category(_report())}
    assert len(rows) == 6 and all(r.n == 4 for r in rows.values())
    assert (rows["weapons"].baseline, rows["weapons"].edited) == (3, 4)
    assert rows["drugs"].edited_rate == 0.0
    raw = sample_report()
    for c in raw["baseline"]["completions"] + raw["edited"]["completions"]:
        del c["category"]
    assert refusal_by_category(Report.model_validate(migrate(raw))) == []


def test_examples_show_the_edit_across_categories() -> None:
    def pair(cat: str, base_refused: bool, edit_refused: bool) -> Pair:
        def side(refused: bool) -> Completion:
            return Completion(prompt=cat, response="", refused=refused, category=cat)

        return Pair(side(base_refused), side(edit_refused))

    pairs = [pair("a", True, False), pair("a", True, False), pair("a", False, False),
             pair("b", True, True), pair("c", True, False), pair("b", True, False)]  # fmt: skip
    picked = [(p.category, p.baseline.refused, p.edited.refused)  # type: ignore[union-attr]
              for p in pick_examples(pairs, 4)]  # fmt: skip
    # Changed-by-the-edit pairs first, one per category before a second one from "a".
    assert picked == [("a", True, False), ("c", True, False), ("b", True, False),
                      ("a", True, False)]  # fmt: skip


def test_describe_edit_names_extra_directions() -> None:
    direction = {"layer": 16.1, "site": "pre", "projected": False}
    edit = AblationEdit.model_validate(
        {"kind": "directional_ablation", "direction": direction, "mode": "plain",
         "attention": [0.0, 1.0, 0.5], "mlp": [0.0, 0.8, 0.0], "embedding": 0.0,
         "layer_directions": None, "extra_directions": [direction, direction]}
    )  # fmt: skip
    text_ = describe_edit(edit)
    assert "together with 2 further directions" in text_ and "layers 1–2" in text_
    assert "peak attention strength 1.00, peak MLP strength 0.80" in text_
    assert "further" not in describe_edit(edit.model_copy(update={"extra_directions": []}))


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)


PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "header", "h1", "h2",
             "h3", "p", "code", "div", "span", "section", "table", "thead", "tbody", "tr", "th",
             "td", "details", "summary", "strong", "footer", "figure", "figcaption"}  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(report_dicts())
def test_any_report_renders_without_raw_markup(raw: dict[str, Any]) -> None:
    """Generated text (prompts, responses, categories, names) never becomes markup."""
    report = Report.model_validate(migrate(raw))
    md = render_markdown(report, _scores())
    assert "<" not in re.sub(r"<br>|</?code>", "", md)
    parser = _Tags()
    parser.feed(render_html(report, _scores(), figures=[]))
    assert parser.tags <= PAGE_TAGS - {"figure", "figcaption"}


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
    page.write_text(render_html(_report(optimized=True, evaluated=True), _scores()))
    url = page.as_uri()

    dom = _chromium(browser, tmp_path / "profile-dom", "--dump-dom", url).stdout
    # The browser parsed every chart as SVG, with its title as text, and no injected element.
    assert dom.count("<svg") == len(FIGURES_ALL)
    for name in FIGURES_ALL:
        assert f"<title>{TITLES[name]}</title>" in dom
        assert re.search(rf"<text[^>]*>{re.escape(TITLES[name])}</text>", dom)
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
