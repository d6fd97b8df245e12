"""The Pareto front of search trials and the documented choice rule, on golden examples and on
any generated set of trials (hypothesis).

A trial dominates another when it is no worse in both refusal score and KL and better in one.
The front holds exactly the undominated trials, sorted by KL; :func:`choose` confirms trials
along it by bisection, within its budget, and returns the lowest-KL confirmed trial that meets
the target (or, when none does, the one with the lowest confirmed rate).
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abliterate.search.pareto import TrialRecord, choose, pareto_front

LAWS = settings(max_examples=50, deadline=None)


def _records(points: list[tuple[float, float]]) -> list[TrialRecord]:
    return [TrialRecord(i, r, k, {}) for i, (r, k) in enumerate(points)]


def _dominates(a: TrialRecord, b: TrialRecord) -> bool:
    return (
        a.refusal_score <= b.refusal_score
        and a.kl <= b.kl
        and (a.refusal_score < b.refusal_score or a.kl < b.kl)
    )


def test_pareto_front_keeps_only_non_dominated_sorted_by_kl() -> None:
    recs = _records([(0.9, 0.01), (0.5, 0.05), (0.6, 0.06), (0.1, 0.3), (0.1, 0.4), (0.0, 1.0)])
    front = pareto_front(recs)
    assert [r.number for r in front] == [0, 1, 3, 5]
    for r in recs:
        if r not in front:  # every excluded record is dominated by a front member
            assert any(f.refusal_score <= r.refusal_score and f.kl <= r.kl for f in front)


def test_choose_finds_lowest_kl_trial_meeting_target_by_bisection() -> None:
    # A front of 9 trials: refusals fall as KL rises; the first with a rate <= 0.05 is #6.
    rates = [0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.02, 0.0]
    front = _records([(1.0 - i / 10, 0.01 * (i + 1)) for i in range(9)])
    calls: list[int] = []

    def confirm(rec: TrialRecord) -> float:
        calls.append(rec.number)
        return rates[rec.number]

    chosen, met = choose(front, confirm, target=0.05, max_confirm=6)
    assert met and chosen.number == 6
    # The most compliant end first, then the midpoints of (-1, 8], (3, 8], (5, 8]: 6 meets it
    # and 5 does not, so the boundary is found after four generations.
    assert calls == [8, 3, 5, 6]
    assert len(calls) == len(set(calls)) <= 6  # no trial is confirmed twice
    assert all(front[i].confirmed_refusal_rate == rates[i] for i in calls)

    # Nothing reaches the target: the lowest confirmed rate is chosen and met is False.
    fresh = _records([(1.0 - i / 10, 0.01 * (i + 1)) for i in range(9)])
    chosen, met = choose(fresh, lambda r: 0.5 + 0.01 * (8 - r.number), 0.05, 6)
    assert not met and chosen.number == 8


def test_choose_refuses_an_empty_front_and_reports_only_confirmed_rates() -> None:
    with pytest.raises(ValueError, match="no completed trials"):
        choose([], lambda r: 0.0, 0.05, 3)
    record = TrialRecord(3, 0.2, 0.1, {"a": 1}, pareto=True)
    assert record.to_dict() == {"number": 3, "refusal_score": 0.2, "kl": 0.1,
                                "params": {"a": 1}, "pareto": True}  # fmt: skip
    record.confirmed_refusal_rate = 0.25
    assert record.to_dict()["confirmed_refusal_rate"] == 0.25


# --- properties ------------------------------------------------------------------------------

# A coarse grid makes ties and duplicate points common; free floats cover the rest.
SCORE = st.one_of(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), st.floats(0.0, 1.0))
KL = st.one_of(st.sampled_from([0.0, 0.01, 0.1, 1.0]), st.floats(0.0, 5.0))
POINTS = st.lists(st.tuples(SCORE, KL), min_size=1, max_size=25)


@LAWS
@given(POINTS)
def test_the_front_is_exactly_the_undominated_records_sorted_by_kl(
    points: list[tuple[float, float]],
) -> None:
    records = _records(points)
    front = pareto_front(records)
    on_front = {id(f) for f in front}
    assert len(on_front) == len(front)  # no record twice
    assert on_front <= {id(r) for r in records}  # the records themselves, not copies
    for f in front:  # no front member is dominated by any record
        assert not any(_dominates(r, f) for r in records), f
    for r in records:  # every other record is dominated by a front member
        if id(r) not in on_front:
            assert any(_dominates(f, r) for f in front), r
    # Sorted by KL; along the front refusals strictly fall as KL rises (equal points tie).
    for a, b in itertools.pairwise(front):
        assert (a.kl, a.refusal_score) <= (b.kl, b.refusal_score)
        if a.kl < b.kl:
            assert a.refusal_score > b.refusal_score
        else:
            assert a.refusal_score == b.refusal_score
    # The extremes are on it: the lowest KL (best score among those) and the lowest score.
    assert front[0].kl == min(r.kl for r in records)
    assert min(f.refusal_score for f in front) == min(r.refusal_score for r in records)


@st.composite
def choices(draw: st.DrawFn) -> tuple[list[TrialRecord], list[float], float, int, bool]:
    """A front, the rate each trial would confirm at, a target and a budget.

    With ``monotone`` the rates fall along the front as the rule assumes; otherwise they are
    arbitrary. Some trials may already carry a confirmed rate (a resumed study).
    """
    front = pareto_front(_records(draw(POINTS)))
    monotone = draw(st.booleans())
    rate = st.sampled_from([0.0, 0.02, 0.05, 0.1, 0.5, 1.0])
    rates = draw(st.lists(rate, min_size=len(front), max_size=len(front)))
    if monotone:
        rates.sort(reverse=True)
    for rec, r in zip(front, rates, strict=True):
        if draw(st.integers(0, 9)) == 0:
            rec.confirmed_refusal_rate = r
    target = draw(st.sampled_from([0.0, 0.05, 0.1, 0.5]))
    return front, rates, target, draw(st.integers(1, 8)), monotone


@LAWS
@given(choices())
def test_choose_follows_the_documented_rule(
    case: tuple[list[TrialRecord], list[float], float, int, bool],
) -> None:
    front, rates, target, max_confirm, monotone = case
    already = {id(r) for r in front if r.confirmed_refusal_rate is not None}
    calls: list[TrialRecord] = []

    def confirm(rec: TrialRecord) -> float:
        calls.append(rec)
        return rates[front.index(rec)]

    chosen, met = choose(front, confirm, target, max_confirm)
    # The budget holds, nothing is confirmed twice, and stored rates are what was confirmed.
    assert len(calls) <= max_confirm
    assert len({id(c) for c in calls}) == len(calls)
    assert not {id(c) for c in calls} & already
    for i, rec in enumerate(front):
        if id(rec) in {id(c) for c in calls}:
            assert rec.confirmed_refusal_rate == rates[i]
    if id(front[-1]) not in already:  # the most compliant end is confirmed first
        assert calls[0] is front[-1]
    # The choice: a front member; the lowest-KL confirmed trial meeting the target when one
    # exists, else the lowest confirmed rate.
    assert any(chosen is f for f in front)
    confirmed = [r for r in front if r.confirmed_refusal_rate is not None]
    meeting = [r for r in confirmed if r.confirmed_refusal_rate <= target]  # type: ignore[operator]
    assert met == bool(meeting)
    if met:
        assert chosen.confirmed_refusal_rate is not None
        assert chosen.confirmed_refusal_rate <= target
        assert chosen.kl == min(r.kl for r in meeting)
    else:
        assert chosen.confirmed_refusal_rate == min(
            r.confirmed_refusal_rate
            for r in confirmed  # type: ignore[type-var]
        )
    # With rates falling along the front and budget for a full bisection, the choice is the
    # lowest-KL trial of the whole front that meets the target.
    full_bisection = 1 + math.ceil(math.log2(len(front))) if len(front) > 1 else 1
    if monotone and max_confirm >= full_bisection:
        first = next((i for i, r in enumerate(rates) if r <= target), None)
        assert met == (first is not None)
        if first is not None:
            assert chosen.kl == front[first].kl


def test_choose_needs_a_confirmation_budget() -> None:
    front = [TrialRecord(0, 0.1, 0.01, {}, pareto=True)]
    with pytest.raises(ValueError, match="max_confirm"):
        choose(front, lambda r: 0.0, 0.05, 0)
