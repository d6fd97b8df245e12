"""``report.md`` and the table printed at the end of a command, from the typed report.

``report.md`` is for people reading a run directory (or a pull request): the before/after
table, the edit, the optimization or selection behind it, checks, refusals per category,
examples side by side, the candidates' scores, stage times and the charts from ``plots/``.
``evaluate`` reports get their own variant (judges, over-refusal, fluency, benchmarks).

Prompts and responses are model input and output: they are HTML-escaped, so that markup in
them stays text in any Markdown viewer, and their pipes cannot split a table row (the cells:
:func:`abliterate.report.format.text`; the breakdown tables: :mod:`abliterate.report.tables`; the
steering section: :mod:`abliterate.report.steering`).

:func:`write_reports` writes every file of a report (``report.json``, ``report.md``,
``report.html``, ``plots/*.svg``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from abliterate.files import write_text
from abliterate.report.breakdown import pair_completions, pick_examples, refusal_by_category
from abliterate.report.charts import all_figures
from abliterate.report.files import write_figures
from abliterate.report.format import MISSING, code, fixed, pct, sci, side_labels, text
from abliterate.report.html import kl_meaning, render_html, training_facts
from abliterate.report.optimization import describe_edit, front_plot, pareto_table, search_notes
from abliterate.report.schema import AblationEdit, ModelResult, Report, SelectionScores
from abliterate.report.steering import steering_lines
from abliterate.report.tables import category_table, kl_category_table, scores_table


def _quote(response: str) -> str:
    return text(response.strip() or "(empty)")


def _rate_of(result: ModelResult) -> str:
    unfinished = result.n_unfinished or 0
    finished = result.n_prompts - unfinished
    k = round(result.refusal_rate * finished)
    note = f"; {unfinished} unfinished" if unfinished else ""
    return f"{pct(result.refusal_rate)} ({k}/{finished}{note})"


def _rate_cell(result: ModelResult) -> str:
    """A refusal rate "of N prompts", with the unfinished answers it leaves out, if any."""
    cell = f"{pct(result.refusal_rate)} of {result.n_prompts}"
    if result.n_unfinished:
        cell += f" ({result.n_unfinished} unfinished, not counted)"
    return cell


def _unfinished_note(result: ModelResult) -> list[str]:
    if result.n_unfinished is None:
        return []
    return [
        "Reasoning: judges read only the answer after the reasoning block; an answer that never "
        "arrived within the token budget is *unfinished*, reported apart and left out of the "
        "refusal rate.",
        "",
    ]


def _table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of plain-text columns, aligned for the terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def summary_table(report: Report) -> str:
    """The before/after table printed at the end of a command, as plain text."""
    if report.command == "evaluate":
        return _evaluation_summary(report)
    rows = [("", "refusal rate", "first-token KL", "multi-token KL")]
    for label, m in _sides(report):
        # A baseline without KL is the reference itself (run, sft); heal measures both sides.
        first, multi = m.kl_divergence, m.kl_divergence_multi_token
        rows.append(
            (label, _rate_of(m), "-" if first is None else fixed(first),
             "-" if multi is None else fixed(multi))
        )  # fmt: skip
    return _table(rows)


def _sides(report: Report) -> list[tuple[str, ModelResult]]:
    base_label, edited_label = side_labels(report.command)
    rows = [(base_label, report.baseline)] if report.baseline else []
    return [*rows, (edited_label, report.edited)]


def _evaluation_summary(report: Report) -> str:
    rows = [("", "refusal", "over-refusal", "first-token KL", "multi-token KL", "reference CE")]
    for label, m in _sides(report):
        ce = m.reference_cross_entropy
        rows.append(
            (
                label,
                pct(m.refusal_rate),
                pct(m.over_refusal_rate),
                fixed(m.kl_divergence),
                fixed(m.kl_divergence_multi_token),
                fixed(ce, 3),
            )
        )
    return _table(rows)


def _late_lines(report: Report) -> list[str]:
    """How many refusals came after a compliant opening (nothing when not measured)."""
    sides = [(label, m) for label, m in _sides(report) if m.late_refusal_rate is not None]
    if not sides:
        return []
    counts = ", ".join(
        f"{label} {pct(m.late_refusal_rate)} ({m.n_late_refusals}/"
        f"{m.n_prompts - (m.n_unfinished or 0)})"
        for label, m in sides
    )
    return [
        "",
        f"Late refusals (the first refusal phrase comes after the answer's first sentence, as in "
        f'"Sure, here is … However, I cannot …"; counted in the refusal rate): {counts}.',
    ]


def _cache_lines(report: Report) -> list[str]:
    """Where the baseline's evaluation came from (nothing when it could not be cached)."""
    cache = report.baseline_cache
    if cache is None:
        return []
    if cache.hit:
        where = "Baseline from cache: the unedited model's evaluation was read from the cache"
    elif cache.stored:
        where = "Baseline measured and stored in the cache"
    else:
        where = "Baseline measured (the cache could not be written)"
    return ["", f"{where} (key {code(cache.key[:16])})."]


