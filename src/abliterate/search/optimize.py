"""Optimized abliteration: a multi-objective Optuna search over how the direction is removed.

A single mean-difference direction removed at full strength from every writer takes most
refusals away but also moves the model on harmless prompts. This module searches a richer edit
space (:class:`EditParams`) for edits that refuse less *and* move harmless prompts less:

* direction source: a fractional layer position (interpolating the two neighbouring layers'
  directions), or each layer its own direction; optionally *projected* (orthogonal to the
  harmless mean, see :meth:`~abliterate.directions.Candidates.direction`);
* a strength :class:`Profile` across layers for the attention outputs and one for the MLP
  outputs (peak, position of the peak, width, edge strength; 0 outside the window);
* plain or norm-preserving weight edits (:data:`~abliterate.interventions.EDIT_MODES`);
* with ``max_directions > 1``, how many directions to remove at once: the mean difference plus
  the top singular vectors of the per-prompt differences
  (:meth:`~abliterate.directions.Candidates.extra_directions`).

Every point of the space is an :class:`~abliterate.interventions.EditSpec`, so it is scored
through hooks and baked into the weights by the same code.

The search never generates text. Each trial costs one forward pass (last position only) over
the harmful and harmless *validation* prompts: the objectives are the mean next-token refusal
probability on harmful prompts and the first-token KL divergence on harmless prompts, both
minimised with multi-objective TPE. Only Pareto-front trials are then *confirmed* by
generating answers to the harmful validation prompts and judging them, and the chosen trial is
(:func:`choose`) the lowest-KL confirmed trial whose refusal rate is at most the target. The
evaluation prompts are not touched here: the caller evaluates the chosen edit on them once.

The study lives in Optuna storage (by default a SQLite file beside the run directory), so a
killed run resumes where it stopped and several workers can share one study: trials of a worker
that died (same host and a dead process id, or a stale heartbeat) are marked failed and not
counted, and the search runs until the number of *completed* trials reaches the budget (see
:mod:`abliterate.study`; the front and the choice rule are in :mod:`abliterate.pareto`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from abliterate.core.edits import EditSpec
from abliterate.edit.hooks import maybe_hooks
from abliterate.errors import ConfigError
from abliterate.eval.judges import Judge
from abliterate.measure.candidates import Candidates
from abliterate.model.forward import generate
from abliterate.search.objective import CheapObjective, search_model
from abliterate.search.pareto import TrialRecord, choose, pareto_front
from abliterate.search.space import SPACE_VERSION, EditParams, SearchSpace
from abliterate.search.study import completed, open_study, run_trials
from abliterate.types import Site

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """The outcome of :func:`optimize_edit`."""

    spec: EditSpec
    chosen: TrialRecord
    trials: list[TrialRecord]
    rule: str
    met_target: bool
    refusal_target: float
    baseline: dict[str, float]
    storage: str
    study_name: str
    n_trials: int
    seconds: dict[str, float]
    search_dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` ``optimization`` entry."""
        return {
            "objectives": [
                "refusal_prob (harmful val, next token)",
                "kl (harmless val, first token)",
            ],
            "trials": [t.to_dict() for t in self.trials],
            "chosen": self.chosen.to_dict(),
            "rule": self.rule,
            "met_refusal_target": self.met_target,
            "refusal_target": self.refusal_target,
            "baseline": self.baseline,
            "storage": self.storage,
            "study_name": self.study_name,
            "n_trials": self.n_trials,
            "seconds": self.seconds,
            "search_dtype": self.search_dtype,
        }


def _scoring(
    objective: CheapObjective, candidates: Candidates, site: Site
) -> Callable[[EditParams], dict[str, float]]:
    def score(params: EditParams) -> dict[str, float]:
        return objective(params.to_spec(candidates, site))

    return score


