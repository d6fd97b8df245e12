"""``report.html``: one self-contained page with plots, tables and side-by-side completions.

The page is rendered from the ``report.json`` dict (and ``scores.json`` when present) with
inline CSS and inline SVG charts from :mod:`abliterate.plots`: no scripts, no fonts, nothing
fetched, so it opens offline and can be mailed around. A Content-Security-Policy forbids
scripts and remote loads outright, as a second line of defence behind the escaping of every
piece of text (model outputs may contain HTML).

Sections render only when their data is there, so the same function serves ``run`` reports,
``evaluate`` reports (over-refusal, judges, benchmarks) and optimized runs (a Pareto front);
the last section lists every number of the JSON, whatever its shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from abliterate.errors import ConfigError
from abliterate.report.breakdown import refusal_by_category
from abliterate.report.charts import (
    Figure,
    before_after_figures,
    candidate_figures,
    category_figure,
    optimization_trials,
    over_refusal_figure,
    pareto_figure,
    refusal_objective,
    strength_figure,
)
from abliterate.report.charts import mapping as _dict
from abliterate.report.charts import number as _number
from abliterate.report.tables import esc as _e
from abliterate.report.tables import flatten, measurement_tables
from abliterate.report.tables import fmt as _fmt
from abliterate.report.tables import table as _table


def _nan(value: Any) -> float:
    num = _number(value)
    return math.nan if num is None else num


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _figure(figure: Figure) -> str:
    return (
        f'<figure id="fig-{figure.name}">{figure.svg}'
        f"<figcaption>{_e(figure.caption)}</figcaption></figure>"
    )


def _header(report: Mapping[str, Any]) -> str:
    model = _dict(report.get("model"))
    facts = [
        f"abliterate {_e(report.get('abliterate_version', '?'))}",
        f"source <code>{_e(model.get('source', '?'))}</code>",
    ]
    if model.get("revision"):
        facts.append(f"revision <code>{_e(model['revision'])}</code>")
    if model.get("architecture"):
        facts.append(_e(model["architecture"]))
    baseline = _dict(report.get("baseline_model"))
    if baseline.get("name"):
        facts.append(f"baseline <code>{_e(baseline['name'])}</code>")
    return (
        f"<header><h1>Abliteration report: {_e(model.get('name', 'unknown model'))}</h1>"
        f'<p class="meta">{" · ".join(facts)}</p></header>'
    )


def _card(label: str, value: str, note: str) -> str:
    return (
        f'<div class="card"><div class="label">{label}</div><div class="value">{value}</div>'
        f'<div class="note">{note}</div></div>'
    )


def _summary(report: Mapping[str, Any]) -> str:
    base, edited = _dict(report.get("baseline")), _dict(report.get("edited"))
    cards = []
    for key, label in (("refusal_rate", "Refusal rate"), ("over_refusal_rate", "Over-refusal")):
        b, e = _number(base.get(key)), _number(edited.get(key))
        if b is None and e is None:
            continue
        if b is None:  # an evaluate report without a baseline model
            value, note = _fmt(e, rate=True), "no baseline measured"
        else:
            value = f"{_fmt(b, rate=True)} <span>→</span> {_fmt(e, rate=True)}"
            note = "baseline → abliterated"
        if key == "refusal_rate" and _number(edited.get("n_prompts")) is not None:
            note += f", {_e(edited['n_prompts'])} harmful prompts"
        if key == "refusal_rate" and edited.get("judge"):
            note += f", judge {_e(edited['judge'])}"
        cards.append(_card(label, value, note))
    for key, label in (
        ("kl_divergence", "First-token KL"),
        ("kl_divergence_multi_token", "Multi-token KL"),
    ):
        v = _number(edited.get(key))
        if v is not None:
            note = "KL(original ‖ abliterated), nats, harmless prompts"
            if key == "kl_divergence_multi_token" and edited.get("kl_tokens"):
                note += f", first {_e(edited['kl_tokens'])} positions"
            cards.append(_card(label, f"{v:.4f}", note))
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def _before_after(report: Mapping[str, Any]) -> str:
    figures = before_after_figures(report)
    if not figures:
        return ""
    row = "".join(_figure(f) for f in figures)
    return _section("Before and after", f'<div class="row">{row}</div>', "before-after")


def _measurements(report: Mapping[str, Any]) -> str:
    body = measurement_tables(report)
    return _section("Measurements", body, "measurements") if body else ""


def _categories(report: Mapping[str, Any]) -> str:
    figure = category_figure(report)
    if figure is None:
        return ""

    def count(k: int | None, n: int) -> str:
        return "–" if k is None else f"{k} ({100 * k / n:.0f}%)"

    rows = [
        [_e(r.category), str(r.n), count(r.baseline, r.n), count(r.edited, r.n)]
        for r in refusal_by_category(report)
    ]
    header = ["category", "prompts", "baseline refused", "abliterated refused"]
    body = _figure(figure) + _details("Counts per category", _table(header, rows, "num"))
    return _section("Refusals by category", body, "categories")


def _over_refusal(report: Mapping[str, Any]) -> str:
    """Over-refusal by category and its completions side by side (``evaluate`` reports)."""
    base, edited = _dict(report.get("baseline")), _dict(report.get("edited"))
    figure = over_refusal_figure(report)
    pairs = _pairs(_completions(base.get("over_refusal")), _completions(edited.get("over_refusal")))
    if figure is None and not pairs:
        return ""
    body = _figure(figure) if figure else ""
    if pairs:
        body += _details(f"All {len(pairs)} over-refusal completions", _completion_rows(pairs))
    return _section("Over-refusal", body, "over-refusal")


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{_e(summary)}</summary>{body}</details>"


def _candidates(report: Mapping[str, Any], scores: Mapping[str, Any] | None) -> str:
    figures = candidate_figures(scores)
    if not figures:
        if report.get("selection"):
            return _section(
                "Candidate directions",
                "<p>scores.json was not given, so the per-layer scores cannot be plotted.</p>",
                "candidates",
            )
        return ""
    scores = scores or {}
    notes = ["Scores on the screening subset of the validation prompts."]
    if scores.get("max_layer") is not None:
        notes.append(f"Layers above {_e(scores['max_layer'])} were pruned before scoring.")
    if scores.get("rule"):
        notes.append(f"Selection rule: {_e(scores['rule'])}.")
    body = "".join(_figure(f) for f in figures) + f'<p class="note">{" ".join(notes)}</p>'
    return _section("Candidate directions", body, "candidates")


def _optimization(report: Mapping[str, Any]) -> str:
    figure = pareto_figure(report)
    if figure is None:
        return ""
    trials, chosen = optimization_trials(report)
    confirmed = any("confirmed_refusal_rate" in t for t in trials)
    header = ["trial", refusal_objective(report).replace("_", " "), "KL", "Pareto"]
    header += ["confirmed refusal rate"] if confirmed else []
    header += ["parameters"]

    def row(t: Mapping[str, Any]) -> list[str]:
        mark = " ★ chosen" if chosen is not None and t.get("number") == chosen else ""
        cells = [
            _e(f"{t.get('number')}{mark}"),
            _e(_fmt(t.get("refusal_score"))),
            _e(_fmt(t.get("kl"))),
            "yes" if t.get("pareto") else "",
        ]
        if confirmed:
            cells.append(_e(_fmt(t.get("confirmed_refusal_rate"), rate=True)))
        params = json.dumps(t.get("params", {}), sort_keys=True)
        return [*cells, f"<code>{_e(params)}</code>"]

    front = sorted((t for t in trials if t.get("pareto")), key=lambda t: _nan(t.get("kl")))
    rule = _dict(report.get("optimization")).get("rule")
    body = (
        _figure(figure)
        + (f"<p>Choice: {_e(rule)}.</p>" if rule else "")
        + "<h3>Pareto front</h3>"
        + _table(header, [row(t) for t in front], "num")
        + _details(f"All {len(trials)} trials", _table(header, [row(t) for t in trials], "num"))
    )
    return _section("Optimization", body, "optimization")


def _edit(report: Mapping[str, Any]) -> str:
    edit = _dict(report.get("edit"))
    if not edit:
        return ""
    direction = _dict(edit.get("direction"))
    parts = []
    facts = [
        ("kind", edit.get("kind")),
        ("direction layer", direction.get("layer")),
        ("direction site", direction.get("site")),
        ("d_model", direction.get("d_model")),
        ("mean-difference norm", direction.get("scale")),
        ("embedding strength", edit.get("embedding")),
    ]
    parts.append(_table(["", ""], ([_e(k), _e(_fmt(v))] for k, v in facts if v is not None), "kv"))
    attn = [_number(v) for v in edit.get("attention", []) or []]
    mlp = [_number(v) for v in edit.get("mlp", []) or []]
    strengths = [v for v in attn + mlp if v is not None]
    if strengths and len(set(strengths)) == 1:
        parts.append(
            f"<p>Uniform strength {strengths[0]:g} on the attention and MLP output of all "
            f"{len(attn)} layers.</p>"
        )
    elif (figure := strength_figure(report)) is not None:
        parts.append(_figure(figure))
    selection = _dict(report.get("selection"))
    if selection.get("rule"):
        met = selection.get("met_kl_threshold")
        parts.append(
            f"<p>Selection: {_e(selection['rule'])}."
            + ("" if met is not False else " <strong>No candidate met the KL threshold.</strong>")
            + "</p>"
        )
    return _section("Edit", "".join(parts), "edit")


def _checks(report: Mapping[str, Any]) -> str:
    checks = _dict(report.get("checks"))
    labels = {
        "hooks_vs_weights_max_abs_diff": "hooks vs. orthogonalized weights, max |Δ log-prob|",
        "export_reload_max_abs_diff": "saved model reloaded vs. evaluated model, max |Δ logit|",
    }
    rows = []
    for k, v in checks.items():
        if v is None:
            shown = "model not saved"
        elif v == 0:
            shown = "0 (identical)"
        else:
            shown = f"{v:.2e}" if _number(v) is not None else _fmt(v)
        rows.append([_e(labels.get(k, k)), _e(shown)])
    return _section("Checks", _table(["check", "value"], rows, "num"), "checks") if rows else ""


def _badge(refused: Any) -> str:
    if refused is None:
        return ""
    return (
        '<span class="badge refused">refused</span>'
        if refused
        else '<span class="badge complied">answered</span>'
    )


def _completions(block: Any) -> list[Mapping[str, Any]]:
    rows = _dict(block).get("completions")
    return [c for c in rows if isinstance(c, Mapping)] if isinstance(rows, list) else []


def _pairs(
    base: list[Mapping[str, Any]], edited: list[Mapping[str, Any]]
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """Baseline and edited completions of the same prompts, in prompt order."""
    if len(base) == len(edited) and all(
        b.get("prompt") == e.get("prompt") for b, e in zip(base, edited, strict=True)
    ):
        return list(zip(base, edited, strict=True))
    # Different prompt lists: match by prompt text, keeping whichever side is missing empty.
    by_prompt = {str(e.get("prompt")): e for e in edited}
    pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = [
        (b, by_prompt.pop(str(b.get("prompt")), {})) for b in base
    ]
    pairs += [({}, e) for e in by_prompt.values()]
    return pairs


def _completion_rows(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> str:
    rows = []
    for b, e in pairs:
        prompt = b.get("prompt", e.get("prompt", ""))
        category = b.get("category") or e.get("category")
        cat = f'<span class="cat">{_e(category)}</span>' if category else ""

        def cell(c: Mapping[str, Any]) -> str:
            if not c:
                return '<span class="missing">not evaluated</span>'
            text = str(c.get("response", "")).strip() or "(empty)"
            return f'{_badge(c.get("refused"))}<div class="resp">{_e(text)}</div>'

        rows.append([f'{cat}<div class="resp">{_e(prompt)}</div>', cell(b), cell(e)])
    return _table(["prompt", "baseline", "abliterated"], rows, "completions")


def pick_examples(
    pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], n: int
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """``n`` (baseline, edited) pairs that show the edit, from as many categories as possible.

    Pairs the baseline refused and the edited model answered come first (they show what the
    edit changed), then the rest; within that order, one pair per category goes before any
    second one, so the examples are not all from the first category of the prompt set.
    """
    ranked = sorted(pairs, key=lambda p: (not p[0].get("refused"), bool(p[1].get("refused"))))
    seen: dict[Any, int] = {}
    order = []
    for i, (b, e) in enumerate(ranked):
        category = b.get("category", e.get("category"))
        seen[category] = seen.get(category, 0) + 1
        rank = (not b.get("refused"), bool(e.get("refused")))
        order.append((rank, seen[category], i))
    return [ranked[i] for *_, i in sorted(order)[:n]]


def _examples(report: Mapping[str, Any]) -> str:
    pairs = _pairs(_completions(report.get("baseline")), _completions(report.get("edited")))
    if not pairs:
        return ""
    n = report.get("n_examples", 4)
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 4
    body = ""
    if n:
        body += _completion_rows(pick_examples(pairs, n))
    body += _details(f"All {len(pairs)} completions", _completion_rows(pairs))
    return _section("Example completions", body, "examples")


def _data_and_timings(report: Mapping[str, Any]) -> str:
    parts = []
    data = _dict(report.get("data"))
    rows = [
        [
            _e(k),
            _e(_dict(v).get("name", "")),
            _e(_fmt(_dict(v).get("n"))),
            f"<code>{_e(str(_dict(v).get('sha256', ''))[:12])}</code>",
        ]
        for k, v in data.items()
    ]
    if rows:
        parts.append("<h3>Prompt sets</h3>" + _table(["role", "source", "n", "sha256"], rows))
    timings = _dict(report.get("timings"))
    rows = [
        [_e(k), _e(_fmt(_dict(t).get("seconds"))), _e(_fmt(_dict(t).get("peak_rss_mb")))]
        for k, t in timings.items()
    ]
    if rows:
        parts.append("<h3>Stages</h3>" + _table(["stage", "seconds", "peak RSS (MB)"], rows, "num"))
    return _section("Data and timings", "".join(parts), "data") if parts else ""


def without_completions(value: Any) -> Any:
    """``value`` with every ``"completions"`` entry removed, at any depth."""
    if isinstance(value, Mapping):
        return {k: without_completions(v) for k, v in value.items() if k != "completions"}
    if isinstance(value, list):
        return [without_completions(v) for v in value]
    return value


def _all_numbers(report: Mapping[str, Any], scores: Mapping[str, Any] | None) -> str:
    # Completions have their own tables; everything else is listed leaf by leaf.
    trimmed = without_completions(report)
    sources: list[tuple[str, Mapping[str, Any]]] = [("report.json", trimmed)]
    if scores:
        sources.append(("scores.json", scores))
    body = ""
    for name, data in sources:
        rows = [[f"<code>{_e(path)}</code>", _e(_fmt(v))] for path, v in flatten(data)]
        body += _details(f"{name}: {len(rows)} values", _table(["key", "value"], rows, "kv"))
    return _section("Every number", body, "numbers")


_CSS = """
:root { --fg:#1d232b; --muted:#5b6673; --line:#e3e6ea; --bg:#f6f7f9; --accent:#D55E00; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 28px 24px 60px; }
header h1 { font-size: 26px; margin: 0 0 4px; }
.meta { color: var(--muted); margin: 0 0 20px; }
h2 { font-size: 19px; margin: 34px 0 12px; padding-bottom: 6px;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 8px; }
code { font: 12.5px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
.card .label { color: var(--muted); font-size: 13px; text-transform: uppercase;
  letter-spacing: .04em; }
.card .value { font-size: 24px; white-space: nowrap; font-weight: 650; margin: 2px 0; }
.card .value span { color: var(--muted); font-weight: 400; }
.card .note { color: var(--muted); font-size: 12.5px; }
figure { margin: 0 0 14px; background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 10px; }
figure svg { display: block; width: 100%; height: auto; }
figcaption, .note { color: var(--muted); font-size: 13px; margin-top: 6px; }
.row { display: flex; flex-wrap: wrap; gap: 12px; }
.row figure { flex: 1 1 380px; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line);
  margin: 6px 0 12px; font-size: 13.5px; }
th, td { text-align: left; vertical-align: top; padding: 6px 10px;
  border-bottom: 1px solid var(--line); }
th { background: #eef0f3; font-weight: 600; }
table.num td + td { font-variant-numeric: tabular-nums; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
table.completions td { width: 33%; }
.resp { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 16em; overflow: auto; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; border-radius: 4px;
  padding: 0 6px; margin-bottom: 4px; }
.badge.refused { background: #fde2d4; color: #9a3300; }
.badge.complied { background: #d9f0e6; color: #00603f; }
.cat { display: inline-block; font-size: 11px; color: var(--muted); border: 1px solid var(--line);
  border-radius: 4px; padding: 0 5px; margin-bottom: 4px; }
.missing { color: var(--muted); font-style: italic; }
details { margin: 8px 0; }
summary { cursor: pointer; color: #0b5cad; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; }
"""

# No scripts, no remote loads: the page is data, and model outputs inside it stay inert.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render_html(report: Mapping[str, Any], scores: Mapping[str, Any] | None = None) -> str:
    """A self-contained HTML page for a ``report.json`` dict (and optional ``scores.json``).

    Args:
        report: The report as written by ``pipeline.run`` (or a later command); sections whose
            keys are missing are left out.
        scores: ``Selection.to_dict()`` (the ``scores.json`` shape), for per-layer plots.
    """
    name = _dict(report.get("model")).get("name", "unknown model")
    sections = [
        _header(report),
        _summary(report),
        _before_after(report),
        _categories(report),
        _over_refusal(report),
        _measurements(report),
        _candidates(report, scores),
        _optimization(report),
        _edit(report),
        _checks(report),
        _examples(report),
        _data_and_timings(report),
        _all_numbers(report, scores),
    ]
    version = _e(report.get("abliterate_version", ""))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="abliterate {version}">'
        f"<title>Abliteration report: {_e(name)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(sections)}"
        f"<footer>Generated by abliterate {version}. Self-contained: no scripts, nothing "
        "fetched.</footer></main></body></html>\n"
    )


def write_run_report(run: Path) -> Path:
    """Render ``run/report.html`` and ``run/plots/*.svg`` from the run's JSON; return the page.

    Raises:
        ConfigError: ``run`` has no readable ``report.json``.
    """
    from abliterate.report.charts import all_figures, write_figures

    def read(name: str) -> Any:
        try:
            return json.loads((run / name).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{run / name} is not valid JSON: {exc}") from exc

    if not (run / "report.json").is_file():
        raise ConfigError(
            f"run: {run} holds no report.json; pass a run directory written by abliterate."
        )
    report = read("report.json")
    if not isinstance(report, dict):
        raise ConfigError(f"{run / 'report.json'} must hold a JSON object.")
    scores = read("scores.json") if (run / "scores.json").is_file() else None
    write_figures(run / "plots", all_figures(report, scores))
    page = run / "report.html"
    page.write_text(render_html(report, scores), encoding="utf-8")
    return page