def _stages(report: Report) -> list[str]:
    """The stage wall times and memory peaks (nothing when there are none)."""
    if not report.timings:
        return []
    lines = ["", "## Stages", "", "| stage | seconds | peak RSS (MB) |", "|---|---:|---:|"]
    for name, t in report.timings.items():
        lines.append(f"| {text(name)} | {t.seconds:.1f} | {t.peak_rss_mb:.0f} |")
    return lines


def _examples(report: Report, edited_label: str) -> list[str]:
    """Side-by-side examples, preferring prompts the baseline refused (see pick_examples)."""
    if not report.n_examples or report.baseline is None:
        return []
    pairs = pair_completions(report.baseline.completions, report.edited.completions)
    base_label = side_labels(report.command)[0]
    lines = ["", "## Examples", "", f"| prompt | {base_label} | {edited_label} |", "|---|---|---|"]
    for p in pick_examples(pairs, report.n_examples):
        base = _quote(p.baseline.response) if p.baseline else MISSING
        edited = _quote(p.edited.response) if p.edited else MISSING
        lines.append(f"| {text(p.prompt)} | {base} | {edited} |")
    return lines


def _header(report: Report, title: str) -> list[str]:
    model = report.model
    facts = f"abliterate {text(report.abliterate_version)} · source {code(model.source)}"
    facts += f" · {text(model.architecture)}"
    if report.command == "evaluate":
        facts += (
            f" · baseline {code(report.baseline_model.name)}"
            if report.baseline_model
            else " · no baseline"
        )
    return [f"# {title}: {text(model.name)}", "", facts, ""]


def _prompt_set(report: Report, role: str) -> str:
    record = report.data.get(role)
    return code(record.name) if record else MISSING


def render_markdown(report: Report, scores: SelectionScores | None = None) -> str:
    """A self-contained Markdown report (the ``evaluate`` variant for evaluate reports)."""
    if report.command == "evaluate":
        return _render_evaluation(report)
    return _render_run(report, scores)


def _result_lines(report: Report) -> list[str]:
    edited = report.edited
    lines = [
        "## Result",
        "",
        "| model | refusal rate (harmful eval) | first-token KL | multi-token KL |",
        "|---|---:|---:|---:|",
    ]
    for label, m in _sides(report):
        first, multi = m.kl_divergence, m.kl_divergence_multi_token
        lines.append(
            f"| {label} | {_rate_cell(m)} | "
            f"{'-' if first is None else fixed(first)} | {'-' if multi is None else fixed(multi)} |"
        )
    reference = "original" if report.command in ("heal", "run", "optimize") else "reference"
    lines += [
        "",
        *_unfinished_note(edited),
        f"KL divergences are {kl_meaning(report)} on harmless eval prompts; multi-token KL "
        f"averages the first {edited.kl_tokens} positions of the {reference} model's own greedy "
        "continuations.",
        "",
        f"Judge: {code(edited.judge)}. Evaluation prompts: harmful "
        f"{_prompt_set(report, 'eval_harmful')}, harmless {_prompt_set(report, 'eval_harmless')}.",
        *_late_lines(report),
        *_cache_lines(report),
    ]
    if report.measured_on is not None:
        lines += [
            "",
            "The edit was measured and searched on another copy of the model "
            f"({text(report.measured_on)}); the model evaluated here and exported is the "
            "full-precision checkpoint with the edit baked in.",
        ]
    return lines


