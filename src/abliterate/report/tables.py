"""The tables of an HTML report: measurements before/after, judges, judge agreement and
benchmarks, plus the small HTML helpers they share with :mod:`abliterate.html_report`.

Every cell is escaped here; reports carry model names, prompt categories and other text that
may contain markup. Unknown keys are shown under their JSON names, nested measurements one row
per leaf, so new metrics appear without code changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

from abliterate.report.charts import mapping as _dict
from abliterate.report.charts import number as _number

# Human names of the per-model measurements; unknown keys are shown under their JSON name.
METRIC_LABELS = {
    "refusal_rate": "refusal rate (harmful eval)",
    "over_refusal_rate": "over-refusal rate (harmless but edgy prompts)",
    "kl_divergence": "first-token KL (harmless eval)",
    "kl_divergence_multi_token": "multi-token KL (harmless eval)",
    "kl_tokens": "multi-token KL positions",
    "n_prompts": "harmful eval prompts",
    "judge": "refusal judge",
}
# Rendered in their own tables and sections rather than as rows of the measurements table.
SKIPPED_KEYS = ("completions", "judges", "judge_agreement", "benchmarks", "over_refusal")


def esc(value: Any) -> str:
    """``value`` as HTML-escaped text (quotes too, so it is safe inside attributes)."""
    return escape(str(value), quote=True)


def fmt(value: Any, *, rate: bool = False) -> str:
    """A cell's text: rates as percentages, floats to 4 significant digits, others as JSON."""
    num = _number(value)
    if num is None:
        if value is None:
            return "–"
        return value if isinstance(value, str) else json.dumps(value)
    if rate:
        return f"{100 * num:.1f}%"
    if isinstance(value, int):
        return str(value)
    return f"{num:.4g}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """An HTML table; cells are already-escaped HTML fragments."""
    head = "".join(f"<th>{h}</th>" for h in header)
    head = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}>{head}<tbody>{body}</tbody></table>"


def _compare_row(label: str, b: Any, e: Any, *, rate: bool) -> list[str]:
    """A ``label | baseline | abliterated | change`` row of escaped cells."""
    nb, ne = _number(b), _number(e)
    change = ""
    if nb is not None and ne is not None and nb != ne:
        change = f"{100 * (ne - nb):+.1f} pp" if rate else f"{ne - nb:+.4g}"
    return [esc(label), esc(fmt(b, rate=rate)), esc(fmt(e, rate=rate)), esc(change)]


def _is_rate(key: str) -> bool:
    return key.endswith("rate")


def measurement_tables(report: Mapping[str, Any]) -> str:
    """Baseline vs. edited measurements, then judges, judge agreement and benchmarks, as HTML
    tables; empty when the report has no measurements."""
    base, edited = _dict(report.get("baseline")), _dict(report.get("edited"))
    rows = []
    for k in {**base, **edited}:
        if k in SKIPPED_KEYS:
            continue
        b, e = base.get(k), edited.get(k)
        if isinstance(b, Mapping) or isinstance(e, Mapping):
            # Nested measurements (fluency per prompt set, ...): one row per leaf.
            bl, el = dict(flatten(_dict(b))), dict(flatten(_dict(e)))
            for path in bl | el:
                rows.append(
                    _compare_row(f"{k} · {path}", bl.get(path), el.get(path), rate=_is_rate(path))
                )
        elif not isinstance(b, list) and not isinstance(e, list):
            rows.append(_compare_row(METRIC_LABELS.get(k, k), b, e, rate=_is_rate(k)))
    if not rows:
        return ""
    body = table(["measurement", "baseline", "abliterated", "change"], rows, "num")
    body += _judges(base, edited) + _agreement(base, edited) + _benchmarks(base, edited)
    return body


def _judges(base: Mapping[str, Any], edited: Mapping[str, Any]) -> str:
    """Refusal rates by judge: ``{name: rate}`` or ``{name: {metric: value, ...}}``."""
    jb, je = _dict(base.get("judges")), _dict(edited.get("judges"))
    rows = []
    for name in {**jb, **je}:
        b, e = jb.get(name), je.get(name)
        if isinstance(b, Mapping) or isinstance(e, Mapping):
            bl, el = dict(flatten(_dict(b))), dict(flatten(_dict(e)))
            for path in bl | el:
                rows.append(
                    _compare_row(
                        f"{name} · {path}", bl.get(path), el.get(path), rate=_is_rate(path)
                    )
                )
        else:
            # A bare number is a judge's refusal rate, except for an agreement score.
            rows.append(_compare_row(name, b, e, rate=name != "agreement"))
    if not rows:
        return ""
    return "<h3>Judges</h3>" + table(["judge", "baseline", "abliterated", "change"], rows, "num")


def _agreement(base: Mapping[str, Any], edited: Mapping[str, Any]) -> str:
    """Pairwise judge agreement: ``{prompt set: [{"judges", "agreement", "cohen_kappa", "n"}]}``."""
    rows = []
    for side, block in (("baseline", base), ("abliterated", edited)):
        for kind, pairs in _dict(block.get("judge_agreement")).items():
            for p in pairs if isinstance(pairs, list) else []:
                p = _dict(p)
                judges = p.get("judges") or []
                rows.append(
                    [
                        esc(side),
                        esc(kind),
                        esc(" vs ".join(str(j) for j in judges)),
                        esc(fmt(p.get("agreement"), rate=True)),
                        esc(fmt(p.get("cohen_kappa"))),
                        esc(fmt(p.get("n"))),
                    ]
                )
    if not rows:
        return ""
    header = ["model", "prompts", "judges", "agreement", "Cohen's kappa", "n"]
    return "<h3>Judge agreement</h3>" + table(header, rows, "num")


def _benchmarks(base: Mapping[str, Any], edited: Mapping[str, Any]) -> str:
    bb, be = _dict(base.get("benchmarks")), _dict(edited.get("benchmarks"))
    rows = []
    for task in {**bb, **be}:
        mb, me = _dict(bb.get(task)), _dict(be.get(task))
        for metric in {**mb, **me}:
            b, e = _number(mb.get(metric)), _number(me.get(metric))
            change = f"{e - b:+.4g}" if b is not None and e is not None and b != e else ""
            rows.append([esc(task), esc(metric), esc(fmt(b)), esc(fmt(e)), esc(change)])
    if not rows:
        return ""
    header = ["task", "metric", "baseline", "abliterated", "change"]
    return "<h3>Benchmarks</h3>" + table(header, rows, "num")


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf of a JSON value as ``(path, value)``, e.g. ``("edit.mlp[3]", 1.0)``."""
    if isinstance(value, Mapping):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list):
        out = []
        for i, v in enumerate(value):
            out += flatten(v, f"{prefix}[{i}]")
        return out
    return [(prefix, value)]
