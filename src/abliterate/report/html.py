"""``report.html``: one self-contained page with charts, tables and side-by-side completions.

The page is rendered from the typed :class:`~abliterate.report.schema.Report` (and the
selection's scores, when there are any) by the Jinja2 templates in ``templates/``, with
autoescaping on: every piece of text from a report (model outputs, prompts, model names,
categories) reaches the page as text. The CSS and the SVG charts are inline, and a
Content-Security-Policy forbids scripts and remote loads outright as a second line of defence,
so the page opens offline and can be mailed around.

This module prepares what the templates show (rows of measurements with their change, cards,
example pairs); the templates only lay it out. Sections render only when their data is there,
so the same page serves ``run``, ``optimize`` and ``evaluate`` reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from abliterate.errors import ConfigError
from abliterate.files import write_text
from abliterate.report.breakdown import pair_completions, pick_examples, refusal_by_category
from abliterate.report.charts import Figure, all_figures
from abliterate.report.files import write_figures
from abliterate.report.format import MISSING, fixed, leaf, pct, sci, side_labels, sig
from abliterate.report.optimization import pareto_front
from abliterate.report.schema import (
    AblationEdit,
    AgreementPair,
    ModelResult,
    Report,
    SelectionScores,
    Training,
    TrialParams,
    load_report,
    load_scores,
)

# No scripts, no remote loads: the page is data, and model outputs inside it stay inert.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

_ENV = Environment(
    loader=PackageLoader("abliterate.report", "templates"),
    autoescape=True,
    undefined=StrictUndefined,  # a misspelt field fails the tests instead of vanishing
    trim_blocks=True,
    lstrip_blocks=True,
)


def _params(params: TrialParams) -> str:
    """A trial's parameters as ``name=value, ...`` (spaces let a long list wrap)."""
    return ", ".join(f"{k}={leaf(v)}" for k, v in params.model_dump(exclude_none=True).items())


_ENV.filters.update(pct=pct, fixed=fixed, sig=sig, sci=sci, leaf=leaf, params=_params)


@dataclass(frozen=True)
class Row:
    """A measurement of the baseline and the edited model, formatted, with the change."""

    label: str
    baseline: str
    edited: str
    change: str


@dataclass(frozen=True)
class Card:
    """A headline number: ``before → after``, or the value alone without a baseline."""

    label: str
    before: str | None
    after: str
    note: str


Value = float | int | str | None
Measure = tuple[str, Callable[[ModelResult], Value], bool]
"""A table row: label, how to read the value from one model's results, whether it is a rate."""

_MEASURES: list[Measure] = [
    ("refusal rate (harmful eval)", lambda m: m.refusal_rate, True),
    ("unfinished answers (reasoning past the token budget)", lambda m: m.unfinished_rate, True),
    ("over-refusal rate (harmless but edgy prompts)", lambda m: m.over_refusal_rate, True),
    ("first-token KL (harmless eval)", lambda m: m.kl_divergence, False),
    ("multi-token KL (harmless eval)", lambda m: m.kl_divergence_multi_token, False),
    ("multi-token KL positions", lambda m: m.kl_tokens, False),
    ("harmful eval prompts", lambda m: m.n_prompts, False),
    ("refusal judge", lambda m: m.judge, False),
    ("reference cross-entropy (nats/token)", lambda m: m.reference_cross_entropy, False),
]
_FLUENCY = ("distinct_1", "distinct_2", "distinct_3", "entropy_1", "entropy_2", "entropy_3")


def _cell(value: Value, rate: bool) -> str:
    if isinstance(value, str):
        return value
    return pct(value) if rate else sig(value)


def _row(label: str, base: Value, edited: Value, *, rate: bool) -> Row:
    change = ""
    numbers = [v for v in (base, edited) if isinstance(v, int | float)]
    if len(numbers) == 2 and base != edited:
        delta = numbers[1] - numbers[0]
        change = f"{100 * delta:+.1f} pp" if rate else f"{delta:+.4g}"
    return Row(label, _cell(base, rate), _cell(edited, rate), change)


