"""Trials as reported, the Pareto front, the documented choice rule and its renderings.

``report.json`` carries every trial as ``{"number", "refusal_score", "kl", "params", "pareto",
"confirmed_refusal_rate"?}`` plus ``"chosen"``; :func:`pareto_table` and :func:`front_plot`
render exactly that shape for ``report.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrialRecord:
    """One finished trial as reported (the ``report.json`` ``optimization.trials`` entries)."""

    number: int
    refusal_score: float
    kl: float
    params: dict[str, Any]
    pareto: bool = False
    confirmed_refusal_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``confirmed_refusal_rate`` only for confirmed trials."""
        out = asdict(self)
        if self.confirmed_refusal_rate is None:
            del out["confirmed_refusal_rate"]
        return out


def pareto_front(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Records not dominated in (refusal_score, kl), sorted by KL."""
    front = [
        r
        for r in records
        if not any(
            o.refusal_score <= r.refusal_score
            and o.kl <= r.kl
            and (o.refusal_score < r.refusal_score or o.kl < r.kl)
            for o in records
        )
    ]
    return sorted(front, key=lambda r: (r.kl, r.refusal_score))


def choose(
    front: Sequence[TrialRecord],
    confirm: Callable[[TrialRecord], float],
    target: float,
    max_confirm: int,
) -> tuple[TrialRecord, bool]:
    """The lowest-KL front trial whose confirmed refusal rate is at most ``target``.

    Along the front (sorted by KL) refusals fall as KL rises, so the first trial that meets
    the target is found by bisection: the most compliant end is confirmed first, then the
    midpoint of the interval that still contains the boundary, at most ``max_confirm`` times.
    Each confirmation's rate is stored on the record. Returns ``(chosen, met_target)``; when no
    confirmed trial meets the target, the one with the lowest confirmed rate (then KL).
    """
    if not front:
        raise ValueError("the study has no completed trials to choose from")
    if max_confirm < 1:
        raise ValueError(f"max_confirm must be at least 1, got {max_confirm}")
    budget = [max_confirm]

    def rate(i: int) -> float:
        rec = front[i]
        if rec.confirmed_refusal_rate is None:
            budget[0] -= 1
            rec.confirmed_refusal_rate = confirm(rec)
        return rec.confirmed_refusal_rate

    lo, hi = -1, len(front) - 1  # invariant: front[hi] meets the target, front[lo] does not
    if rate(hi) <= target:
        while hi - lo > 1 and budget[0] > 0:
            mid = (lo + hi) // 2
            if rate(mid) <= target:
                hi = mid
            else:
                lo = mid
    confirmed = [r for r in front if r.confirmed_refusal_rate is not None]
    meeting = [r for r in confirmed if r.confirmed_refusal_rate <= target]  # type: ignore[operator]
    if meeting:
        return min(meeting, key=lambda r: r.kl), True
    return min(confirmed, key=lambda r: (r.confirmed_refusal_rate, r.kl)), False
