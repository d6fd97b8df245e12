"""The charts of a report, drawn with matplotlib as SVG that can be inlined in HTML.

Each chart is a function of the typed report (or of the selection scores) that returns a
:class:`Figure`, or None when the report lacks its data; :func:`all_figures` lists them in
reading order. A new chart is a function of a dozen lines: open a canvas with :func:`_canvas`,
draw on its axes, return :func:`_finish`.

Figures are plain :class:`matplotlib.figure.Figure` objects, never pyplot's global figure
manager, so nothing outlives a call and no backend is selected. The style is applied with
``rc_context`` around each figure only. Text stays text in the SVG (``svg.fonttype = none``):
the page's readers can search and copy it, and tests can read it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from html import escape
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, PercentFormatter
from matplotlib.typing import RcKeyType

from abliterate.report.breakdown import refusal_by_category
from abliterate.report.format import pct, side_labels
from abliterate.report.optimization import pareto_front
from abliterate.report.schema import AblationEdit, ModelResult, Report, SelectionScores
from abliterate.types import SITES

# Okabe & Ito (2008): distinguishable under the common forms of colour blindness.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#999999")
BASELINE_COLOR = "#8C96A3"  # the unedited model: a quiet grey-blue
EDITED_COLOR = "#D55E00"  # the edited model: the palette's vermillion
MUTED_COLOR = "#A7B0BA"  # points that are context, not the message
INK, FAINT = "#1d232b", "#5b6673"

STYLE: dict[RcKeyType, Any] = {
    "svg.fonttype": "none",  # text as <text>, not glyph outlines
    "text.parse_math": False,  # category names may contain "$"; they are text, not TeX
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#8a939e",
    "axes.labelcolor": INK,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.titlecolor": INK,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e3e6ea",
    "grid.linewidth": 0.8,
    "xtick.color": FAINT,
    "ytick.color": FAINT,
    "legend.frameon": False,
    "legend.fontsize": 9,
    "figure.facecolor": "white",
}
# Without these keys matplotlib writes an RDF block with remote namespace URLs and a date,
# which would make every report differ and look like remote references.
_NO_METADATA: dict[str, str | None] = {"Creator": None, "Date": None, "Format": None, "Type": None}
WIDE, NARROW = 9.6, 4.6  # inches: a full-width chart, half of a row of two


@dataclass(frozen=True)
class Figure:
    """One chart.

    Attributes:
        name: Stable identifier (``candidates_refusal``), also the file stem under ``plots/``.
        title: The chart's title, also its accessible name.
        svg: The SVG document, without XML declaration, ready to inline.
        caption: Plain-text explanation shown under the chart.
    """

    name: str
    title: str
    svg: str
    caption: str


@contextmanager
def _canvas(name: str, height: float, width: float = WIDE) -> Iterator[tuple[MplFigure, Axes]]:
    # The salt makes the SVG's internal ids differ between figures inlined in one page (they
    # are hashes), and the same for the same figure in every run.
    with matplotlib.rc_context({**STYLE, "svg.hashsalt": name}):
        fig = MplFigure(figsize=(width, height), layout="constrained")
        yield fig, fig.add_subplot()


def _finish(fig: MplFigure, ax: Axes, name: str, title: str, caption: str) -> Figure:
    """The SVG of a drawn canvas (call inside its ``_canvas`` block, where the style holds)."""
    ax.set_title(title)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata=_NO_METADATA)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]  # the XML declaration and DOCTYPE cannot be inlined
    head_end = svg.index(">") + 1
    label = escape(title, quote=True)
    svg = (
        svg[:4]
        + f' role="img" aria-label="{label}"'
        + svg[4:head_end]
        + f"<title>{label}</title>"
        + svg[head_end:]
    )
    return Figure(name, title, svg, caption)


Series = tuple[str, Sequence[float | None], str]
"""A bar series: legend name, one value per category (None: not measured), colour."""


def _grouped_bars(
    ax: Axes, labels: Sequence[str], series: Sequence[Series], fmt: Callable[[float], str]
) -> None:
    """One group of bars per label, one bar per series, each bar labelled with its value."""
    width = 0.8 / len(series)
    for i, (name, values, color) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        drawn = [(j + offset, v) for j, v in enumerate(values) if v is not None]
        bars = ax.bar(
            [x for x, _ in drawn], [v for _, v in drawn], width * 0.92, label=name, color=color
        )
        ax.bar_label(bars, labels=[fmt(v) for _, v in drawn], padding=2, fontsize=8, color=FAINT)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 8 else 0)
    ax.grid(axis="x", visible=False)


def _pct0(value: float) -> str:
    return pct(value, 0)


def _rate_bars(ax: Axes, labels: Sequence[str], series: Sequence[Series], y_label: str) -> None:
    _grouped_bars(ax, labels, series, _pct0)
    # Headroom above 100% for the value labels (and a legend inside the plot).
    ax.set_ylim(0, 1.18)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel(y_label)


def _sides(report: Report) -> list[tuple[str, str, ModelResult]]:
    """Legend name, colour and results of each model a report measured (baseline first)."""
    base_label, edited_label = side_labels(report.command)
    edited = [(edited_label, EDITED_COLOR, report.edited)]
    if report.baseline is None:
        return edited
    return [(base_label, BASELINE_COLOR, report.baseline), *edited]


def rates_figure(report: Report) -> Figure:
    """Bars of the refusal (and over-refusal) rate, baseline and edited."""
    sides = _sides(report)
    keys = ["refusal rate"]
    if any(r.over_refusal_rate is not None for *_, r in sides):
        keys.append("over-refusal rate")
    series: list[Series] = [
        (name, [r.refusal_rate, r.over_refusal_rate][: len(keys)], color)
        for name, color, r in sides
    ]
    with _canvas("rates", 3.4, NARROW) as (fig, ax):
        _rate_bars(ax, keys, series, "fraction of prompts")
        ax.legend(loc="upper right", ncols=len(series))
        caption = "Share of evaluation prompts the judge counted as refused."
        return _finish(fig, ax, "rates", "Refusal rate before and after", caption)


def kl_figure(report: Report) -> Figure | None:
    """Bars of the first-token and multi-token KL divergence from the reference model."""
    edited = report.edited
    if edited.kl_divergence is None:
        return None

    def kls(m: ModelResult) -> list[float]:
        values = [m.kl_divergence or 0.0]
        if edited.kl_divergence_multi_token is not None:
            values.append(m.kl_divergence_multi_token or 0.0)
        return values

    labels = ["first-token KL", "multi-token KL"][: len(kls(edited))]
    # A baseline without its own KL is the reference itself: 0 by definition. heal measures
    # both models against the original, so both bars are measured values.
    series = [(name, kls(m), color) for name, color, m in _sides(report)]
    if report.baseline is None:
        series.insert(0, ("reference", [0.0] * len(labels), BASELINE_COLOR))
    top = max(v for _, values, _ in series for v in values)
    with _canvas("kl", 3.4, NARROW) as (fig, ax):
        _grouped_bars(ax, labels, series, lambda v: f"{v:.3g}")
        ax.legend(loc="upper right", ncols=len(series))
        ax.set_ylim(0, top * 1.3 or 1.0)
        ax.set_ylabel("nats")
        caption = (
            f"{_kl_meaning(report)} on harmless prompts. A model's KL to itself is 0 by "
            "definition; lower is better."
        )
        return _finish(fig, ax, "kl", "KL divergence from the original", caption)


def _kl_meaning(report: Report) -> str:
    """What the KL divergences of a report compare (heal: both models against the original)."""
    if report.command == "heal":
        return "KL(original ‖ model)"
    return "KL({} ‖ {})".format(*side_labels(report.command))


def kl_category_figure(report: Report) -> Figure | None:
    """Bars of the first-token and multi-token KL per category of the harmless prompts."""
    by_category = report.edited.kl_by_category
    if not by_category:
        return None
    labels = list(by_category)
    series: list[Series] = [
        ("first-token KL", [c.kl_divergence for c in by_category.values()], PALETTE[0]),
        ("multi-token KL", [c.kl_divergence_multi_token for c in by_category.values()],
         PALETTE[1]),
    ]  # fmt: skip
    highest = max(max(c.kl_divergence, c.kl_divergence_multi_token) for c in by_category.values())
    with _canvas("kl_categories", 3.8) as (fig, ax):
        _grouped_bars(ax, labels, series, lambda v: f"{v:.2g}")
        ax.set_ylim(0, highest * 1.25 or 1.0)
        ax.set_ylabel("nats")
        _legend_above(ax)
        n = sum(c.n for c in by_category.values())
        caption = (
            f"{_kl_meaning(report)} on the harmless evaluation prompts ({n}), per category: "
            "where the model moved on requests it should answer as before. Lower is better."
        )
        return _finish(fig, ax, "kl_categories", "KL divergence by kind of request", caption)


def loss_figure(report: Report) -> Figure | None:
    """The training loss by optimizer step (``sft``, ``heal``)."""
    training = report.training
    if training is None or not training.losses:
        return None
    with _canvas("loss", 3.4) as (fig, ax):
        steps = [p.step for p in training.losses]
        ax.plot(steps, [p.loss for p in training.losses], color=EDITED_COLOR, marker=".",
                label="training loss")  # fmt: skip
        if training.resumed_from_step is not None:
            ax.axvline(training.resumed_from_step, color=FAINT, linestyle=":", linewidth=1,
                       label=f"resumed at step {training.resumed_from_step}")  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        _legend_above(ax)
        caption = (
            f"{training.method.upper()} loss logged during training ({training.steps} steps, "
            f"{training.n_examples} examples)."
        )
        return _finish(fig, ax, "loss", "Training loss", caption)


def category_figure(report: Report) -> Figure | None:
    """Grouped bars of the refusal rate per prompt category, baseline vs. edited."""
    rows = refusal_by_category(report)
    if not rows:
        return None
    values: list[Sequence[float | None]] = [[r.edited_rate for r in rows]]
    if report.baseline is not None:
        values.insert(0, [r.baseline_rate for r in rows])
    series: list[Series] = [
        (name, v, color) for (name, color, _), v in zip(_sides(report), values, strict=True)
    ]
    with _canvas("categories", 3.8) as (fig, ax):
        _rate_bars(ax, [r.category for r in rows], series, "fraction refused")
        _legend_above(ax)
        caption = (
            f"Harmful evaluation prompts refused, per category ({sum(r.n for r in rows)} prompts)."
        )
        return _finish(fig, ax, "categories", "Refusal rate by category", caption)


def over_refusal_figure(report: Report) -> Figure | None:
    """Grouped bars of the over-refusal rate per category (``evaluate`` reports)."""
    sides = [
        (name, color, r.over_refusal.by_category)
        for name, color, r in _sides(report)
        if r.over_refusal is not None
    ]
    categories = sorted({c for *_, by in sides for c in by})
    if not categories:
        return None
    series: list[Series] = [
        (name, [by.get(c) for c in categories], color) for name, color, by in sides
    ]
    with _canvas("over_refusal", 3.6) as (fig, ax):
        _rate_bars(ax, categories, series, "fraction refused")
        _legend_above(ax)
        caption = (
            "Harmless but sensitive-sounding prompts the judge counted as refused, per category; "
            "lower is better."
        )
        return _finish(fig, ax, "over_refusal", "Over-refusal by category", caption)


def _reference(ax: Axes, y: float, label: str) -> None:
    """A dashed horizontal reference line, named in the legend (never over the data)."""
    ax.axhline(y, color=FAINT, linestyle="--", linewidth=1, label=label)


def _log_scale(ax: Axes, axis: str) -> None:
    """A log axis with plain tick labels (0.01, not 10^-2 in TeX, which is not parsed)."""
    scale = ax.set_xscale if axis == "x" else ax.set_yscale
    scale("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def _legend_above(ax: Axes) -> None:
    """The legend in one row above the plot's right end, level with the left-aligned title."""
    n = len(ax.get_legend_handles_labels()[0])
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=n, borderaxespad=0.2)


