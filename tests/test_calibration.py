"""Calibration statistics of the cheap refusal objective against the judge, and the comparison
of the search's precision with the model's."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from abliterate.report.schema import Calibration as CalibrationRecord
from abliterate.report.schema import SearchPrecision
from abliterate.search.calibration import Calibration, auc, reliability, spearman
from abliterate.search.pareto import TrialRecord
from abliterate.search.precision import compare_precisions
from abliterate.search.scoring import EditScores

SCORES = st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]), min_size=1, max_size=12)


@given(SCORES, st.data())
def test_auc_is_the_pairwise_win_rate(scores: list[float], data: st.DataObject) -> None:
    labels = data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores)))
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        assert auc(scores, labels) is None
        return
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    assert auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))


def test_spearman_ranks_with_ties() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # constant
    assert spearman([1, 2], [1, 2]) is None  # too few pairs
    with pytest.raises(ValueError, match="pairs"):
        spearman([1, 2, 3], [1, 2])


def test_reliability_bins_cover_every_prediction_once() -> None:
    predicted = [0.0, 0.005, 0.3, 0.35, 0.99, 1.0]
    judged = [False, False, True, False, True, True]
    rows = reliability(predicted, judged)
    assert sum(r["n"] for r in rows) == len(predicted)
    last = rows[-1]
    assert (last["lo"], last["hi"], last["n"], last["judged"]) == (0.8, 1.0, 2, 1.0)
    middle = next(r for r in rows if r["lo"] == 0.2)
    assert middle["predicted"] == pytest.approx(0.325) and middle["judged"] == 0.5


class _Scorer:
    """Stands in for an EditScorer: an 'edit' is a float, predicted as that probability."""

    def score(self, edits: list[float], _per_pass: int) -> list[EditScores]:
        return [
            EditScores(torch.full((3,), e), torch.full((3,), e / 2), torch.zeros(2)) for e in edits
        ]


class _Objective:
    def __init__(self, kl_shift: float = 0.0) -> None:
        self.scorer, self.edits_per_pass, self.shift = _Scorer(), 2, kl_shift
        self.model = torch.nn.Linear(1, 1)

    def many(self, edits: list[float], desc: str | None = None) -> list[dict[str, float]]:
        return [{"refusal": e, "refusal_prob": e / 2, "kl": 1.0 - e + self.shift} for e in edits]


def _records() -> list[TrialRecord]:
    return [TrialRecord(i, r, 1.0 - r, {}) for i, r in enumerate([0.1, 0.4, 0.7])]


def test_calibration_from_confirmations_validates_as_reported() -> None:
    records = _records()
    verdicts = {0: [False, False, False], 1: [False, True, False], 2: [True, True, False]}
    objective: Any = _Objective()
    cal = Calibration.from_confirmations(records, verdicts, objective, lambda r: r.refusal)
    assert cal is not None and cal.n_prompts == 9
    assert [t["number"] for t in cal.trials] == [0, 1, 2]
    assert cal.spearman == pytest.approx(1.0)  # higher predictions, more judged refusals
    assert cal.auc is not None and cal.auc > 0.5
    CalibrationRecord.model_validate(cal.to_dict())
    assert Calibration.from_confirmations(records, {}, objective, lambda r: r.refusal) is None


def test_precision_check_stores_the_rescored_values_and_compares() -> None:
    front = _records()
    check = compare_precisions(front, _Objective(kl_shift=0.01), lambda r: r.refusal, "bfloat16")
    assert all(r.rescored is not None for r in front)
    assert front[0].values(rescored=True) == pytest.approx((0.1, 0.91))
    assert check.same_order and check.same_front and check.n_rescored == 3
    assert check.max_kl_difference == pytest.approx(0.01)
    assert SearchPrecision.model_validate(check.model_dump()) == check
