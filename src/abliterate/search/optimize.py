"""Optimized abliteration: a multi-objective Optuna search over how the direction is removed.

:func:`optimize_edit` searches the edit space of :mod:`abliterate.search.space` with
multi-objective TPE, scoring each trial with the generation-free objective of
:mod:`abliterate.search.objective` (mean next-token refusal probability on harmful validation
prompts, first-token KL on harmless ones). Only Pareto-front trials are then *confirmed* by
generating answers to the harmful validation prompts and judging them, and the chosen trial is
(:func:`~abliterate.search.pareto.choose`) the lowest-KL confirmed trial whose refusal rate is
at most the target. The evaluation prompts are not touched here: the caller evaluates the
chosen edit on them once.

Reasoning models (``--thinking on``): the cheap objective reads the token after an empty
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from abliterate.core.ablation import Ablation
from abliterate.data.chat import ChatSet
from abliterate.data.reasoning import opens_reasoning
from abliterate.edit.hooks import edit_hooks
from abliterate.errors import ConfigError
from abliterate.eval.judges import Judge
from abliterate.eval.text import split_answer
from abliterate.measure.candidates import Candidates
from abliterate.model.forward import generate
from abliterate.model.layerwise import LayerwiseModel
from abliterate.search.objective import CheapObjective, search_model
from abliterate.search.pareto import TrialRecord, choose, pareto_front
from abliterate.search.selection import max_candidate_layer
from abliterate.search.space import SPACE_VERSION, EditParams, SearchSpace
from abliterate.search.streamed import streamed_generate
from abliterate.search.study import completed, open_study, run_trials

if TYPE_CHECKING:
    import optuna
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abliterate.config import RunConfig

log = logging.getLogger(__name__)

OBJECTIVES = ["refusal_prob (harmful val, next token)", "kl (harmless val, first token)"]


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

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` ``optimization`` entry."""
        return {
            "objectives": list(OBJECTIVES),
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

    def edit(self, params: dict[str, Any]) -> Ablation:
        return EditParams.from_params(params).to_edit(self.candidates, self.config.site)

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
            max_directions=c.max_directions,
        )


def _run_study(
    model: PreTrainedModel | LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    search: _Search,
    refusal_ids: list[int],
    storage: str,
    fingerprint: dict[str, Any],
) -> tuple[optuna.Study, dict[str, float], str, float]:
    """Open (or resume) the study and run trials until the budget is complete.

    Returns the study, the unedited model's objective values, the scoring dtype and the
    search's wall time.
    """
    c = search.config
    space = search.space()
    if isinstance(model, LayerwiseModel):  # its compute dtype was chosen when it was opened
        scorer_model: PreTrainedModel | LayerwiseModel = model
        dtype = str(model.dtype).removeprefix("torch.")
    else:
        scorer_model = search_model(model, c.search_dtype)
        dtype = str(next(scorer_model.parameters()).dtype).removeprefix("torch.")
    # A resumed study must score in the same precision: KL values of two precisions differ.
    fingerprint = {**fingerprint, "space_version": SPACE_VERSION, "site": c.site,
                   "n_layers": space.n_layers, "prune_last_layers": c.prune_last_layers,
                   "max_directions": c.max_directions, "search_dtype": dtype}  # fmt: skip
    study = open_study(storage, c.study_name, fingerprint)
    objective = CheapObjective(
        scorer_model,
        tokenizer,
        *search.scoring,
        refusal_ids,
        batch_size=c.batch_size,
    )
    baseline = objective.baseline
    started = time.perf_counter()

    def score(params: EditParams) -> dict[str, float]:
        return objective(params.to_edit(search.candidates, c.site))

    run_trials(study, space, score, c.trials, c.seed)
    return study, baseline, dtype, time.perf_counter() - started