def _fluency(kind: str, metric: str) -> Callable[[ModelResult], Value]:
    def read(m: ModelResult) -> Value:
        fluency = None if m.fluency is None else getattr(m.fluency, kind)
        return None if fluency is None else getattr(fluency, metric)

    return read


def measurement_rows(report: Report) -> list[Row]:
    """Baseline vs. edited for every measurement either model has, fluency included."""
    base, edited = report.baseline, report.edited
    measures = _MEASURES + [
        (f"fluency ({kind.replace('_', '-')}) · {metric}", _fluency(kind, metric), False)
        for kind in ("harmful", "over_refusal")
        for metric in _FLUENCY
    ]
    rows = []
    for label, read, rate in measures:
        b, e = (read(base) if base else None), read(edited)
        if b is not None or e is not None:
            rows.append(_row(label, b, e, rate=rate))
    return rows


def judge_rows(report: Report) -> list[Row]:
    """Every judge's rates (and an LLM judge's unparsable answers), baseline vs. edited."""
    base = report.baseline.judges if report.baseline and report.baseline.judges else {}
    edited = report.edited.judges or {}
    rows = []
    for name in dict.fromkeys([*base, *edited]):
        b, e = base.get(name), edited.get(name)
        for label, rate, read in (
            ("refusal rate", True, lambda j: j.refusal_rate),
            ("over-refusal rate", True, lambda j: j.over_refusal_rate),
            ("unparsed answers (harmful)", False, lambda j: j.n_unparsed and j.n_unparsed.harmful),
            (
                "unparsed answers (over-refusal)",
                False,
                lambda j: j.n_unparsed and j.n_unparsed.over_refusal,
            ),
        ):
            vb, ve = (read(b) if b else None), (read(e) if e else None)
            if vb is not None or ve is not None:
                rows.append(_row(f"{name} · {label}", vb, ve, rate=rate))
    return rows


def agreement_rows(report: Report) -> list[tuple[str, str, AgreementPair]]:
    """Every pairwise judge agreement as ``(model, prompt set, pair)``."""
    rows = []
    labels = side_labels(report.command)
    for label, result in zip(labels, (report.baseline, report.edited), strict=True):
        if result is not None and result.judge_agreement is not None:
            by_set = result.judge_agreement
            for kind, pairs in by_set.items():
                rows += [(label, kind.replace("_", "-"), p) for p in pairs]
    return rows


def benchmark_rows(report: Report) -> list[Row]:
    """Every benchmark metric, baseline vs. edited, labelled ``task · metric``."""
    base = report.baseline.benchmarks if report.baseline and report.baseline.benchmarks else {}
    edited = report.edited.benchmarks or {}
    rows = []
    for task in dict.fromkeys([*base, *edited]):
        b, e = base.get(task), edited.get(task)
        metrics = dict.fromkeys([*(b.metrics if b else {}), *(e.metrics if e else {})])
        rows.append(_row(f"{task} · items", b.n if b else None, e.n if e else None, rate=False))
        for metric in metrics:
            rows.append(
                _row(
                    f"{task} · {metric}",
                    b.metric(metric) if b else None,
                    e.metric(metric) if e else None,
                    rate=False,
                )
            )
    return rows


