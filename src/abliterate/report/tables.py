"""Markdown tables of a report's breakdowns.

Prompts and responses are model input and output: every cell of them goes through
:func:`abliterate.report.format.text`, which HTML-escapes them, so that markup in them stays
text in any Markdown viewer, and their pipes cannot split a table row.
The tables: every candidate direction's scores (:func:`scores_table`), refusals per harmful
category (:func:`category_table`) and KL divergences per harmless category
(:func:`kl_category_table`).
"""

from __future__ import annotations

from abliterate.report.breakdown import CategoryRefusals
from abliterate.report.format import MISSING, fixed, text
from abliterate.report.html import kl_meaning
from abliterate.report.schema import Report, SelectionScores


def scores_table(scores: SelectionScores) -> str:
    """A Markdown table of every candidate with a bar for its screening refusal score."""
    rows = scores.scores
    lo = min(s.screen_refusal for s in rows)
    hi = max(s.screen_refusal for s in rows)
    span = (hi - lo) or 1.0
    lines = [
        "| layer | site | refusal (screen) | KL (screen) | refusal (val) | KL (val) | |",
        "|---:|:---|---:|---:|---:|---:|:---|",
    ]
    for s in rows:
        bar = "█" * max(1, round(12 * (s.screen_refusal - lo) / span))
        chosen = " ◀ chosen" if (s.layer, s.site) == (scores.layer, scores.site) else ""
        val_r = f"{s.refusal:.2f}" if s.refusal is not None else ""
        val_k = f"{s.kl:.3f}" if s.kl is not None else ""
        lines.append(
            f"| {s.layer} | {s.site} | {s.screen_refusal:.2f} | {s.screen_kl:.3f} | {val_r} | "
            f"{val_k} | `{bar}`{chosen} |"
        )
    return "\n".join(lines)


def category_table(
    rows: list[CategoryRefusals], labels: tuple[str, str] = ("baseline", "abliterated")
) -> str:
    """A Markdown table of per-category refusal rates (baseline, edited, change)."""

    def cell(count: int | None, n: int) -> str:
        return MISSING if count is None else f"{100 * count / n:.0f}% ({count}/{n})"

    lines = [
        f"| category | prompts | {labels[0]} refused | {labels[1]} refused | change |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        change = "" if r.baseline is None else f"{100 * (r.edited - r.baseline) / r.n:+.0f} pp"
        lines.append(
            f"| {text(r.category)} | {r.n} | {cell(r.baseline, r.n)} | {cell(r.edited, r.n)} "
            f"| {change} |"
        )
    return "\n".join(lines)


def kl_category_table(report: Report) -> list[str]:
    """The KL divergences per category of the harmless prompts (nothing when not measured)."""
    by_category = report.edited.kl_by_category
    if not by_category:
        return []
    lines = [
        "",
        "## KL divergence by kind of request",
        "",
        f"{kl_meaning(report)} on the harmless evaluation prompts of each category: where the "
        "model moved on requests it should answer as before.",
        "",
        "| category | prompts | first-token KL | multi-token KL |",
        "|---|---:|---:|---:|",
    ]
    for cat, kl in by_category.items():
        lines.append(
            f"| {text(cat)} | {kl.n} | {fixed(kl.kl_divergence)} | "
            f"{fixed(kl.kl_divergence_multi_token)} |"
        )
    return lines
