"""The charts of a report: ``report.json`` / ``scores.json`` dicts in, SVG figures out.

Each function returns the figures its data supports and nothing when the data is absent, so
``run``, ``evaluate`` and optimized reports all go through the same code. Reading is lenient
(a missing or non-numeric value is skipped, never an exception), because reports written by
older or newer versions of the tool must still render.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abliterate.report import plots
from abliterate.report.breakdown import refusal_by_category
from abliterate.types import SITES

RATE_KEYS = ("refusal_rate", "over_refusal_rate")
KL_KEYS = ("kl_divergence", "kl_divergence_multi_token")
SHORT_LABELS = {
    "refusal_rate": "refusal rate",
    "over_refusal_rate": "over-refusal rate",
    "kl_divergence": "first-token KL",
    "kl_divergence_multi_token": "multi-token KL",
}


@dataclass(frozen=True)
class Figure:
    """One chart with its caption.

    Attributes:
        name: Stable identifier (``candidates_refusal``), usable as a file stem.
        svg: The standalone SVG document.
        caption: Plain-text explanation shown under the chart.
    """

    name: str
    svg: str
    caption: str


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None for anything else (bools, strings, null, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _nan(value: Any) -> float:
    # Charts skip NaN points, so a missing value leaves a gap instead of a fake zero.
    num = number(value)
    return math.nan if num is None else num


def mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def before_after_figures(report: Mapping[str, Any]) -> list[Figure]:
    """Bars of the refusal (and over-refusal) rate and of the KL divergences, before/after."""
    base, edited = mapping(report.get("baseline")), mapping(report.get("edited"))
    out = []
    rates = [k for k in RATE_KEYS if number(base.get(k)) is not None or number(edited.get(k))]
    if rates:
        svg = plots.bar_chart(
            [SHORT_LABELS[k] for k in rates],
            [
                plots.BarSeries(
                    "baseline", [number(base.get(k)) for k in rates], plots.BASELINE_COLOR
                ),
                plots.BarSeries(
                    "abliterated", [number(edited.get(k)) for k in rates], plots.EDITED_COLOR
                ),
            ],
            title="Refusal rate before and after",
            y_label="fraction of prompts",
            y_max=1.0,
            value_format=_pct,
            width=420,
        )
        out.append(
            Figure("rates", svg, "Share of evaluation prompts the judge counted as refused.")
        )
    kls = [k for k in KL_KEYS if number(edited.get(k)) is not None]
    if kls:
        svg = plots.bar_chart(
            [SHORT_LABELS[k] for k in kls],
            [
                plots.BarSeries("baseline", [0.0] * len(kls), plots.BASELINE_COLOR),
                plots.BarSeries(
                    "abliterated", [number(edited.get(k)) for k in kls], plots.EDITED_COLOR
                ),
            ],
            title="KL divergence from the original",
            y_label="nats",
            value_format=lambda v: f"{v:.3g}",
            width=420,
        )
        out.append(
            Figure(
                "kl",
                svg,
                "KL(original ‖ abliterated) on harmless prompts. The unedited "
                "model's KL to itself is 0 by definition; lower is better.",
            )
        )
    return out


def category_figure(report: Mapping[str, Any]) -> Figure | None:
    """Grouped bars of the refusal rate per prompt category, baseline vs. edited."""
    rows = refusal_by_category(report)
    if not rows:
        return None
    svg = plots.bar_chart(
        [r.category for r in rows],
        [
            plots.BarSeries("baseline", [r.baseline_rate for r in rows], plots.BASELINE_COLOR),
            plots.BarSeries("abliterated", [r.edited_rate for r in rows], plots.EDITED_COLOR),
        ],
        title="Refusal rate by category",
        y_label="fraction refused",
        y_max=1.0,
        value_format=_pct,
        width=960,
        height=360,
    )
    n = sum(r.n for r in rows)
    return Figure(
        "categories", svg, f"Harmful evaluation prompts refused, per category ({n} prompts)."
    )


def over_refusal_figure(report: Mapping[str, Any]) -> Figure | None:
    """Grouped bars of the over-refusal rate per category (``over_refusal.by_category``)."""
    base = mapping(mapping(report.get("baseline")).get("over_refusal")).get("by_category")
    edited = mapping(mapping(report.get("edited")).get("over_refusal")).get("by_category")
    base, edited = mapping(base), mapping(edited)
    categories = sorted({*base, *edited})
    if not categories:
        return None
    series = [
        plots.BarSeries(
            "baseline", [number(base.get(c)) for c in categories], plots.BASELINE_COLOR
        ),
        plots.BarSeries(
            "abliterated", [number(edited.get(c)) for c in categories], plots.EDITED_COLOR
        ),
    ]
    if not any(number(v) is not None for s in series for v in s.values):
        return None
    svg = plots.bar_chart(
        categories,
        [s for s in series if any(v is not None for v in s.values)],
        title="Over-refusal by category",
        y_label="fraction refused",
        y_max=1.0,
        value_format=_pct,
        width=960,
        height=340,
    )
    caption = (
        "Harmless but sensitive-sounding prompts the judge counted as refused, per category; "
        "lower is better."
    )
    return Figure("over_refusal", svg, caption)


def _g(value: Any) -> str:
    num = number(value)
    return "–" if num is None else f"{num:.4g}"


def _candidate_tip(s: Mapping[str, Any]) -> str:
    text = (
        f"layer {s.get('layer')}/{s.get('site')}: refusal {_g(s.get('screen_refusal'))}, "
        f"KL {_g(s.get('screen_kl'))} (screen)"
    )
    if number(s.get("refusal")) is not None:
        text += f"; validation refusal {_g(s.get('refusal'))}, KL {_g(s.get('kl'))}"
    if s.get("same_as"):
        text += f"; same vector as {s['same_as']}"
    return text


def candidate_figures(scores: Mapping[str, Any] | None) -> list[Figure]:
    """Per-layer refusal score and KL of every candidate, one line per site, chosen marked."""
    scores = scores or {}
    entries = [s for s in scores.get("scores", []) or [] if isinstance(s, Mapping)]
    if not entries:
        return []
    # Residual order (pre, mid, post) keeps each site's colour the same in every report.
    order: dict[str, int] = {site: i for i, site in enumerate(SITES)}
    sites = sorted(
        dict.fromkeys(str(s.get("site")) for s in entries),
        key=lambda site: order.get(site, len(order)),
    )
    key = (scores.get("layer"), scores.get("site"))
    chosen = next((s for s in entries if (s.get("layer"), s.get("site")) == key), None)

    def series(metric: str) -> list[plots.Series]:
        out = []
        for i, site in enumerate(sites):
            rows = [s for s in entries if str(s.get("site")) == site]
            points = [(_nan(s.get("layer")), _nan(s.get(metric))) for s in rows]
            color = plots.PALETTE[i % len(plots.PALETTE)]
            out.append(plots.Series(site, points, color, [_candidate_tip(s) for s in rows]))
        return out

    def mark(metric: str) -> list[plots.Highlight]:
        if chosen is None or number(chosen.get(metric)) is None:
            return []
        label = f"chosen: {chosen.get('layer')}/{chosen.get('site')}"
        return [plots.Highlight(_nan(chosen.get("layer")), float(chosen[metric]), label)]

    base_score = number(scores.get("baseline_refusal_score"))
    refs = [plots.RefLine(base_score, "unedited model")] if base_score is not None else []
    figures = [
        Figure(
            "candidates_refusal",
            plots.line_chart(
                series("screen_refusal"),
                title="Refusal score by layer",
                x_label="layer",
                y_label="refusal log-odds",
                highlights=mark("screen_refusal"),
                ref_lines=refs,
                width=960,
            ),
            "Refusal score (log-odds of refusal tokens) on harmful validation prompts with each "
            "candidate direction ablated; lower means fewer refusals.",
        )
    ]
    kls = [v for s in entries if (v := number(s.get("screen_kl"))) is not None]
    if kls:
        positive = [v for v in kls if v > 0]
        # KL spans orders of magnitude across layers; a log axis keeps small values readable.
        log_y = len(positive) == len(kls) and max(positive) / min(positive) > 100
        threshold = number(scores.get("kl_threshold"))
        kl_refs = [plots.RefLine(threshold, "KL threshold")] if threshold is not None else []
        figures.append(
            Figure(
                "candidates_kl",
                plots.line_chart(
                    series("screen_kl"),
                    title="KL divergence by layer",
                    x_label="layer",
                    y_label="KL (nats)",
                    highlights=mark("screen_kl"),
                    ref_lines=kl_refs,
                    log_y=log_y,
                    width=960,
                ),
                "First-token KL(original ‖ ablated) on harmless validation prompts"
                + (" (log scale)" if log_y else "")
                + "; lower means less collateral damage.",
            )
        )
    return figures


def optimization_trials(report: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], Any]:
    """The trials and the chosen trial's number from ``report["optimization"]``.

    Accepts ``{"trials": [...], "chosen": N | {"number": N, ...}}`` or a bare list of trials;
    returns ``([], None)`` when the run was not optimized.
    """
    opt = report.get("optimization")
    trials: Any = opt.get("trials") if isinstance(opt, Mapping) else opt
    if not isinstance(trials, list):
        return [], None
    chosen = opt.get("chosen") if isinstance(opt, Mapping) else None
    if isinstance(chosen, Mapping):
        chosen = chosen.get("number")
    return [t for t in trials if isinstance(t, Mapping)], chosen


def refusal_objective(report: Mapping[str, Any]) -> str:
    """Name of the quantity in the trials' ``refusal_score`` field.

    The search names its objectives (``"refusal_prob (harmful val, next token)"``); the first
    word of the first one says whether trials hold a probability or log-odds.
    """
    objectives = mapping(report.get("optimization")).get("objectives")
    if isinstance(objectives, list) and objectives and isinstance(objectives[0], str):
        return objectives[0].split()[0]
    return "refusal_score"


def pareto_figure(report: Mapping[str, Any]) -> Figure | None:
    """Scatter of optimization trials (refusal score vs. KL), the Pareto front joined, the
    chosen trial ringed."""
    trials, chosen = optimization_trials(report)
    drawable = [
        t
        for t in trials
        if number(t.get("kl")) is not None and number(t.get("refusal_score")) is not None
    ]
    if not drawable:
        return None

    def tip(t: Mapping[str, Any]) -> str:
        params = json.dumps(t.get("params", {}), sort_keys=True)
        score, kl = _g(t["refusal_score"]), _g(t["kl"])
        return f"trial {t.get('number')}: refusal {score}, KL {kl}, {params}"

    def points(rows: list[Mapping[str, Any]]) -> list[tuple[float, float]]:
        return [(float(t["kl"]), float(t["refusal_score"])) for t in rows]

    front = [t for t in drawable if t.get("pareto")]
    rest = [t for t in drawable if not t.get("pareto")]
    kls = [float(t["kl"]) for t in drawable]
    log_x = min(kls) > 0 and max(kls) / min(kls) > 100
    highlights = [
        plots.Highlight(float(t["kl"]), float(t["refusal_score"]), f"chosen: trial {chosen}")
        for t in drawable
        if chosen is not None and t.get("number") == chosen
    ]
    objective = refusal_objective(report)
    # The unedited model's value of the refusal objective, when the search recorded it.
    baseline = number(mapping(mapping(report.get("optimization")).get("baseline")).get(objective))
    refs = [plots.RefLine(baseline, "unedited model")] if baseline is not None else []
    svg = plots.scatter_chart(
        [
            plots.Series("trials", points(rest), "#A7B0BA", [tip(t) for t in rest]),
            plots.Series("Pareto front", points(front), plots.PALETTE[0], [tip(t) for t in front]),
        ],
        joined=[False, True],
        title="Optimization: refusal vs. KL",
        x_label="KL divergence (nats)" + (", log scale" if log_x else ""),
        y_label=objective.replace("_", " "),
        highlights=highlights,
        ref_lines=refs,
        log_x=log_x,
        width=960,
        height=380,
    )
    caption = (
        f"{len(trials)} trials; the front joins those that no other trial beats on both refusal "
        "and KL. Lower left is better."
    )
    return Figure("pareto", svg, caption)


def strength_figure(report: Mapping[str, Any]) -> Figure | None:
    """Per-layer ablation strengths, drawn only when they differ between layers."""
    edit = mapping(report.get("edit"))
    attn = [number(v) for v in edit.get("attention", []) or []]
    mlp = [number(v) for v in edit.get("mlp", []) or []]
    values = {v for v in attn + mlp if v is not None}
    if len(values) < 2:
        return None  # uniform strengths are said in one sentence instead
    svg = plots.line_chart(
        [
            plots.Series("attention", [(i, _nan(v)) for i, v in enumerate(attn)], plots.PALETTE[0]),
            plots.Series("MLP", [(i, _nan(v)) for i, v in enumerate(mlp)], plots.PALETTE[1]),
        ],
        title="Ablation strength by layer",
        x_label="layer",
        y_label="strength",
        width=960,
        height=280,
    )
    return Figure("strengths", svg, "Per-layer strength of the edit on each residual writer.")


def all_figures(report: Mapping[str, Any], scores: Mapping[str, Any] | None) -> list[Figure]:
    """Every figure the report's data supports, in reading order."""
    head = [category_figure(report), over_refusal_figure(report)]
    tail = [pareto_figure(report), strength_figure(report)]
    return [
        *before_after_figures(report),
        *(f for f in head if f is not None),
        *candidate_figures(scores),
        *(f for f in tail if f is not None),
    ]


def write_figures(directory: Path, figures: list[Figure]) -> str:
    """Write each figure to ``directory/NAME.svg``; return Markdown that shows them.

    The Markdown refers to the files relative to the directory's parent (the run directory),
    so it can be appended to ``report.md``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for f in figures:
        (directory / f"{f.name}.svg").write_text(f.svg, encoding="utf-8")
        lines += [f"![{f.caption}]({directory.name}/{f.name}.svg)", ""]
    return "\n".join(lines)
