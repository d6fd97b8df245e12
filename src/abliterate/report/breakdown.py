"""Per-category refusal breakdown of judged completions (``report.json`` → rows).

Harmful prompt sets may tag each prompt with a category (the built-in set does: cybercrime,
drugs, weapons, ...). An edit that removes refusals on average can still leave whole categories
untouched, so reports show the refusal rate per category for the baseline and the edited model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

UNCATEGORISED = "(none)"


@dataclass(frozen=True)
class CategoryRefusals:
    """Refusal counts of one category.

    Attributes:
        category: The category name (``(none)`` for prompts without one).
        n: Prompts in the category.
        baseline: Prompts the baseline refused, or None when the baseline has no completions.
        edited: Prompts the edited model refused, or None when it has no completions.
    """

    category: str
    n: int
    baseline: int | None
    edited: int | None

    @property
    def baseline_rate(self) -> float | None:
        """Fraction of the category the baseline refused."""
        return None if self.baseline is None else self.baseline / self.n

    @property
    def edited_rate(self) -> float | None:
        """Fraction of the category the edited model refused."""
        return None if self.edited is None else self.edited / self.n


def _counts(completions: Sequence[Mapping[str, Any]]) -> tuple[dict[str, int], dict[str, int]]:
    totals: dict[str, int] = {}
    refused: dict[str, int] = {}
    for c in completions:
        cat = str(c.get("category") or UNCATEGORISED)
        totals[cat] = totals.get(cat, 0) + 1
        refused[cat] = refused.get(cat, 0) + bool(c.get("refused"))
    return totals, refused


def refusal_by_category(report: Mapping[str, Any]) -> list[CategoryRefusals]:
    """Per-category refusal counts of the baseline and edited completions, by category name.

    Returns an empty list when no completion carries a category, since a single "(none)" row
    would only repeat the overall refusal rate.
    """
    sides: dict[str, list[Mapping[str, Any]]] = {}
    for side in ("baseline", "edited"):
        block = report.get(side)
        completions = block.get("completions") if isinstance(block, Mapping) else None
        if isinstance(completions, list) and completions:
            sides[side] = [c for c in completions if isinstance(c, Mapping)]
    if not any(c.get("category") for rows in sides.values() for c in rows):
        return []
    counted = {side: _counts(rows) for side, rows in sides.items()}
    names = sorted({cat for totals, _ in counted.values() for cat in totals})
    out = []
    for cat in names:
        # Both sides answer the same prompts; take the size from whichever side saw the category.
        n = max(totals.get(cat, 0) for totals, _ in counted.values())
        base = counted.get("baseline")
        edit = counted.get("edited")
        out.append(
            CategoryRefusals(
                category=cat,
                n=n,
                baseline=base[1].get(cat, 0) if base else None,
                edited=edit[1].get(cat, 0) if edit else None,
            )
        )
    return out


def category_table(rows: Sequence[CategoryRefusals]) -> str:
    """A Markdown table of per-category refusal rates (baseline, edited, change)."""

    def cell(count: int | None, n: int) -> str:
        return "-" if count is None else f"{100 * count / n:.0f}% ({count}/{n})"

    lines = [
        "| category | prompts | baseline refused | abliterated refused | change |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        change = ""
        if r.baseline is not None and r.edited is not None:
            change = f"{100 * (r.edited - r.baseline) / r.n:+.0f} pp"
        name = r.category.replace("|", "\\|")  # a literal pipe would split the row
        lines.append(
            f"| {name} | {r.n} | {cell(r.baseline, r.n)} | {cell(r.edited, r.n)} | {change} |"
        )
    return "\n".join(lines)
