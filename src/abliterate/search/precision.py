"""Does the scoring precision change the choice? Front trials re-scored in the model's own.

The search may score trials on a bfloat16 copy of a float32 model (where the device computes
bfloat16 natively, about 4x faster on CPUs with AVX512-BF16). Which CPU runs the search must
not change which edit is chosen, so the Pareto-front trials are scored again in the model's
precision, and the front the choice is made on is recomputed from those values
(:func:`compare_precisions`); the report's
:class:`~abliterate.report.schema.SearchPrecision` records how far the two agreed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from abliterate.model.layerwise import LayerwiseModel
from abliterate.report.schema import SearchPrecision
from abliterate.search.calibration import spearman
from abliterate.search.pareto import TrialRecord, pareto_front

if TYPE_CHECKING:
    from abliterate.core.ablation import Ablation
    from abliterate.search.objective import CheapObjective


def compare_precisions(
    front: Sequence[TrialRecord],
    exact: CheapObjective,
    edit_of: Callable[[TrialRecord], Ablation],
    search_dtype: str,
) -> SearchPrecision:
    """Score ``front`` with ``exact`` (the model's own precision), storing the values on each
    record's ``rescored``, and compare the two precisions (the ``report.json``
    ``optimization.precision`` entry)."""
    model = exact.model
    # Only a loaded model is copied to another precision (a layer-streamed one never is).
    assert not isinstance(model, LayerwiseModel)
    model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    desc = f"Re-scoring {len(front)} front trials in {model_dtype}"
    values = exact.many([edit_of(r) for r in front], desc=desc)
    for r, v in zip(front, values, strict=True):
        r.rescored = {"refusal": v["refusal"], "kl": v["kl"]}
    by_kl = sorted(front, key=lambda r: r.kl)
    by_exact_kl = sorted(front, key=lambda r: r.values(True)[1])
    return SearchPrecision(
        search_dtype=search_dtype,
        model_dtype=model_dtype,
        n_rescored=len(front),
        spearman_refusal=spearman([r.refusal for r in front], [r.values(True)[0] for r in front]),
        spearman_kl=spearman([r.kl for r in front], [r.values(True)[1] for r in front]),
        max_kl_difference=max((abs(r.kl - r.values(True)[1]) for r in front), default=0.0),
        same_order=[r.number for r in by_kl] == [r.number for r in by_exact_kl],
        same_front=len(pareto_front(front, rescored=True)) == len(front),
    )