def _confirmer(
    model: PreTrainedModel | LayerwiseModel, tokenizer: PreTrainedTokenizerBase, search: _Search
) -> Callable[[TrialRecord], float]:
    """The judged refusal rate of a trial's edit on the harmful validation prompts."""
    c = search.config

    texts, prompts = search.harmful.texts, search.harmful.prompts.prompts
    budget = c.thinking_budget if c.thinking == "on" else 0

    def confirm(record: TrialRecord) -> float:
        edit = search.edit(record.params)
        tokens = min(c.confirm_tokens, c.max_new_tokens) + budget
        desc = f"Confirming trial {record.number}"
        if isinstance(model, LayerwiseModel):
            responses = streamed_generate(model, tokenizer, texts, edit, max_new_tokens=tokens,
                                          batch_size=c.batch_size, desc=desc)  # fmt: skip
        else:
            # Generation runs on the model itself: on CPUs, bfloat16 decoding (small matrix
            # products, one token at a time) is slower than float32 (53 s vs. 33 s for 32
            # prompts × 32 tokens on the demo model), and the confirmed rates are the model's.
            with edit_hooks(model, edit):
                responses = generate(model, tokenizer, texts, max_new_tokens=tokens,
                                     batch_size=c.batch_size, desc=desc)  # fmt: skip
        answers = [
            split_answer(r, opens_reasoning(t)) for r, t in zip(responses, texts, strict=True)
        ]
        done = [i for i, a in enumerate(answers) if a.finished]
        refused = search.judge([prompts[i] for i in done], [answers[i].text for i in done])
        unfinished = len(answers) - len(done)
        # Unfinished answers count against the trial (module docstring).
        rate = (sum(refused) + unfinished) / len(answers)
        log.info(
            "trial %d: confirmed refusal rate %.3f (%d unfinished counted as refusals)",
            record.number, rate, unfinished,
        )  # fmt: skip
        return rate

    return confirm


def _choose_trial(
    records: list[TrialRecord],
    front: list[TrialRecord],
    confirm: Callable[[TrialRecord], float],
    config: RunConfig,
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
    chosen, met = choose(front, confirm, target, config.max_confirm)
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
    decoder layer at a time from its checkpoint).

    The search options (trials, study, target, confirmation, search precision, site, pruning,
    batch size, seed, ``--trial``, thinking) come from ``config``; ``storage`` is the study's
    Optuna URL and ``fingerprint`` what a resumed study must have been made for; ``scoring``
    the harmful and harmless texts of the cheap objective (default: the sets' own texts).
    """
    if scoring is None:
        scoring = (harmful_val.texts, harmless_val.texts)
    search = _Search(candidates, harmful_val, harmless_val, judge, config, scoring)
    study, baseline, dtype, search_seconds = _run_study(
        model, tokenizer, search, refusal_ids, storage, fingerprint
    )
    # The scoring copy of the model and its cached inputs died with _run_study's frame: free
    # their memory before the confirmations and the caller's evaluation.
    gc.collect()
    records = [
        TrialRecord(t.number, float(t.values[0]), float(t.values[1]), dict(t.params))
        for t in completed(study)
    ]
    if not records:
        raise ConfigError(f"study '{config.study_name}' has no completed trials; raise --trials.")
    front = pareto_front(records)  # sorted by KL
    for r in front:
        r.pareto = True
    started = time.perf_counter()
    confirm = _confirmer(model, tokenizer, search)
    chosen, met, rule = _choose_trial(records, front, confirm, config)
    confirm_seconds = time.perf_counter() - started
    return SearchResult(
        edit=search.edit(chosen.params),
        chosen=chosen,
        trials=records,
        rule=rule,
        met_target=met,
        refusal_target=config.refusal_target,
        baseline=baseline,
        storage=storage,
        study_name=config.study_name,
        n_trials=config.trials,
        seconds={"search": round(search_seconds, 2), "confirm": round(confirm_seconds, 2)},
        search_dtype=dtype,
    )
