"""How a report's completions break down: per category, and side by side.

Harmful prompt sets may tag each prompt with a category (the built-in set does: cybercrime,
drugs, weapons, ...). An edit that removes refusals on average can still leave whole categories
untouched, so reports show the refusal rate per category for the baseline and the edited model,
and pick their side-by-side examples from as many categories as possible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from abliterate.report.schema import Completion, Report

UNCATEGORISED = "(none)"


@dataclass(frozen=True)
class CategoryRefusals:
    """Refusal counts of one category.

    Attributes:
        category: The category name (``(none)`` for prompts without one).
        n: Prompts in the category.
        baseline: Prompts the baseline refused, or None when the report has no baseline.
        edited: Prompts the edited model refused.
    """

    category: str
    n: int
    baseline: int | None
    edited: int

    @property
    def baseline_rate(self) -> float | None:
        """Fraction of the category the baseline refused."""
        return None if self.baseline is None else self.baseline / self.n

    @property
    def edited_rate(self) -> float:
        """Fraction of the category the edited model refused."""
        return self.edited / self.n


def _counts(completions: Sequence[Completion]) -> tuple[dict[str, int], dict[str, int]]:
    totals: dict[str, int] = {}
    refused: dict[str, int] = {}
    for c in completions:
        cat = c.category or UNCATEGORISED
        totals[cat] = totals.get(cat, 0) + 1
        refused[cat] = refused.get(cat, 0) + c.refused
    return totals, refused


def refusal_by_category(report: Report) -> list[CategoryRefusals]:
    """Per-category refusal counts of the baseline and edited completions, by category name.

    Returns an empty list when no completion carries a category, since a single "(none)" row
    would only repeat the overall refusal rate.
    """
    edited = report.edited.completions
    base = report.baseline.completions if report.baseline else []
    if not any(c.category for c in [*edited, *base]):
        return []
    edited_totals, edited_refused = _counts(edited)
    base_totals, base_refused = _counts(base)
    out = []
    for cat in sorted(edited_totals.keys() | base_totals.keys()):
        # Both sides answer the same prompts; take the size from whichever side saw the category.
        n = max(edited_totals.get(cat, 0), base_totals.get(cat, 0))
        out.append(
            CategoryRefusals(
                category=cat,
                n=n,
                baseline=base_refused.get(cat, 0) if report.baseline else None,
                edited=edited_refused.get(cat, 0),
            )
        )
    return out


@dataclass(frozen=True)
class Pair:
    """The baseline's and the edited model's completion of one prompt; a side that did not
    answer the prompt is None."""

    baseline: Completion | None
    edited: Completion | None

    @property
    def prompt(self) -> str:
        """The prompt both sides answered."""
        side = self.baseline or self.edited
        assert side is not None, "a pair has at least one side"
        return side.prompt

    @property
    def category(self) -> str | None:
        """The prompt's category, from whichever side has one."""
        for side in (self.baseline, self.edited):
            if side is not None and side.category:
                return side.category
        return None


def pair_completions(base: Sequence[Completion], edited: Sequence[Completion]) -> list[Pair]:
    """Baseline and edited completions of the same prompts, in prompt order."""
    if len(base) == len(edited) and all(
        b.prompt == e.prompt for b, e in zip(base, edited, strict=True)
    ):
        return [Pair(b, e) for b, e in zip(base, edited, strict=True)]
    # Different prompt lists: match by prompt text, leaving the missing side empty.
    by_prompt = {e.prompt: e for e in edited}
    pairs = [Pair(b, by_prompt.pop(b.prompt, None)) for b in base]
    return pairs + [Pair(None, e) for e in by_prompt.values()]


def _changed_first(pair: Pair) -> tuple[bool, bool]:
    # Sorts pairs the baseline refused and the edit answered before everything else.
    base_refused = pair.baseline is not None and pair.baseline.refused
    edited_refused = pair.edited is not None and pair.edited.refused
    return not base_refused, edited_refused


def pick_examples(pairs: Sequence[Pair], n: int) -> list[Pair]:
    """``n`` pairs that show the edit, from as many categories as possible.

    Pairs the baseline refused and the edited model answered come first (they show what the
    edit changed), then the rest; within that order, one pair per category goes before any
    second one, so the examples are not all from the first category of the prompt set.
    """
    ranked = sorted(pairs, key=_changed_first)
    seen: dict[str | None, int] = {}
    order = []
    for i, pair in enumerate(ranked):
        seen[pair.category] = seen.get(pair.category, 0) + 1
        order.append((_changed_first(pair), seen[pair.category], i))
    return [ranked[i] for *_, i in sorted(order)[:n]]
