"""Reports: ``report.json`` (every number, for scripts), ``report.md`` (for people) and the
before/after table printed at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
        from abliterate.pareto import describe_edit, front_plot, pareto_table

        lines += [
            describe_edit(report["edit"]),
            "",
            f"Chosen trial {opt['chosen']['number']} of {len(opt['trials'])}: {opt['rule']}.",
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
    timings = report.get("timings", {})
    if timings:
        lines += ["", "## Stages", "", "| stage | seconds | peak RSS (MB) |", "|---|---:|---:|"]
        for name, t in timings.items():
            lines.append(f"| {name} | {t['seconds']:.1f} | {t['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def write_reports(directory: Path, report: dict[str, Any], scores_table: str | None) -> None:
    """Write ``report.json`` and ``report.md`` into ``directory``."""
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "report.md").write_text(render_markdown(report, scores_table))