def _ring(ax: Axes, x: float, y: float, label: str) -> None:
    """Ring and name one point (the chosen candidate or trial)."""
    ax.plot([x], [y], "o", markersize=12, fillstyle="none", color=INK, markeredgewidth=1.4)
    ax.annotate(label, (x, y), xytext=(9, 7), textcoords="offset points", fontsize=9, color=INK)


def _site_lines(ax: Axes, scores: SelectionScores, metric: str) -> None:
    """One line per site over the layers, the chosen candidate ringed, the pruning marked."""
    # Residual order (pre, mid, post) keeps each site's colour the same in every report.
    for i, site in enumerate(SITES):
        rows = [s for s in scores.scores if s.site == site]
        if rows:
            ys = [getattr(s, metric) for s in rows]
            ax.plot(
                [s.layer for s in rows],
                ys,
                marker="o",
                markersize=3.5,
                linewidth=1.6,
                color=PALETTE[i],
                label=site,
                gid=f"site-{site}",
            )
    chosen = [s for s in scores.scores if (s.layer, s.site) == (scores.layer, scores.site)]
    for s in chosen:
        _ring(ax, s.layer, getattr(s, metric), f"chosen: {s.layer}/{s.site}")
    ax.axvline(
        scores.max_layer + 0.5,
        color=FAINT,
        linestyle=":",
        linewidth=1.2,
        label=f"pruned above layer {scores.max_layer}",
    )
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def candidate_figures(scores: SelectionScores | None) -> list[Figure]:
    """Per-layer refusal score and KL of every candidate direction, one line per site."""
    if scores is None or not scores.scores:
        return []
    with _canvas("candidates_refusal", 3.6) as (fig, ax):
        _site_lines(ax, scores, "screen_refusal")
        _reference(ax, scores.baseline_refusal_score, "unedited model")
        _legend_above(ax)
        ax.set_ylabel("refusal log-odds")
        caption = (
            "Refusal score (log-odds of refusal tokens) on the screening harmful validation "
            "prompts with each candidate direction ablated; lower means fewer refusals."
        )
        refusal = _finish(fig, ax, "candidates_refusal", "Refusal score by layer", caption)
    kls = [s.screen_kl for s in scores.scores]
    # KL spans orders of magnitude across layers; a log axis keeps small values readable.
    log_y = min(kls) > 0 and max(kls) / min(kls) > 100
    with _canvas("candidates_kl", 3.6) as (fig, ax):
        _site_lines(ax, scores, "screen_kl")
        _reference(ax, scores.kl_threshold, "KL threshold")
        _legend_above(ax)
        if log_y:
            _log_scale(ax, "y")
        ax.set_ylabel("KL (nats)")
        caption = (
            "First-token KL(original ‖ ablated) on harmless validation prompts"
            + (" (log scale)" if log_y else "")
            + "; lower means less collateral damage."
        )
        kl = _finish(fig, ax, "candidates_kl", "KL divergence by layer", caption)
    return [refusal, kl]


