"""Optimized abliteration: a multi-objective Optuna search over how the direction is removed.

:func:`optimize_edit` searches the edit space of :mod:`abliterate.search.space` with
multi-objective TPE, scoring each trial with the generation-free objective of
:mod:`abliterate.search.objective` (``--refusal-objective``: the next-token refusal
probability on harmful validation prompts, or the probability that the answer opens with one of
the model's own refusal openings; and the first-token KL on harmless ones), ``--edits-per-pass``
trials per forward pass (``--trials-per-pass`` trials asked of TPE together). Then:

1. *Re-scoring.* When the trials were scored in another precision than the model's (a
   bfloat16 copy of a float32 model), the Pareto-front trials are scored again in the model's
   own precision, the front is recomputed from those values, and the choice is made on it: a
   trial's place on the front does not depend on whether the CPU computes bfloat16 natively.
   How far the two precisions agreed is reported (``precision``).
2. *Confirmation.* Front trials are confirmed by generating answers to the harmful validation
   prompts and judging them; the chosen trial (:func:`~abliterate.search.pareto.choose`) is
   the lowest-KL confirmed trial whose refusal rate is at most the target.
3. *Refinement* (``--refine-steps`` > 0; default off). From the chosen trial, a few steps of
   descent on the per-layer strengths (:mod:`abliterate.search.descent`; TPE keeps the
   discrete choices) lower the KL while the refusal likelihood stays at the chosen trial's; the
   refined point is added to the study as a trial of its own, scored in the model's precision,
   confirmed, and chosen when it meets the target at a lower KL.

The evaluation prompts are not touched here: the caller evaluates the chosen edit on them once.
Every confirmation also yields a per-prompt calibration of the cheap objective against the
judge (:mod:`abliterate.search.calibration`).

A layer-streamed model (``--stream``) is scored by
:class:`~abliterate.search.scoring.StreamedScorer` (next-token refusal probability and KL, as
many trials per read of the weights as fit) and confirmed by layer-streamed generation; the
openings objective and the refinement need the model loaded and fall back to the next-token
objective and no refinement, with a warning (:func:`~abliterate.search.objective.scoring_config`).

Reasoning models (``--thinking on``): the cheap objective reads the answer after an empty
reasoning block (the harmful and harmless texts formatted with thinking off, passed as
``scoring``), because with reasoning on the next token is the block's opening tag whatever the
edit. Confirmations generate with thinking on and ``--thinking-budget`` more tokens, judge only
the answers after the reasoning, and count an unfinished answer *against* the trial (as if
refused): an edit must not meet the target by making the model reason past its budget.

The study lives in Optuna storage (by default a SQLite file beside the run directory), so a
killed run resumes where it stopped and several workers can share one study (see
:mod:`abliterate.search.study`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from abliterate.core.ablation import Ablation
from abliterate.data.chat import ChatSet
from abliterate.data.reasoning import opens_reasoning
from abliterate.edit.hooks import edit_hooks
from abliterate.errors import ConfigError
from abliterate.eval.judges import Judge
from abliterate.eval.text import split_answer
from abliterate.measure.candidates import Candidates
from abliterate.measure.refusal import RefusalOpenings
from abliterate.model.forward import generate
from abliterate.model.layerwise import LayerwiseModel
from abliterate.report.schema import SearchPrecision
from abliterate.search.calibration import Calibration
from abliterate.search.descent import descend
from abliterate.search.objective import (
    CheapObjective,
    objective_openings,
    scoring_config,
    search_model,
)
from abliterate.search.pareto import TrialRecord, choose, pareto_front
from abliterate.search.precision import compare_precisions
from abliterate.search.scoring import EditScorer, ScoringSet
from abliterate.search.selection import max_candidate_layer
from abliterate.search.space import SPACE_VERSION, EditParams, SearchSpace
from abliterate.search.streamed import streamed_generate
from abliterate.search.study import completed, open_study, run_trials

if TYPE_CHECKING:
    import optuna
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abliterate.config import RunConfig

log = logging.getLogger(__name__)

OBJECTIVES = {
    "next_token": ["refusal (harmful val, next-token refusal probability)",
                   "kl (harmless val, first token)"],
    "openings": ["refusal (harmful val: probability of opening with the model's refusal "
                 "openings)", "kl (harmless val, first token)"],
}  # fmt: skip


@dataclass
class SearchResult:
    """The outcome of :func:`optimize_edit`."""

    edit: Ablation
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
    refusal_objective: str = "next_token"
    openings: dict[str, Any] = field(default_factory=dict)
    precision: SearchPrecision | None = None
    calibration: Calibration | None = None
    refinement: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` ``optimization`` entry."""
        out = {
            "objectives": list(OBJECTIVES[self.refusal_objective]),
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
        if self.openings:
            out["openings"] = self.openings
        if self.precision is not None:
            out["precision"] = self.precision.model_dump()
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        if self.refinement is not None:
            out["refinement"] = self.refinement
        return out


@dataclass(frozen=True)
class _Search:
    """What one search needs besides the model: the candidates, the validation sets (and the
    texts the cheap objective scores), the judge and the configuration section."""

    candidates: Candidates
    harmful: ChatSet
    harmless: ChatSet
    judge: Judge
    config: RunConfig
    scoring: tuple[Sequence[str], Sequence[str]]

    def edit(self, record: TrialRecord) -> Ablation:
        """The edit of a trial: its parameters' (with a refined trial's strengths)."""
        edit = EditParams.from_params(record.params).to_edit(self.candidates, self.config.site)
        if record.strengths is None:
            return edit
        return Ablation(
            direction=edit.direction, embedding=edit.embedding,
            attention=tuple(record.strengths["attention"]), mlp=tuple(record.strengths["mlp"]),
            layer_directions=edit.layer_directions, mode=edit.mode,
            extra_directions=edit.extra_directions, harmless_means=edit.harmless_means,
        )  # fmt: skip

    def space(self) -> SearchSpace:
        n, c = self.candidates.n_layers, self.config
        if c.max_directions > 1 and (
            self.candidates.harmful_acts is None or self.candidates.acts_site != c.site
        ):
            raise ConfigError(
                f"--max-directions {c.max_directions} needs the per-prompt harmful activations "
                f"of site {c.site!r} in the candidates."
            )
        return SearchSpace(
            n_layers=n,
            min_layer=1.0 if self.candidates.is_degenerate(0, c.site) else 0.0,
            max_layer=float(max(max_candidate_layer(n, c.prune_last_layers), 1)),
            mlp_peak=(c.mlp_peak_min, 1.5),
            max_directions=c.max_directions,
        )


def _records(study: optuna.Study) -> list[TrialRecord]:
    return [_records_of(t) for t in completed(study)]


class _Confirmer:
    """The judged refusal rate of a trial's edit on the harmful validation prompts (call it
    with the trial); each prompt's verdict is kept in :attr:`verdicts`, by trial number, for
    the calibration."""

    def __init__(
        self,
        model: PreTrainedModel | LayerwiseModel,
        tokenizer: PreTrainedTokenizerBase,
        search: _Search,
    ) -> None:
        self.model, self.tokenizer, self.search = model, tokenizer, search
        self.verdicts: dict[int, list[bool]] = {}

    def __call__(self, record: TrialRecord) -> float:
        search, c = self.search, self.search.config
        texts, prompts = search.harmful.texts, search.harmful.prompts.prompts
        edit = search.edit(record)
        tokens = min(c.confirm_tokens, c.max_new_tokens) + c.reasoning_budget
        desc = f"Confirming trial {record.number}"
        if isinstance(self.model, LayerwiseModel):
            responses = streamed_generate(self.model, self.tokenizer, texts, edit,
                                          max_new_tokens=tokens, batch_size=c.batch_size,
                                          desc=desc)  # fmt: skip
        else:
            # Generation runs on the model itself: on CPUs, bfloat16 decoding (small matrix
            # products, one token at a time) is slower than float32 (53 s vs. 33 s for 32
            # prompts × 32 tokens on the demo model), and the confirmed rates are the model's.
            with edit_hooks(self.model, edit):
                responses = generate(self.model, self.tokenizer, texts, max_new_tokens=tokens,
                                     batch_size=c.batch_size, desc=desc)  # fmt: skip
        answers = [
            split_answer(r, opens_reasoning(t)) for r, t in zip(responses, texts, strict=True)
        ]
        done = [i for i, a in enumerate(answers) if a.finished]
        refused = search.judge([prompts[i] for i in done], [answers[i].text for i in done])
        # Unfinished answers count against the trial (module docstring).
        per_prompt = [True] * len(answers)
        for i, r in zip(done, refused, strict=True):
            per_prompt[i] = bool(r)
        self.verdicts[record.number] = per_prompt
        rate = sum(per_prompt) / len(answers)
        log.info(
            "trial %d: confirmed refusal rate %.3f (%d unfinished counted as refusals)",
            record.number, rate, len(answers) - len(done),
        )  # fmt: skip
        return rate


def _choose_trial(
    records: list[TrialRecord],
    front: list[TrialRecord],
    confirm: Callable[[TrialRecord], float],
    config: RunConfig,
    rescored: bool,
) -> tuple[TrialRecord, bool, str]:
    """The user's ``--trial`` or the rule's choice among the KL-sorted ``front``, with whether
    it met the target and why."""
    target = config.refusal_target
    if config.trial is not None:
        by_number = {r.number: r for r in records}
        if config.trial not in by_number:
            raise ConfigError(
                f"trial {config.trial} is not a completed trial of study '{config.study_name}'; "
                f"completed: {', '.join(str(k) for k in sorted(by_number))}."
            )
        chosen = by_number[config.trial]
        chosen.confirmed_refusal_rate = confirm(chosen)
        rule = f"trial {config.trial}, chosen by the user (--trial)"
        return chosen, chosen.confirmed_refusal_rate <= target, rule
    chosen, met = choose(front, confirm, target, config.max_confirm, rescored)
    rule = (
        "lowest first-token KL among Pareto-front trials whose judged refusal rate on the "
        f"harmful validation prompts is at most {target:g} (front confirmed by bisection "
        f"along KL, at most {config.max_confirm} generations)"
    )
    if not met:
        rule += (
            "; no confirmed trial met the target, so the one with the lowest confirmed "
            "refusal rate was chosen"
        )
        log.warning("no confirmed trial reached the refusal target %.3f", target)
    return chosen, met, rule


@dataclass
class _Scoring:
    """The study and the objectives it was scored with (search precision and, when the model's
    own differs, the model's)."""

    study: optuna.Study
    objective: CheapObjective
    exact: CheapObjective | None
    dtype: str
    seconds: float


def _run_study(
    model: PreTrainedModel | LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    search: _Search,
    refusal_ids: list[int],
    openings: RefusalOpenings,
    storage: str,
    fingerprint: dict[str, Any],
) -> _Scoring:
    """Open (or resume) the study and run trials until the budget is complete."""
    c = search.config
    space = search.space()
    if isinstance(model, LayerwiseModel):  # its compute dtype was chosen when it was opened
        scorer_model: PreTrainedModel | LayerwiseModel = model
        dtype = str(model.dtype).removeprefix("torch.")
    else:
        scorer_model = search_model(model, c.search_dtype)
        dtype = str(next(scorer_model.parameters()).dtype).removeprefix("torch.")
    # A resumed study must score in the same precision (KL values of two precisions differ)
    # with the same objective and bounds. The keys added since version 1 are written only when
    # not at their defaults, so studies made before them still resume.
    fingerprint = {**fingerprint, "space_version": SPACE_VERSION, "site": c.site,
                   "n_layers": space.n_layers, "prune_last_layers": c.prune_last_layers,
                   "max_directions": c.max_directions, "search_dtype": dtype}  # fmt: skip
    if c.refusal_objective != "next_token":
        fingerprint["openings"] = [list(t) for t in openings.tokens]
    if space.mlp_peak != space.peak:
        fingerprint["mlp_peak"] = list(space.mlp_peak)
    study = open_study(storage, c.study_name, fingerprint)

    def objective(m: PreTrainedModel | LayerwiseModel) -> CheapObjective:
        texts = ScoringSet(*search.scoring, refusal_ids, openings, c.batch_size)
        return CheapObjective(m, tokenizer, texts, c.edits_per_pass)

    cheap = objective(scorer_model)
    started = time.perf_counter()

    def score(points: list[EditParams]) -> list[dict[str, float]]:
        return cheap.many([p.to_edit(search.candidates, c.site) for p in points])

    run_trials(
        study, space, score, c.trials, c.seed, batch=min(c.trials_per_pass, c.edits_per_pass)
    )
    exact = None if scorer_model is model else objective(model)
    return _Scoring(study, cheap, exact, dtype, time.perf_counter() - started)


def _refine(
    scoring: _Scoring, search: _Search, chosen: TrialRecord, steps: int
) -> tuple[TrialRecord | None, dict[str, Any]]:
    """Descent on the chosen trial's strengths, added to the study as a trial of its own (or
    found there, from an earlier run of the same study); None when no step improved on it.
    With the descent's record."""
    for t in completed(scoring.study):
        if t.user_attrs.get("refined_from") == chosen.number:
            return _records_of(t), dict(t.user_attrs.get("refinement", {}))
    import optuna

    start = search.edit(chosen)
    scorer = scoring.objective.scorer
    assert isinstance(scorer, EditScorer), "scoring_config turns refinement off when streamed"
    result = descend(scorer, start, steps=steps)
    if result.edit is start:
        return None, result.to_dict()
    strengths = {"attention": list(result.edit.attention), "mlp": list(result.edit.mlp)}
    trial = optuna.trial.create_trial(
        params=dict(chosen.params),
        distributions=scoring.study.trials[chosen.number].distributions,
        values=[result.best["refusal"], result.best["kl"]],
        user_attrs={
            "refined_from": chosen.number,
            "strengths": strengths,
            "refusal_prob": result.best["refusal_prob"],
            "refinement": result.to_dict(),
        },
    )
    scoring.study.add_trial(trial)
    added = completed(scoring.study)[-1]
    return _records_of(added), result.to_dict()


def _records_of(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    attrs = trial.user_attrs
    return TrialRecord(trial.number, float(trial.values[0]), float(trial.values[1]),
                       dict(trial.params), refusal_prob=attrs.get("refusal_prob"),
                       strengths=attrs.get("strengths"),
                       refined_from=attrs.get("refined_from"))  # fmt: skip


def _refine_choice(
    run: _Scoring,
    search: _Search,
    records: list[TrialRecord],
    choice: tuple[TrialRecord, bool, str],
    confirm: _Confirmer,
) -> tuple[TrialRecord, bool, str, dict[str, Any]]:
    """Refine the chosen trial (:func:`_refine`), score the refined one in the model's
    precision, confirm it and choose it when it meets the target at a lower KL; ``records``
    gains it. Returns the choice and the refinement's record."""
    chosen, met, rule = choice
    c = search.config
    record, refinement = _refine(run, search, chosen, c.refine_steps)
    refinement["kept"] = False
    if record is None:
        return chosen, met, rule, refinement
    known = next((r for r in records if r.number == record.number), None)
    if known is None:  # else it was refined by an earlier run of the study
        records.append(record)
    record = known or record
    if run.exact is not None:
        [exact] = run.exact.many([search.edit(record)])
        record.rescored = {"refusal": exact["refusal"], "kl": exact["kl"]}
    record.confirmed_refusal_rate = confirm(record)
    better = record.values(True)[1] < chosen.values(True)[1]
    if record.confirmed_refusal_rate <= c.refusal_target and better:
        chosen, met = record, True
        rule += (f"; then refined by {c.refine_steps} descent steps on its per-layer "
                 "strengths (kept: it met the target at a lower KL)")  # fmt: skip
    refinement["kept"] = chosen is record
    return chosen, met, rule, refinement


def _front(
    records: Sequence[TrialRecord], run: _Scoring, search: _Search
) -> tuple[list[TrialRecord], SearchPrecision | None, float]:
    """The Pareto front of ``records`` (marked), sorted by KL; when the search scored in
    another precision than the model's, re-scored in the model's and taken again from those
    values, with how the two precisions compare; and the seconds that took."""
    started = time.perf_counter()
    front = pareto_front(records)  # in the search's precision, sorted by KL
    precision = None
    if run.exact is not None:
        precision = compare_precisions(front, run.exact, search.edit, run.dtype)
        front = pareto_front(front, rescored=True)
    seconds = time.perf_counter() - started
    for r in front:
        r.pareto = True
    return front, precision, seconds


def optimize_edit(
    model: PreTrainedModel | LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Candidates,
    harmful_val: ChatSet,
    harmless_val: ChatSet,
    judge: Judge,
    config: RunConfig,
    *,
    refusal_ids: list[int],
    storage: str,
    fingerprint: dict[str, Any],
    scoring: tuple[Sequence[str], Sequence[str]] | None = None,
) -> SearchResult:
    """Search the edit space on validation prompts and choose an edit (see module docstring).

    ``model`` is a loaded model, or a layer-streamed one (trials scored and confirmed one
    decoder layer at a time from its checkpoint; scored on the next-token refusal probability,
    never refined: :func:`~abliterate.search.objective.scoring_config`).

    The search options (trials, study, target, confirmation, search precision, site, pruning,
    batch size, seed, ``--trial``, thinking, refinement) come from ``config``; ``storage`` is
    the study's Optuna URL and ``fingerprint`` what a resumed study must have been made for;
    ``scoring`` the harmful and harmless texts of the cheap objective (default: the sets' own
    texts).
    """
    c = config = scoring_config(model, config)  # a layer-streamed model: next-token scores only
    if scoring is None:
        scoring = (harmful_val.texts, harmless_val.texts)
    search = _Search(candidates, harmful_val, harmless_val, judge, config, scoring)
    openings = objective_openings(
        model, tokenizer, scoring[0], harmful_val.prompts.prompts, judge, c
    )
    run = _run_study(model, tokenizer, search, refusal_ids, openings, storage, fingerprint)
    records = _records(run.study)
    if not records:
        raise ConfigError(f"study '{config.study_name}' has no completed trials; raise --trials.")
    front, precision, rescore_seconds = _front(records, run, search)
    started = time.perf_counter()
    confirm = _Confirmer(model, tokenizer, search)
    chosen, met, rule = _choose_trial(records, front, confirm, config, run.exact is not None)
    refinement = None
    if config.trial is None and c.refine_steps > 0 and chosen.strengths is None:
        chosen, met, rule, refinement = _refine_choice(
            run, search, records, (chosen, met, rule), confirm
        )
    confirm_seconds = time.perf_counter() - started
    calibration = Calibration.from_confirmations(
        records, confirm.verdicts,
        run.exact or run.objective, search.edit,
    )  # fmt: skip
    baseline, dtype, search_seconds = run.objective.baseline, run.dtype, run.seconds
    del run
    gc.collect()  # the scoring copy of the model and its cached inputs
    return SearchResult(
        edit=search.edit(chosen),
        chosen=chosen,
        trials=records,
        rule=rule,
        met_target=met,
        refusal_target=config.refusal_target,
        baseline=baseline,
        storage=storage,
        study_name=config.study_name,
        n_trials=config.trials,
        seconds={
            "search": round(search_seconds, 2),
            "rescore": round(rescore_seconds, 2),
            "confirm": round(confirm_seconds, 2),
        },
        search_dtype=dtype,
        refusal_objective=c.refusal_objective,
        openings=openings.to_dict(tokenizer) if c.refusal_objective == "openings" else {},
        precision=precision,
        calibration=calibration,
        refinement=refinement,
    )
