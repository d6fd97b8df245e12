"""Automatic choice of the refusal direction among the per-layer, per-site candidates.

Following Arditi et al., each candidate is scored by ablating it from every residual writer and
measuring (a) the refusal score on harmful validation prompts and (b) the first-token KL
divergence on harmless validation prompts; candidates from the last layers are discarded. To
keep this affordable on a CPU it runs in two stages:

1. *screen*: every distinct candidate on the first ``n_screen`` prompts of each kind;
2. *final*: the ``n_finalists`` best screened candidates on the whole validation split.

The chosen candidate is the finalist with the lowest refusal score among those whose KL is at
most ``kl_threshold`` and whose refusal score is below the unedited model's. If none qualifies,
the run says so and picks the best trade-off: the finalist closest to the ideal point (lowest
refusal score, lowest KL) after min-max normalising both over the finalists.

Reports: ``report.json`` (every number, for scripts), ``report.md`` (for people) and the
before/after table printed at the end of a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from abliterate.search.selection import Selection

if TYPE_CHECKING:
    pass
import json
from pathlib import Path

from abliterate.report.breakdown import category_table, refusal_by_category


def scores_table(selection: Selection) -> str:
    """A Markdown table of every candidate with a bar for its screening refusal score."""
    scores = selection.scores
    lo = min(s.screen_refusal for s in scores)
    hi = max(s.screen_refusal for s in scores)
    span = (hi - lo) or 1.0
    lines = [
        "| layer | site | refusal (screen) | KL (screen) | refusal (val) | KL (val) | |",
        "|---:|:---|---:|---:|---:|---:|:---|",
    ]
    for s in scores:
        bar = "█" * max(1, round(12 * (s.screen_refusal - lo) / span))
        chosen = " ◀ chosen" if (s.layer, s.site) == (selection.layer, selection.site) else ""
        val_r = f"{s.refusal:.2f}" if s.refusal is not None else ""
        val_k = f"{s.kl:.3f}" if s.kl is not None else ""
        lines.append(
            f"| {s.layer} | {s.site} | {s.screen_refusal:.2f} | {s.screen_kl:.3f} | {val_r} | "
            f"{val_k} | `{bar}`{chosen} |"
        )
    return "\n".join(lines)


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def summary_table(report: dict[str, Any]) -> str:
    """The before/after table, as plain text for the terminal."""
    base, edited = report["baseline"], report["edited"]
    n = base["n_prompts"]
    rows = [
        ("", "refusal rate", "first-token KL", "multi-token KL"),
        (
            "baseline",
            f"{_pct(base['refusal_rate'])} ({round(base['refusal_rate'] * n)}/{n})",
            "-",
            "-",
        ),
        (
            "abliterated",
            f"{_pct(edited['refusal_rate'])} ({round(edited['refusal_rate'] * n)}/{n})",
            f"{edited['kl_divergence']:.4f}",
            f"{edited['kl_divergence_multi_token']:.4f}",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _stages_lines(timings: dict[str, dict[str, float]]) -> list[str]:
    """The Markdown table of stage wall times and memory peaks (none when there are none)."""
    if not timings:
        return []
    lines = ["", "## Stages", "", "| stage | seconds | peak RSS (MB) |", "|---|---:|---:|"]
    for name, t in timings.items():
        lines.append(f"| {name} | {t['seconds']:.1f} | {t['peak_rss_mb']:.0f} |")
    return lines


def _quote(text: str) -> str:
    text = text.strip() or "(empty)"
    return "<br>".join(line.replace("|", "\\|") for line in text.splitlines())


def render_markdown(report: dict[str, Any], scores_table: str | None = None) -> str:
    """A self-contained Markdown report."""
    model = report["model"]
    base, edited = report["baseline"], report["edited"]
    sel = report.get("selection", {})
    lines = [
        f"# Abliteration report: {model['name']}",
        "",
        f"abliterate {report['abliterate_version']} · source `{model['source']}` · "
        f"{model['architecture']}",
        "",
        "Plots, every completion and every number: [report.html](report.html).",
        "",
        "## Result",
        "",
        "| model | refusal rate (harmful eval) | first-token KL | multi-token KL |",
        "|---|---:|---:|---:|",
        f"| baseline | {_pct(base['refusal_rate'])} of {base['n_prompts']} | - | - |",
        f"| abliterated | {_pct(edited['refusal_rate'])} of {edited['n_prompts']} | "
        f"{edited['kl_divergence']:.4f} | {edited['kl_divergence_multi_token']:.4f} |",
        "",
        f"KL divergences are KL(original ‖ abliterated) on harmless eval prompts; multi-token KL "
        f"averages the first {edited['kl_tokens']} positions of the original model's own "
        "greedy continuations.",
        "",
        f"Judge: `{base['judge']}`. Evaluation prompts: harmful "
        f"`{report['data']['eval_harmful']['name']}`, harmless "
        f"`{report['data']['eval_harmless']['name']}`.",
        "",
        "## Edit",
        "",
    ]
    opt = report.get("optimization")
    if opt:
        from abliterate.report.optimization import describe_edit, front_plot, pareto_table

        lines += [
            describe_edit(report["edit"]),
            "",
            f"Chosen trial {opt['chosen']['number']} of {len(opt['trials'])}: {opt['rule']}. "
            f"Trials scored in {opt.get('search_dtype', 'the model dtype')}; the evaluation "
            "below uses the model's own dtype.",
            "",
            "## Optimization (validation prompts only)",
            "",
            pareto_table(opt),
            "",
            "```",
            front_plot(opt),
            "```",
        ]
    else:
        lines.append(
            f"Direction from layer {report['edit']['direction']['layer']}, site "
            f"`{report['edit']['direction']['site']}`, removed from the embedding and every "
            "attention and MLP output projection at strength "
            f"{report['edit']['embedding']}."
        )
    if sel:
        lines += ["", f"Selection rule: {sel['rule']}."]
    checks = report.get("checks", {})
    if checks:
        reload = checks["export_reload_max_abs_diff"]
        lines += [
            "",
            "## Checks",
            "",
            f"- hooks vs. orthogonalized weights, max |Δ log-prob|: "
            f"{checks['hooks_vs_weights_max_abs_diff']:.2e}",
            "- saved model reloaded vs. evaluated model, max |Δ logit|: "
            + ("model not saved" if reload is None else f"{reload:.2e}"),
        ]
    categories = refusal_by_category(report)
    if categories:
        lines += ["", "## Refusals by category", "", category_table(categories)]
    n_examples = report.get("n_examples", 4)
    if n_examples:
        lines += ["", "## Examples", "", "| prompt | baseline | abliterated |", "|---|---|---|"]
        pairs = list(zip(base["completions"], edited["completions"], strict=True))
        # Prefer prompts the baseline refused: they show what the edit changed.
        pairs.sort(key=lambda p: (not p[0]["refused"], p[1]["refused"]))
        for b, e in pairs[:n_examples]:
            lines.append(
                f"| {_quote(b['prompt'])} | {_quote(b['response'])} | {_quote(e['response'])} |"
            )
    if scores_table:
        lines += ["", "## Candidate directions", "", scores_table]
    lines += _stages_lines(report.get("timings", {}))
    return "\n".join(lines) + "\n"


def write_reports(directory: Path, report: dict[str, Any], scores_table: str | None) -> None:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``plots/*.svg`` into
    ``directory``.

    The per-layer plots come from ``scores.json`` in the same directory, when the run wrote one.
    """
    from abliterate.report.charts import all_figures, write_figures
    from abliterate.report.html import render_html

    scores_path = directory / "scores.json"
    scores = json.loads(scores_path.read_text()) if scores_path.is_file() else None
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report, scores_table)
    figures = all_figures(report, scores)
    if figures:
        # The same charts as report.html, as SVG files the Markdown can show.
        markdown += "\n## Plots\n\n" + write_figures(directory / "plots", figures)
    (directory / "report.md").write_text(markdown)
    (directory / "report.html").write_text(render_html(report, scores), encoding="utf-8")


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _eval_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = [("baseline", report["baseline"])] if report.get("baseline") else []
    return [*rows, ("model", report["edited"])]


