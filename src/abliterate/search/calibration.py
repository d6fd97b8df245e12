"""How well the cheap refusal objective predicts the judge: calibration from confirmations.

Every confirmed trial of a search has, per harmful validation prompt, the objective's
prediction (the probability of opening with one of the model's refusal openings, and the older
next-token proxy) and the judge's verdict on the generated answer. :class:`Calibration`
reports, over the confirmed trials,

* per trial: the mean prediction against the judged refusal rate, and their rank correlation
  (Spearman) across trials;
* per prompt: the AUC of each predictor (the probability that a refused prompt is predicted
  higher than an answered one) and a reliability table (predicted probability bins against the
  judged refusal frequency in each bin).

The statistics are plain functions (:func:`spearman`, :func:`auc`, :func:`reliability`), also
used by ``benchmarks/objective_calibration.py``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from abliterate.core.ablation import Ablation
    from abliterate.search.objective import CheapObjective
    from abliterate.search.pareto import TrialRecord

BIN_EDGES = (0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
"""Edges of the reliability table's predicted-probability bins (the last bin includes 1)."""


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share their mean rank
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Rank correlation of ``x`` and ``y`` (ties averaged); None when either is constant or
    there are fewer than 3 pairs."""
    if len(x) != len(y):
        raise ValueError("spearman needs pairs")
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else None


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Probability that a positive scores above a negative (ties count half); None without
    both."""
    pos = sorted(s for s, y in zip(scores, labels, strict=True) if y)
    neg = sorted(s for s, y in zip(scores, labels, strict=True) if not y)
    if not pos or not neg:
        return None
    # For each positive: negatives strictly below, plus half the ties (two pointers).
    wins, lo, hi = 0.0, 0, 0
    for p in pos:
        while lo < len(neg) and neg[lo] < p:
            lo += 1
        hi = max(hi, lo)
        while hi < len(neg) and neg[hi] <= p:
            hi += 1
        wins += lo + 0.5 * (hi - lo)
    return wins / (len(pos) * len(neg))


def reliability(
    predicted: Sequence[float], judged: Sequence[bool], edges: Sequence[float] = BIN_EDGES
) -> list[dict[str, float]]:
    """Per predicted-probability bin ``[lo, hi)`` (the last closed): the number of prompts,
    their mean prediction and their judged refusal frequency; empty bins are left out."""
    rows = []
    for k, (lo, hi) in enumerate(itertools.pairwise(edges)):
        last = k == len(edges) - 2
        inside = [
            (p, y)
            for p, y in zip(predicted, judged, strict=True)
            if lo <= p < hi or (last and p == hi)
        ]
        if inside:
            rows.append({
                "lo": lo, "hi": hi, "n": len(inside),
                "predicted": sum(p for p, _ in inside) / len(inside),
                "judged": sum(y for _, y in inside) / len(inside),
            })  # fmt: skip
    return rows


@dataclass
class Calibration:
    """The cheap objective against the judge over the confirmed trials (module docstring)."""

    trials: list[dict[str, float]]
    spearman: float | None
    spearman_next_token: float | None
    auc: float | None
    auc_next_token: float | None
    table: list[dict[str, float]]
    n_prompts: int

    @classmethod
    def from_confirmations(
        cls,
        records: Sequence[TrialRecord],
        verdicts: dict[int, list[bool]],
        objective: CheapObjective,
        edit_of: Callable[[TrialRecord], Ablation],
    ) -> Calibration | None:
        """Predictions of ``objective`` for every trial in ``verdicts`` (its per-prompt judged
        refusals, in the scorer's prompt order) against those verdicts; None without any."""
        confirmed = [r for r in records if r.number in verdicts]
        if not confirmed:
            return None
        scores = objective.scorer.score([edit_of(r) for r in confirmed], objective.edits_per_pass)
        trials, predicted, first, judged = [], [], [], []
        for r, s in zip(confirmed, scores, strict=True):
            v = verdicts[r.number]
            trials.append({
                "number": r.number, "predicted": float(s.refusal.mean()),
                "predicted_next_token": float(s.first_token.mean()), "judged": sum(v) / len(v),
            })  # fmt: skip
            predicted += s.refusal.tolist()
            first += s.first_token.tolist()
            judged += v
        return cls(
            trials=trials,
            spearman=spearman([t["predicted"] for t in trials], [t["judged"] for t in trials]),
            spearman_next_token=spearman(
                [t["predicted_next_token"] for t in trials], [t["judged"] for t in trials]
            ),
            auc=auc(predicted, judged),
            auc_next_token=auc(first, judged),
            table=reliability(predicted, judged),
            n_prompts=len(judged),
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` ``optimization.calibration`` entry."""
        return {
            "trials": self.trials,
            "spearman": self.spearman,
            "spearman_next_token": self.spearman_next_token,
            "auc": self.auc,
            "auc_next_token": self.auc_next_token,
            "reliability": self.table,
            "n_prompts": self.n_prompts,
        }
