"""How the edit was chosen: the automatic selection among candidate directions
(``selection``, ``scores.json``) and the ``optimize`` search (``optimization``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, computed_field, model_validator

from abliterate.report.schema.base import Rate, _is_none, _omitted, _Record
from abliterate.types import Site

# --- how the edit was chosen ----------------------------------------------------------------


class RefusalOpening(_Record):
    """One of the model's own refusal openings (the refusal objective asks about them)."""

    text: str
    tokens: list[int]
    count: int = Field(ge=0, description="Judged refusals of the unedited model opening so.")


class Openings(_Record):
    """The refusal openings of selection and search, from the unedited model's answers to the
    harmful validation prompts."""

    openings: list[RefusalOpening]
    n_refused: int = Field(ge=0, description="Judged refusals long enough to have an opening.")
    coverage: Rate = Field(description="Fraction of those refusals the openings cover.")


class Refinement(_Record):
    """The descent on an edit's per-layer strengths (``abliterate.search.descent``)."""

    start: dict[str, float] = Field(description="refusal, refusal_prob and kl at the start.")
    best: dict[str, float] = Field(description="The same at the best point visited.")
    cap: float = Field(description="Refusal likelihood the descent had to stay under.")
    steps: list[dict[str, float]] = Field(description="step, refusal, kl, loss of every step.")
    kept: bool = Field(description="Whether the refined edit replaced the start.")
    model_precision: dict[str, dict[str, float]] | None = Field(
        default=None,
        exclude_if=_is_none,
        description="Selection: start and refined scored in the model's own precision.",
    )


class SelectionPrecision(_Record):
    """The finalists scored in the screening precision and in the model's own."""

    same_order: bool
    same_choice: bool
    max_kl_difference: float


class SelectionSummary(_Record):
    """The automatic choice among candidate directions (``report.json`` ``selection``)."""

    layer: int
    site: Site
    baseline_refusal_score: float = Field(description="Unedited model's refusal log-odds.")
    met_kl_threshold: bool
    rule: str
    kl_threshold: float
    max_layer: int = Field(description="Highest layer scored; later layers were pruned.")
    refusal_measure: str | None = _omitted()
    openings: Openings | None = _omitted()
    screening_dtype: str | None = _omitted()
    precision: SelectionPrecision | None = _omitted()
    refinement: Refinement | None = _omitted()


class CandidateScore(_Record):
    """Scores of one candidate direction (refusal log-odds and first-token KL)."""

    layer: int
    site: Site
    screen_refusal: float
    screen_kl: float
    refusal: float | None = Field(None, description="Whole validation split, finalists only.")
    kl: float | None = None
    same_as: str | None = Field(None, description="``layer/site`` of an identical candidate.")
    screen_prompts: int | None = Field(
        default=None,
        exclude_if=_is_none,
        description="Prompts of each kind in the last screening round it took part in.",
    )


class SelectionScores(SelectionSummary):
    """``scores.json``: the selection summary and every candidate's scores."""

    scores: list[CandidateScore]


class TrialParams(_Record):
    """One point of the optimization's search space, as stored in the Optuna study."""

    direction_layer: float
    per_layer: bool
    projected: bool
    norm_preserving: bool
    attention_peak: float
    attention_position: float
    attention_width: float
    attention_edge: float
    mlp_peak: float
    mlp_position: float
    mlp_width: float
    mlp_edge: float
    n_directions: int | None = _omitted()


class Trial(_Record):
    """One finished optimization trial.

    The search minimises the mean next-token refusal *probability*, named ``refusal_prob``.
    abliterate 0.1.0 wrote it under ``refusal_score`` (which means log-odds everywhere else);
    that key is still accepted and still written, with the same value, for old scripts.
    """

    number: int
    refusal_prob: Rate
    kl: float
    params: TrialParams
    pareto: bool = False
    confirmed_refusal_rate: Rate | None = _omitted()
    refusal: Rate | None = Field(
        default=None,
        exclude_if=_is_none,
        description="The search's refusal objective: equal to refusal_prob with "
        "--refusal-objective next_token; with openings, the probability of opening the answer "
        "with one of the model's refusal openings.",
    )
    rescored: dict[str, float] | None = Field(
        default=None, exclude_if=_is_none, description="refusal and kl in the model's precision."
    )
    strengths: dict[str, list[float]] | None = Field(
        default=None,
        exclude_if=_is_none,
        description="Per-layer attention and mlp strengths of a refined trial.",
    )
    refined_from: int | None = _omitted()

    @model_validator(mode="before")
    @classmethod
    def _accept_old_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "refusal_score" in data:
            data = dict(data)
            old = data.pop("refusal_score")
            if data.setdefault("refusal_prob", old) != old:
                raise ValueError("refusal_score and refusal_prob differ; they are one value")
        return data

    @property
    def objective_refusal(self) -> float:
        """The refusal value the search minimised (``refusal``, else ``refusal_prob``)."""
        return self.refusal_prob if self.refusal is None else self.refusal

    @computed_field  # type: ignore[prop-decorator]
    @property
    def refusal_score(self) -> float:
        """Deprecated name of :attr:`refusal_prob` (a probability, not log-odds)."""
        return self.refusal_prob


class SearchBaseline(_Record):
    """The unedited model's values of the search objectives on the validation prompts."""

    refusal_prob: Rate
    refusal_score: float = Field(description="Refusal log-odds.")
    refusal: Rate | None = _omitted()

    @property
    def objective_refusal(self) -> float:
        """The unedited model's value of the search's refusal objective."""
        return self.refusal_prob if self.refusal is None else self.refusal


class SearchSeconds(_Record):
    """Wall time of the search and of the confirmations."""

    search: float
    confirm: float
    rescore: float | None = _omitted()


class SearchPrecision(_Record):
    """The Pareto-front trials re-scored in the model's own precision."""

    search_dtype: str
    model_dtype: str
    n_rescored: int
    spearman_refusal: float | None
    spearman_kl: float | None
    max_kl_difference: float
    same_order: bool
    same_front: bool


class CalibrationTrial(_Record):
    """One confirmed trial: the objective's mean prediction and the judged rate."""

    number: int
    predicted: Rate
    predicted_next_token: Rate
    judged: Rate


class ReliabilityBin(_Record):
    """Prompts whose predicted refusal probability fell in ``[lo, hi)``."""

    lo: float
    hi: float
    n: int
    predicted: Rate
    judged: Rate


class Calibration(_Record):
    """The refusal objective against the judge over the confirmed trials."""

    trials: list[CalibrationTrial]
    spearman: float | None
    spearman_next_token: float | None
    auc: float | None
    auc_next_token: float | None
    reliability: list[ReliabilityBin]
    n_prompts: int


class Optimization(_Record):
    """The ``optimize`` search: every trial, the Pareto front and the documented choice."""

    objectives: list[str]
    trials: list[Trial]
    chosen: Trial
    rule: str
    met_refusal_target: bool
    refusal_target: Rate
    baseline: SearchBaseline
    storage: str
    study_name: str
    n_trials: int
    seconds: SearchSeconds
    search_dtype: str
    openings: Openings | None = _omitted()
    precision: SearchPrecision | None = _omitted()
    calibration: Calibration | None = _omitted()
    refinement: Refinement | None = _omitted()

    @model_validator(mode="after")
    def _chosen_is_a_trial(self) -> Optimization:
        if self.chosen.number not in {t.number for t in self.trials}:
            raise ValueError(f"chosen trial {self.chosen.number} is not among the trials")
        return self