def evaluation_summary_table(report: dict[str, Any]) -> str:
    """The evaluate command's table (refusal, over-refusal, KL, CE), as plain text."""
    header = ("", "refusal", "over-refusal", "first-token KL", "multi-token KL", "reference CE")
    rows = [header]
    for label, m in _eval_rows(report):
        rows.append(
            (
                label,
                _pct(m["refusal_rate"]),
                _pct(m["over_refusal_rate"]),
                _num(m.get("kl_divergence")),
                _num(m.get("kl_divergence_multi_token")),
                _num(m["reference_cross_entropy"], ".3f"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def render_evaluation_markdown(report: dict[str, Any]) -> str:
    """A self-contained Markdown report of ``abliterate evaluate``."""
    model, edited = report["model"], report["edited"]
    rows = _eval_rows(report)
    base_model = report.get("baseline_model")
    lines = [
        f"# Evaluation report: {model['name']}",
        "",
        f"abliterate {report['abliterate_version']} · source `{model['source']}` · "
        f"{model['architecture']}"
        + (f" · baseline `{base_model['name']}`" if base_model else " · no baseline"),
        "",
        "## Result",
        "",
        "| model | refusal (harmful) | over-refusal | first-token KL | multi-token KL "
        "| reference CE (nats/token) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, m in rows:
        lines.append(
            f"| {label} | {_pct(m['refusal_rate'])} of {m['n_prompts']} | "
            f"{_pct(m['over_refusal_rate'])} of {m['over_refusal']['n_prompts']} | "
            f"{_num(m.get('kl_divergence'))} | {_num(m.get('kl_divergence_multi_token'))} | "
            f"{m['reference_cross_entropy']:.3f} |"
        )
    lines.append("")
    if "kl_tokens" in edited:
        lines.append(
            "KL divergences are KL(baseline ‖ model) on harmless prompts; multi-token KL averages "
            f"the first {edited['kl_tokens']} positions of the baseline's own greedy "
            "continuations."
        )
    else:
        lines.append("No baseline was given, so no KL divergence was measured.")
    data = report["data"]
    lines += [
        "",
        f"Prompts: harmful `{data['eval_harmful']['name']}`, harmless "
        f"`{data['eval_harmless']['name']}`, over-refusal `{data['over_refusal']['name']}`, "
        f"reference answers `{data['reference_answers']['name']}`.",
        "",
        "## Judges",
        "",
        f"The first judge (`{report['judges'][0]}`) decides each completion's verdict.",
        "",
        "| model | judge | refusal | over-refusal |",
        "|---|---|---:|---:|",
    ]
    for label, m in rows:
        for name, j in m["judges"].items():
            lines.append(
                f"| {label} | `{name}` | {_pct(j['refusal_rate'])} | "
                f"{_pct(j['over_refusal_rate'])} |"
            )
    if len(report["judges"]) > 1:
        lines += ["", "| model | prompts | judges | agreement | Cohen's kappa |",
                  "|---|---|---|---:|---:|"]  # fmt: skip
        for label, m in rows:
            for kind, pairs in m["judge_agreement"].items():
                for p in pairs:
                    lines.append(
                        f"| {label} | {kind} | `{p['judges'][0]}` vs `{p['judges'][1]}` | "
                        f"{_pct(p['agreement'])} | {_num(p['cohen_kappa'], '.3f')} |"
                    )
    lines += ["", "## Over-refusal by category", "", "| model | category | over-refusal |",
              "|---|---|---:|"]  # fmt: skip
    for label, m in rows:
        for cat, rate in m["over_refusal"]["by_category"].items():
            lines.append(f"| {label} | {cat} | {_pct(rate)} |")
    lines += ["", "## Fluency of generated answers", "",
              "Mean over answers of distinct-n (share of unique word n-grams) and n-gram entropy "
              "(bits).", "",
              "| model | prompts | distinct-1 | distinct-2 | distinct-3 | entropy-1 | entropy-2 "
              "| entropy-3 |", "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, m in rows:
        for kind, f in m["fluency"].items():
            cells = [_num(f[f"distinct_{n}"], ".3f") for n in (1, 2, 3)]
            cells += [_num(f[f"entropy_{n}"], ".2f") for n in (1, 2, 3)]
            lines.append(f"| {label} | {kind} | " + " | ".join(cells) + " |")
    if "benchmarks" in edited:
        lines += ["", "## Benchmarks (lm-evaluation-harness, zero-shot)", "",
                  "| model | task | items | acc | acc_norm |",
                  "|---|---|---:|---:|---:|"]  # fmt: skip
        for label, m in rows:
            for task, s in m["benchmarks"].items():
                lines.append(
                    f"| {label} | {task} | {s['n']} | {_num(s.get('acc'), '.3f')} ± "
                    f"{_num(s.get('acc_stderr'), '.3f')} | {_num(s.get('acc_norm'), '.3f')} |"
                )
    n_examples = report.get("n_examples", 4)
    if n_examples and report.get("baseline"):
        lines += ["", "## Examples", "", "| prompt | baseline | model |", "|---|---|---|"]
        pairs = list(zip(report["baseline"]["completions"], edited["completions"], strict=True))
        pairs.sort(key=lambda p: (not p[0]["refused"], p[1]["refused"]))
        for b, e in pairs[:n_examples]:
            lines.append(
                f"| {_quote(b['prompt'])} | {_quote(b['response'])} | {_quote(e['response'])} |"
            )
    lines += _stages_lines(report.get("timings", {}))
    return "\n".join(lines) + "\n"


def write_evaluation_reports(directory: Path, report: dict[str, Any]) -> None:
    """Write the evaluate command's ``report.json``, ``report.md`` and ``report.html``."""
    from abliterate.report.html import render_html

    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "report.md").write_text(render_evaluation_markdown(report))
    (directory / "report.html").write_text(render_html(report), encoding="utf-8")
