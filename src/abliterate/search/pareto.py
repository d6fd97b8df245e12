"""Trials as reported, the Pareto front, the documented choice rule and its renderings.

``report.json`` carries every trial as ``{"number", "refusal", "refusal_prob", "kl", "params",
"pareto", "confirmed_refusal_rate"?, "rescored"?, "strengths"?, "refined_from"?}`` plus
``"chosen"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrialRecord:
    """One finished trial as reported (the ``report.json`` ``optimization.trials`` entries).

    Attributes:
        number: The Optuna trial number.
        refusal, kl: The search's objective values (in the search's precision).
        params: The trial's point of the search space.
        pareto: On the Pareto front the choice was made on.
        confirmed_refusal_rate: Judged refusal rate of its generated answers, if confirmed.
        refusal_prob: The next-token refusal proxy (for comparison with ``refusal``).
        rescored: ``{"refusal", "kl"}`` in the model's own precision, where re-scored.
        strengths: ``{"attention", "mlp"}`` per-layer strengths replacing the profiles'
            (a trial refined by descent from trial ``refined_from``).
        refined_from: The trial a refined trial descended from.
    """

    number: int
    refusal: float
    kl: float
    params: dict[str, Any]
    pareto: bool = False
    confirmed_refusal_rate: float | None = None
    refusal_prob: float | None = None
    rescored: dict[str, float] | None = None
    strengths: dict[str, list[float]] | None = None
    refined_from: int | None = None

    def values(self, rescored: bool = False) -> tuple[float, float]:
        """``(refusal, kl)``: the re-scored ones when asked (and present)."""
        if rescored and self.rescored is not None:
            return self.rescored["refusal"], self.rescored["kl"]
        return self.refusal, self.kl

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the optional entries only where present."""
        out = asdict(self)
        return {k: v for k, v in out.items() if v is not None}


def pareto_front(records: Sequence[TrialRecord], rescored: bool = False) -> list[TrialRecord]:
    """Records not dominated in (refusal, kl), sorted by KL (``rescored``: by the values in
    the model's precision, see :meth:`TrialRecord.values`)."""

    def dominates(o: TrialRecord, r: TrialRecord) -> bool:
        (a, b), (c, d) = o.values(rescored), r.values(rescored)
        return a <= c and b <= d and (a < c or b < d)

    front = [r for r in records if not any(dominates(o, r) for o in records)]
    return sorted(front, key=lambda r: (r.values(rescored)[1], r.values(rescored)[0]))


def choose(
    front: Sequence[TrialRecord],
    confirm: Callable[[TrialRecord], float],
    target: float,
    max_confirm: int,
    rescored: bool = False,
) -> tuple[TrialRecord, bool]:
    """The lowest-KL front trial whose confirmed refusal rate is at most ``target``.

    Along the front (sorted by KL) refusals fall as KL rises, so the first trial that meets
    the target is found by bisection: the most compliant end is confirmed first, then the
    midpoint of the interval that still contains the boundary, at most ``max_confirm`` times.
    Each confirmation's rate is stored on the record. Returns ``(chosen, met_target)``; when no
    confirmed trial meets the target, the one with the lowest confirmed rate (then KL). KL is
    the re-scored one with ``rescored`` (:meth:`TrialRecord.values`).
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
        return min(meeting, key=lambda r: r.values(rescored)[1]), True
    return min(confirmed, key=lambda r: (r.confirmed_refusal_rate, r.values(rescored)[1])), False