def pareto_figure(report: Report) -> Figure | None:
    """Every optimization trial (refusal probability against KL), the Pareto front joined and
    the chosen trial ringed."""
    opt = report.optimization
    if opt is None or not opt.trials:
        return None
    front = pareto_front(opt)
    rest = [t for t in opt.trials if not t.pareto]
    with _canvas("pareto", 4.0) as (fig, ax):
        ax.scatter(
            [t.kl for t in rest],
            [t.objective_refusal for t in rest],
            s=16,
            color=MUTED_COLOR,
            label="trial",
            gid="pareto-trials",
            zorder=2,
        )
        ax.plot(
            [t.kl for t in front],
            [t.objective_refusal for t in front],
            color=PALETTE[0],
            linewidth=1.4,
            zorder=3,
        )
        ax.scatter(
            [t.kl for t in front],
            [t.objective_refusal for t in front],
            s=24,
            color=PALETTE[0],
            label="Pareto front",
            gid="pareto-front",
            zorder=4,
        )
        _ring(ax, opt.chosen.kl, opt.chosen.objective_refusal, f"chosen: trial {opt.chosen.number}")
        _reference(ax, opt.baseline.objective_refusal, "unedited model")
        _legend_above(ax)
        log_x = all(t.kl > 0 for t in opt.trials)
        if log_x:
            _log_scale(ax, "x")
        ax.set_xlabel("first-token KL divergence (nats)" + (", log scale" if log_x else ""))
        ax.set_ylabel("refusal probability (next token)")
        caption = (
            f"{len(opt.trials)} trials on validation prompts; the front joins those that no "
            "other trial beats on both refusal probability and KL. Lower left is better."
        )
        return _finish(fig, ax, "pareto", "Optimization: refusal vs. KL", caption)