def _edit_lines(report: Report) -> list[str]:
    edit, opt = report.edit, report.optimization
    if edit is None and report.selection is None:
        return []  # a trained model (heal, sft) has no edit
    lines = ["", "## Edit", ""]
    if isinstance(edit, AblationEdit) and opt is not None:
        lines += [
            describe_edit(edit),
            "",
            f"Chosen trial {opt.chosen.number} of {len(opt.trials)}: {text(opt.rule)}. "
            f"Trials scored in {text(opt.search_dtype)}; the evaluation below uses the model's "
            "own dtype.",
            "",
            "## Optimization (validation prompts only)",
            "",
            pareto_table(opt),
            "",
            "```",
            front_plot(opt),
            "```",
        ]
        notes = search_notes(opt)
        lines += ["", *notes] if notes else []
    elif isinstance(edit, AblationEdit):
        lines.append(
            f"Direction from layer {edit.direction.layer}, site `{edit.direction.site}`, removed "
            "from the embedding and every attention and MLP output projection at strength "
            f"{edit.embedding:g}."
        )
    elif edit is not None:
        lines.append(f"Edit of kind {code(edit.kind)}; see report.json for its parameters.")
    if report.selection is not None:
        lines += ["", f"Selection rule: {text(report.selection.rule)}."]
        refinement = report.selection.refinement
        if refinement is not None:
            kept = "kept" if refinement.kept else "not kept"
            lines.append(
                f"Per-layer strengths refined by descent: validation KL "
                f"{refinement.start['kl']:.4f} → {refinement.best['kl']:.4f}; {kept}."
            )
    return lines


def _check_lines(report: Report) -> list[str]:
    checks = report.checks
    if checks is None:
        return []
    reload = checks.export_reload_max_abs_diff
    lines = ["", "## Checks", ""]
    if checks.hooks_vs_weights_max_abs_diff is not None:
        lines.append(
            f"- hooks vs. orthogonalized weights, max |Δ log-prob|: "
            f"{sci(checks.hooks_vs_weights_max_abs_diff)}"
        )
    lines.append(
        "- saved model reloaded vs. evaluated model, max |Δ logit|: "
        + ("model not saved" if reload is None else sci(reload))
    )
    return lines


def _training_lines(report: Report) -> list[str]:
    if report.training is None:
        return []
    lines = ["", "## Training", "", "| | |", "|---|---|"]
    lines += [
        f"| {text(label)} | {text(value)} |" for label, value in training_facts(report.training)
    ]
    if report.original_model is not None:
        lines += ["", f"Original model: {code(report.original_model.name)}."]
    return lines


_TITLES = {"heal": "Healing report", "sft": "Fine-tuning report"}


def _render_run(report: Report, scores: SelectionScores | None) -> str:
    lines = [
        *_header(report, _TITLES.get(report.command, "Abliteration report")),
        "Plots, every completion and every number: [report.html](report.html).",
        "",
        *_result_lines(report),
        *kl_category_table(report),
        *_edit_lines(report),
        *_training_lines(report),
        *steering_lines(report),
        *_check_lines(report),
    ]
    categories = refusal_by_category(report)
    if categories:
        lines += [
            "",
            "## Refusals by category",
            "",
            category_table(categories, side_labels(report.command)),
        ]
    lines += _examples(report, side_labels(report.command)[1])
    if scores is not None and scores.scores:
        lines += ["", "## Candidate directions", "", scores_table(scores)]
    lines += _stages(report)
    return "\n".join(lines) + "\n"