def cards(report: Report) -> list[Card]:
    """The summary's headline numbers: refusal and over-refusal rates, KL divergences."""
    base, edited = report.baseline, report.edited
    sides = " → ".join(side_labels(report.command))
    out = []
    for label, read in (
        ("Refusal rate", lambda m: m.refusal_rate),
        ("Over-refusal", lambda m: m.over_refusal_rate),
    ):
        after = read(edited)
        if after is None:
            continue
        before = None if base is None else read(base)
        note = "no baseline measured" if base is None else sides
        if label == "Refusal rate":
            note += f", {edited.n_prompts} harmful prompts, judge {edited.judge}"
        out.append(Card(label, None if before is None else pct(before), pct(after), note))
    kl_note = f"{kl_meaning(report)}, nats, harmless prompts"
    for label, read in (
        ("First-token KL", lambda m: m.kl_divergence),
        ("Multi-token KL", lambda m: m.kl_divergence_multi_token),
    ):
        after = read(edited)
        if after is None:
            continue
        # heal measures both models against the original; elsewhere the baseline is the reference.
        before = None if base is None else read(base)
        note = kl_note
        if label == "Multi-token KL" and edited.kl_tokens:
            note += f", first {edited.kl_tokens} positions"
        out.append(Card(label, None if before is None else fixed(before), fixed(after), note))
    return out


def kl_meaning(report: Report) -> str:
    """What the KL divergences of a report compare."""
    if report.command == "heal":
        return "KL(original ‖ model)"
    return "KL({} ‖ {})".format(*side_labels(report.command))


def training_facts(training: Training) -> list[tuple[str, str]]:
    """A training record as ``(label, value)`` pairs."""
    facts = [
        ("method", f"{training.method.upper()} ({', '.join(training.loss_type or [])})"
         if training.loss_type else training.method.upper()),
        ("adapter", training.adapter + (f" (r {training.lora_r}, alpha {training.lora_alpha})"
                                        if training.lora_r else "")),
        ("data", training.data),
        ("training examples", str(training.n_examples)),
        ("held-out examples", str(training.n_heldout)),
        ("optimizer steps", str(training.steps)),
        ("examples per step", str(training.batch_size)),
        ("learning rate", sig(training.learning_rate)),
    ]  # fmt: skip
    if training.beta is not None:
        facts.append(("DPO beta", sig(training.beta)))
    if training.losses:
        first, last = training.losses[0].loss, training.losses[-1].loss
        facts.append(("training loss, first → last logged", f"{sig(first)} → {sig(last)}"))
    if training.heldout_loss_before is not None:
        before, after = training.heldout_loss_before, training.heldout_loss_after
        facts.append(("held-out loss before → after", f"{sig(before)} → {sig(after)}"))
    if training.resumed_from_step is not None:
        facts.append(("resumed from checkpoint at step", str(training.resumed_from_step)))
    for name, count in (training.pairs or {}).items():
        facts.append((f"pairs: {name.replace('_', ' ')}", str(count)))
    facts.append(("training wall time", f"{training.seconds:.0f} s"))
    return facts


def edit_facts(report: Report) -> list[tuple[str, str]]:
    """The edit as ``(label, value)`` pairs: an ablation's direction and embedding strength,
    or every key of an edit of another kind."""
    edit = report.edit
    if edit is None:
        return []
    if not isinstance(edit, AblationEdit):
        return [("kind", edit.kind)] + [(k, leaf(v)) for k, v in (edit.model_extra or {}).items()]
    d = edit.direction
    facts = [
        ("kind", edit.kind),
        ("mode", edit.mode.replace("_", "-")),
        ("direction layer", sig(d.layer)),
        ("direction site", d.site),
    ]
    if d.d_model is not None:
        facts.append(("d_model", str(d.d_model)))
    if d.scale is not None:
        facts.append(("mean-difference norm", sig(d.scale)))
    facts.append(("embedding strength", sig(edit.embedding)))
    if edit.layer_directions:
        facts.append(("directions", "each layer its own"))
    if edit.extra_directions:
        facts.append(("further directions", str(len(edit.extra_directions))))
    return facts