def optimize_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Candidates,
    *,
    harmful_val: Sequence[str],
    harmful_val_prompts: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    judge: Judge,
    site: Site,
    storage: str,
    study_name: str,
    fingerprint: dict[str, Any],
    n_trials: int,
    refusal_target: float,
    max_confirm: int,
    prune_last_layers: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    trial: int | None = None,
    max_directions: int = 1,
    search_dtype: str = "model",
) -> SearchResult:
    """Search the edit space on validation prompts and choose an edit (see module docstring).

    Args:
        harmful_val, harmless_val: Chat-formatted validation texts.
        harmful_val_prompts: The raw harmful validation instructions (for the judge).
        trial: Skip the automatic choice and use this trial number of the study.
        max_new_tokens: Tokens generated per prompt when confirming a trial.
        max_directions: Search how many directions to remove at once, up to this many (needs
            ``candidates.harmful_acts`` at ``site``).
        search_dtype: Precision of the cheap scoring (:func:`search_model`); confirmation
            generates with ``model`` itself. The returned spec does not depend on it, only
            which trials look best.
    """
    from abliterate.search.selection import max_candidate_layer

    n = candidates.n_layers
    degenerate_first = candidates.is_degenerate(0, site)
    space = SearchSpace(
        n_layers=n,
        min_layer=1.0 if degenerate_first else 0.0,
        max_layer=float(max(max_candidate_layer(n, prune_last_layers), 1)),
        max_directions=max_directions,
    )
    if max_directions > 1 and (candidates.harmful_acts is None or candidates.acts_site != site):
        raise ConfigError(
            f"--max-directions {max_directions} needs the per-prompt harmful activations of "
            f"site {site!r} in the candidates."
        )
    scorer_model = search_model(model, search_dtype)
    dtype = str(next(scorer_model.parameters()).dtype).removeprefix("torch.")
    # A resumed study must score in the same precision: KL values of two precisions differ.
    fingerprint = {**fingerprint, "space_version": SPACE_VERSION, "site": site, "n_layers": n,
                   "prune_last_layers": prune_last_layers,
                   "max_directions": max_directions, "search_dtype": dtype}  # fmt: skip
    study = open_study(storage, study_name, fingerprint)
    objective = CheapObjective(
        scorer_model, tokenizer, harmful_val, harmless_val, refusal_ids, batch_size=batch_size
    )
    baseline = objective.baseline
    started = time.perf_counter()
    run_trials(study, space, _scoring(objective, candidates, site), n_trials, seed)
    search_seconds = time.perf_counter() - started
    # The scoring copy and its cached inputs are not needed any more: free them before the
    # confirmations and the caller's evaluation.
    del objective, scorer_model
    gc.collect()

    records = [
        TrialRecord(
            number=t.number,
            refusal_score=float(t.values[0]),
            kl=float(t.values[1]),
            params=dict(t.params),
        )
        for t in completed(study)
    ]
    if not records:
        raise ConfigError(f"study '{study_name}' has no completed trials; raise --trials.")
    front = pareto_front(records)
    for r in front:
        r.pareto = True

    def confirm(record: TrialRecord) -> float:
        spec = EditParams.from_params(record.params).to_spec(candidates, site)
        # Generation runs on the model itself: on CPUs, bfloat16 decoding (small matrix
        # products, one token at a time) is slower than float32 (53 s vs. 33 s for 32 prompts ×
        # 32 tokens on the demo model), and the confirmed rates are then the model's own.
        with maybe_hooks(model, spec):
            responses = generate(
                model,
                tokenizer,
                harmful_val,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                desc=f"Confirming trial {record.number}",
            )
        refused = judge(list(harmful_val_prompts), responses)
        rate = sum(refused) / len(refused)
        log.info("trial %d: confirmed refusal rate %.3f", record.number, rate)
        return rate

    started = time.perf_counter()
    if trial is not None:
        by_number = {r.number: r for r in records}
        if trial not in by_number:
            raise ConfigError(
                f"trial {trial} is not a completed trial of study '{study_name}'; completed: "
                f"{', '.join(str(k) for k in sorted(by_number))}."
            )
        chosen = by_number[trial]
        chosen.confirmed_refusal_rate = confirm(chosen)
        met = chosen.confirmed_refusal_rate <= refusal_target
        rule = f"trial {trial}, chosen by the user (--trial)"
    else:
        chosen, met = choose(front, confirm, refusal_target, max_confirm)
        rule = (
            "lowest first-token KL among Pareto-front trials whose judged refusal rate on the "
            f"harmful validation prompts is at most {refusal_target:g} (front confirmed by "
            f"bisection along KL, at most {max_confirm} generations)"
        )
        if not met:
            rule += (
                "; no confirmed trial met the target, so the one with the lowest confirmed "
                "refusal rate was chosen"
            )
            log.warning("no confirmed trial reached the refusal target %.3f", refusal_target)
    confirm_seconds = time.perf_counter() - started
    spec = EditParams.from_params(chosen.params).to_spec(candidates, site)
    return SearchResult(
        spec=spec,
        chosen=chosen,
        trials=records,
        rule=rule,
        met_target=met,
        refusal_target=refusal_target,
        baseline=baseline,
        storage=storage,
        study_name=study_name,
        n_trials=n_trials,
        seconds={"search": round(search_seconds, 2), "confirm": round(confirm_seconds, 2)},
        search_dtype=dtype,
    )