def _evaluation_result(report: Report) -> list[str]:
    lines = [
        "## Result",
        "",
        "| model | refusal (harmful) | over-refusal | first-token KL | multi-token KL "
        "| reference CE (nats/token) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, m in _sides(report):
        over_n = m.over_refusal.n_prompts if m.over_refusal else MISSING
        lines.append(
            f"| {label} | {_rate_cell(m)} | "
            f"{pct(m.over_refusal_rate)} of {over_n} | {fixed(m.kl_divergence)} | "
            f"{fixed(m.kl_divergence_multi_token)} | {fixed(m.reference_cross_entropy, 3)} |"
        )
    lines.append("")
    lines += _unfinished_note(report.edited)
    if report.edited.kl_tokens is not None:
        lines.append(
            "KL divergences are KL(baseline ‖ model) on harmless prompts; multi-token KL averages "
            f"the first {report.edited.kl_tokens} positions of the baseline's own greedy "
            "continuations."
        )
    else:
        lines.append("No baseline was given, so no KL divergence was measured.")
    roles = ("eval_harmful", "eval_harmless", "over_refusal", "reference_answers")
    names = [_prompt_set(report, role) for role in roles]
    lines += [
        "",
        f"Prompts: harmful {names[0]}, harmless {names[1]}, over-refusal {names[2]}, "
        f"reference answers {names[3]}.",
        *_late_lines(report),
        *_cache_lines(report),
    ]
    return lines


def _judge_lines(report: Report) -> list[str]:
    first = report.judges[0] if report.judges else report.edited.judge
    lines = [
        "",
        "## Judges",
        "",
        f"The first judge ({code(first)}) decides each completion's verdict.",
        "",
        "| model | judge | refusal | over-refusal |",
        "|---|---|---:|---:|",
    ]
    for label, m in _sides(report):
        for name, j in (m.judges or {}).items():
            lines.append(
                f"| {label} | {text(name)} | {pct(j.refusal_rate)} | {pct(j.over_refusal_rate)} |"
            )
    if report.judges and len(report.judges) > 1:
        lines += [
            "",
            "| model | prompts | judges | agreement | Cohen's kappa |",
            "|---|---|---|---:|---:|",
        ]
        for label, m in _sides(report):
            agreement = m.judge_agreement
            if agreement is None:
                continue
            for kind, pairs in agreement.items():
                for p in pairs:
                    lines.append(
                        f"| {label} | {kind} | {text(p.judges[0])} vs {text(p.judges[1])} | "
                        f"{pct(p.agreement)} | {fixed(p.cohen_kappa, 3)} |"
                    )
    return lines


def _evaluation_extras(report: Report) -> list[str]:
    """Over-refusal by category, fluency and benchmarks of an evaluation."""
    lines = [
        "",
        "## Over-refusal by category",
        "",
        "| model | category | over-refusal |",
        "|---|---|---:|",
    ]
    for label, m in _sides(report):
        for cat, rate in (m.over_refusal.by_category if m.over_refusal else {}).items():
            lines.append(f"| {label} | {text(cat)} | {pct(rate)} |")
    lines += [
        "",
        "## Fluency of generated answers",
        "",
        "Mean over answers of distinct-n (share of unique word n-grams) and n-gram entropy (bits).",
        "",
        "| model | prompts | distinct-1 | distinct-2 | distinct-3 | entropy-1 | entropy-2 "
        "| entropy-3 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in _sides(report):
        if m.fluency is None:
            continue
        for kind, f in m.fluency.items():
            cells = [fixed(v, 3) for v in (f.distinct_1, f.distinct_2, f.distinct_3)]
            cells += [fixed(v, 2) for v in (f.entropy_1, f.entropy_2, f.entropy_3)]
            lines.append(f"| {label} | {kind} | " + " | ".join(cells) + " |")
    if report.edited.benchmarks is not None:
        lines += [
            "",
            "## Benchmarks (lm-evaluation-harness, zero-shot)",
            "",
            "| model | task | items | acc | acc_norm |",
            "|---|---|---:|---:|---:|",
        ]
        for label, m in _sides(report):
            for task, b in (m.benchmarks or {}).items():
                lines.append(
                    f"| {label} | {text(task)} | {b.n} | {fixed(b.metric('acc'), 3)} ± "
                    f"{fixed(b.metric('acc_stderr'), 3)} | {fixed(b.metric('acc_norm'), 3)} |"
                )
    return lines


def _render_evaluation(report: Report) -> str:
    lines = [
        *_header(report, "Evaluation report"),
        "Plots, every completion and every number: [report.html](report.html).",
        "",
        *_evaluation_result(report),
        *kl_category_table(report),
        *_judge_lines(report),
        *_evaluation_extras(report),
        *_examples(report, "model"),
        *_stages(report),
    ]
    return "\n".join(lines) + "\n"


def write_reports(directory: Path, report: Report, scores: SelectionScores | None = None) -> None:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``plots/*.svg`` into
    ``directory``, each atomically.

    Args:
        report: The typed report.
        scores: The selection's candidate scores (also in ``scores.json``), when the command
            selected a direction; they add the per-layer charts and the candidates table.
    """
    write_text(directory / "report.json", report.to_json())
    figures = all_figures(report, scores)
    markdown = render_markdown(report, scores)
    # The same charts as report.html, as SVG files the Markdown can show.
    markdown += "\n## Plots\n\n" + write_figures(directory / "plots", figures)
    write_text(directory / "report.md", markdown)
    write_text(directory / "report.html", render_html(report, scores, figures))