def uniform_strength(report: Report) -> float | None:
    """The one strength of an ablation applied alike to every attention and MLP writer."""
    edit = report.edit
    if not isinstance(edit, AblationEdit):
        return None
    strengths = {*edit.attention, *edit.mlp}
    return strengths.pop() if len(strengths) == 1 else None


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf of a JSON value as ``(path, value)``, e.g. ``("edit.mlp[3]", 1.0)``."""
    if isinstance(value, dict):
        return [
            leaf_
            for k, v in value.items()
            for leaf_ in flatten(v, f"{prefix}.{k}" if prefix else str(k))
        ]
    if isinstance(value, list):
        return [leaf_ for i, v in enumerate(value) for leaf_ in flatten(v, f"{prefix}[{i}]")]
    return [(prefix, value)]


def without_completions(value: Any) -> Any:
    """A JSON value with every ``"completions"`` entry removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_completions(v) for k, v in value.items() if k != "completions"}
    if isinstance(value, list):
        return [without_completions(v) for v in value]
    return value


def every_number(
    report: Report, scores: SelectionScores | None
) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Every value of ``report.json`` (completions have their own tables) and ``scores.json``,
    leaf by leaf, per file."""
    files = [("report.json", flatten(without_completions(report.model_dump(mode="json"))))]
    if scores is not None:
        files.append(("scores.json", flatten(scores.model_dump(mode="json"))))
    return files


def _context(report: Report, scores: SelectionScores | None, figures: Sequence[Figure]) -> dict:
    base, edited = report.baseline, report.edited
    pairs = pair_completions(base.completions if base else [], edited.completions)
    over_pairs = pair_completions(
        base.over_refusal.completions if base and base.over_refusal else [],
        edited.over_refusal.completions if edited.over_refusal else [],
    )
    return {
        "report": report,
        "scores": scores,
        "figures": {f.name: Markup(f.svg) for f in figures},  # matplotlib escaped their text
        "captions": {f.name: f.caption for f in figures},
        "csp": Markup(CSP),  # a constant without user text; its quotes are read as written
        "missing": MISSING,
        "cards": cards(report),
        "categories": refusal_by_category(report),
        "measurements": measurement_rows(report),
        "judge_rows": judge_rows(report),
        "agreement": agreement_rows(report),
        "benchmark_rows": benchmark_rows(report),
        "edit_facts": edit_facts(report),
        "uniform_strength": uniform_strength(report),
        "front": pareto_front(report.optimization) if report.optimization else [],
        "pairs": pairs,
        "examples": pick_examples(pairs, report.n_examples),
        "over_pairs": over_pairs,
        "numbers": every_number(report, scores),
        "labels": side_labels(report.command),
        "training_facts": training_facts(report.training) if report.training else [],
    }


def render_html(
    report: Report,
    scores: SelectionScores | None = None,
    figures: Sequence[Figure] | None = None,
) -> str:
    """The self-contained HTML page of a report.

    Args:
        report: The typed report.
        scores: The selection's candidate scores (``scores.json``), for the per-layer charts.
        figures: The charts to show; drawn from ``report`` and ``scores`` when not given.
    """
    if figures is None:
        figures = all_figures(report, scores)
    return _ENV.get_template("report.html.j2").render(_context(report, scores, figures))


def write_run_report(run: Path) -> Path:
    """Render ``run/report.html`` and ``run/plots/*.svg`` from the run's JSON; return the page.

    Reports written by abliterate 0.1.0 (without ``schema_version``) are migrated on reading.

    Raises:
        ConfigError: ``run`` has no ``report.json``.
        ReportError: ``report.json`` or ``scores.json`` is malformed or of an unknown version.
    """
    if not (run / "report.json").is_file():
        raise ConfigError(
            f"run: {run} holds no report.json; pass a run directory written by abliterate."
        )
    report = load_report(run / "report.json")
    scores = load_scores(run / "scores.json") if (run / "scores.json").is_file() else None
    figures = all_figures(report, scores)
    write_figures(run / "plots", figures)
    page = run / "report.html"
    write_text(page, render_html(report, scores, figures))
    return page