def strength_figure(report: Report) -> Figure | None:
    """Per-layer strengths of an ablation edit, drawn only when they differ between layers
    (uniform strengths are said in one sentence instead)."""
    edit = report.edit
    if not isinstance(edit, AblationEdit) or len({*edit.attention, *edit.mlp}) < 2:
        return None
    with _canvas("strengths", 3.0) as (fig, ax):
        for values, label, color in (
            (edit.attention, "attention", PALETTE[0]),
            (edit.mlp, "MLP", PALETTE[1]),
        ):
            ax.plot(
                range(len(values)),
                values,
                marker="o",
                markersize=3.5,
                linewidth=1.6,
                color=color,
                label=label,
                gid=f"strength-{label}",
            )
        ax.set_ylim(bottom=0)
        ax.set_xlabel("layer")
        ax.set_ylabel("strength")
        _legend_above(ax)
        caption = "Per-layer strength of the edit on each kind of residual writer."
        return _finish(fig, ax, "strengths", "Ablation strength by layer", caption)


def steering_figure(report: Report) -> Figure | None:
    """The steering metric against strength (``steer --sweep``), the evaluated strength ringed."""
    steering = report.steering
    if steering is None or not steering.sweep:
        return None
    points = sorted(steering.sweep, key=lambda p: p.strength)
    with _canvas("steering_sweep", 3.6) as (fig, ax):
        ax.plot(
            [p.strength for p in points],
            [p.value for p in points],
            marker="o",
            markersize=4,
            linewidth=1.6,
            color=PALETTE[0],
            label=steering.metric,
            gid="steering-sweep",
        )
        chosen = [p for p in points if p.strength == steering.strength]
        for p in chosen:
            _ring(ax, p.strength, p.value, f"evaluated: {p.strength:g}")
        if steering.metric == "refusal":
            ax.set_ylim(-0.02, 1.05)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("strength" + (" (ablation)" if steering.mode == "remove" else ""))
        ax.set_ylabel(steering.metric_unit)
        caption = (
            f"{steering.metric.capitalize()} ({steering.metric_unit}) of greedy answers to "
            f"{steering.metric_prompts.n} prompts ({steering.metric_prompts.name}) at each "
            f"strength; strength 0 is the model without steering."
        )
        return _finish(fig, ax, "steering_sweep", "Steering: metric against strength", caption)


def detox_figure(report: Report) -> Figure | None:
    """DINM's loss terms at every Adam step, instance after instance (``detox``)."""
    detox = report.detox
    if detox is None or not detox.records:
        return None
    records = detox.records if detox.mode == "sequence" else detox.records[:1]
    nll = [v for r in records for v in r.nll]
    kl = [v for r in records for v in r.kl]
    with _canvas("detox_losses", 3.6) as (fig, ax):
        steps = range(1, len(nll) + 1)
        ax.plot(steps, nll, linewidth=1.4, color=PALETTE[0], label="safe answer NLL", gid="nll")
        ax.plot(steps, kl, linewidth=1.4, color=PALETTE[1], label="knowledge KL", gid="kl")
        for i in range(1, len(records)):
            ax.axvline(i * detox.steps + 0.5, color=MUTED_COLOR, linewidth=0.6)
        if min([*nll, *kl]) > 0:
            _log_scale(ax, "y")
        ax.set_xlabel("Adam step" + (" (instance after instance)" if len(records) > 1 else ""))
        ax.set_ylabel("nats per token")
        _legend_above(ax)
        layers = sorted({r.layer for r in detox.records})
        caption = (
            f"DINM on {len(detox.records)} instances ({detox.mode}): the safe answer's negative "
            f"log-likelihood and the KL on the general-knowledge answer at each step; tuned "
            f"layers {', '.join(map(str, layers))}."
        )
        return _finish(fig, ax, "detox_losses", "Detoxification: DINM losses", caption)


def all_figures(report: Report, scores: SelectionScores | None = None) -> list[Figure]:
    """Every figure the report's data supports, in reading order."""
    optional = [
        kl_figure(report),
        kl_category_figure(report),
        loss_figure(report),
        category_figure(report),
        over_refusal_figure(report),
        *candidate_figures(scores),
        pareto_figure(report),
        strength_figure(report),
        steering_figure(report),
        detox_figure(report),
    ]
    return [rates_figure(report), *(f for f in optional if f is not None)]
