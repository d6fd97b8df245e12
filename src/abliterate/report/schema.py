"""``report.json`` and ``scores.json`` as typed, validated data.

Every command that evaluates a model (``run``, ``optimize``, ``evaluate``, and later ``detox``,
``heal``, ``steer``) writes one :class:`Report`; the renderers (Markdown, HTML, charts) read its
typed fields. The JSON keys are the ones abliterate 0.1.0 wrote, so scripts keep working
(``baseline`` / ``edited`` with ``refusal_rate``, ``kl_divergence``, ``completions`` of
``{prompt, response, refused}``, ...); reports now also carry ``schema_version``.

Two conventions keep the written keys exactly those of 0.1.0:

* a field that some reports lack altogether (``kl_divergence`` of an unedited model, the
  ``evaluate`` extras of a ``run`` report, ``optimization`` of a run that did not search) is
  *omitted* when it is None (:func:`_omitted`);
* a field that 0.1.0 wrote as ``null`` (``model.revision``, ``selection`` of an optimized run,
  ``baseline`` of an evaluation without a baseline model) is written as ``null``.

:func:`load_report` reads a file, migrates a report written before ``schema_version`` existed
(abliterate 0.1.0) and refuses anything else with a one-line :class:`ReportError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Final, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    computed_field,
    model_validator,
)

from abliterate.errors import ReportError
from abliterate.types import Site

SCHEMA_VERSION: Final = 1
"""The version of the ``report.json`` layout this package writes and reads."""

Command = Literal["run", "optimize", "evaluate", "detox", "heal", "steer", "sft"]
"""The command that wrote a report."""

Rate = Annotated[float, Field(ge=0.0, le=1.0)]
"""A fraction of prompts, in [0, 1]."""

T = TypeVar("T")


def _is_none(value: object) -> bool:
    return value is None


def _omitted() -> Any:
    """A field that defaults to None and is left out of the JSON when None (see module doc)."""
    return Field(default=None, exclude_if=_is_none)


class _Record(BaseModel):
    # Unknown keys are refused: a producer that adds a key must add it here too, so the
    # schema stays the one description of report.json. NaN and infinities are written as JSON
    # constants (as json.dumps did), so a report survives a round trip through its JSON.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class ByPromptSet(_Record, Generic[T]):
    """One value per prompt set of an evaluation: the harmful prompts and, where the command
    measures over-refusal (``evaluate``), the over-refusal prompts."""

    harmful: T
    over_refusal: T | None = _omitted()

    def items(self) -> list[tuple[str, T]]:
        """``(prompt set, value)`` for every prompt set that was measured."""
        out = [("harmful", self.harmful)]
        if self.over_refusal is not None:
            out.append(("over_refusal", self.over_refusal))
        return out


# --- what was evaluated ---------------------------------------------------------------------


class ModelRecord(_Record):
    """The model a report is about."""

    name: str
    source: str = Field(description="Local directory or file the weights were read from.")
    revision: str | None = None
    architecture: str = Field(description="One-line description of the architecture.")


class PromptSetRecord(_Record):
    """A prompt set as used: its name, size and content hash."""

    name: str
    n: int = Field(ge=0)
    sha256: str | None = _omitted()


class DirectionRecord(_Record):
    """A direction's metadata (``Direction.metadata()``), without the vector."""

    model_config = ConfigDict(extra="allow")

    layer: int | float = Field(description="Layer, fractional when interpolated.")
    site: Site
    scale: float | None = None
    model: str | None = None
    revision: str | None = None
    dataset_hashes: dict[str, str] = Field(default_factory=dict)
    projected: bool = False
    d_model: int | None = None


class AblationEdit(_Record):
    """A directional-ablation edit (``EditSpec.to_dict()``): per-layer strengths of removing
    a direction from each residual writer. Further keys are kept as they are."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["directional_ablation"]
    mode: Literal["plain", "norm_preserving", "affine"] = "plain"
    direction: DirectionRecord
    embedding: float
    attention: list[float]
    mlp: list[float]
    layer_directions: list[DirectionRecord] | None = None
    extra_directions: list[DirectionRecord] = Field(default_factory=list)


class OtherEdit(_Record):
    """An edit of any other kind: only its ``kind`` is known to the report."""

    model_config = ConfigDict(extra="allow")

    kind: str


def _edit_tag(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return "ablation" if kind == "directional_ablation" else "other"


Edit = Annotated[
    Annotated[AblationEdit, Tag("ablation")] | Annotated[OtherEdit, Tag("other")],
    Discriminator(_edit_tag),
]
"""An edit's ``to_dict()``: typed for directional ablation, a mapping with a ``kind`` else."""


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


class EditedWriters(_Record):
    """What baking the edit changed: tensors written, and residual writers edited per role
    (``embedding``, ``attention``, ``mlp``, ``expert``, ``shared_expert``, ``mixer``)."""

    n_tensors: int = Field(ge=0)
    writers_by_role: dict[str, int]


class ExportCheck(_Record):
    """One further export of the edited model (``--export``): a GGUF file or a LoRA adapter,
    with its logits measured against the evaluated model where the check ran."""

    format: str = Field(description="gguf:f16, gguf:bf16, gguf:q8_0, lora or lora-gguf.")
    path: str = Field(description="Relative to the run directory.")
    size_bytes: int = Field(ge=0)
    sha256: str
    max_abs_logit: float | None = _omitted()
    mean_kl: float | None = _omitted()
    note: str | None = _omitted()


class Checks(_Record):
    """Consistency checks of a run's edit and export (a trained model has no hooks to check)."""

    hooks_vs_weights_max_abs_diff: float | None = _omitted()
    export_reload_max_abs_diff: float | None = Field(description="None: model not saved.")
    edited_writers: EditedWriters | None = _omitted()
    exports: list[ExportCheck] | None = _omitted()


# --- what was measured ----------------------------------------------------------------------


class Completion(_Record):
    """One prompt, the model's answer and the judges' verdict.

    ``response`` is the whole generation, reasoning included; judges read only the answer
    after the reasoning. ``unfinished``: the answer never arrived within the token budget (the
    reasoning did not close, or nothing followed it); such a completion was not judged, is not
    ``refused`` and is left out of the refusal rate.
    """

    prompt: str
    response: str
    refused: bool
    category: str | None = _omitted()
    judges: dict[str, bool] | None = _omitted()
    unfinished: bool | None = _omitted()
    late_refusal: bool | None = Field(
        default=None,
        exclude_if=_is_none,
        description="The marker judge found a refusal phrase only after the first sentence.",
    )


class OverRefusal(_Record):
    """Answers to harmless but sensitive-sounding prompts."""

    n_prompts: int = Field(ge=0)
    n_unfinished: int | None = _omitted()
    unfinished_rate: Rate | None = _omitted()
    late_refusal_rate: Rate | None = _omitted()
    by_category: dict[str, Rate]
    completions: list[Completion]


class JudgeResult(_Record):
    """One judge's rates; an LLM judge also keeps its raw answers and how many it could not
    parse."""

    refusal_rate: Rate
    over_refusal_rate: Rate | None = _omitted()
    n_unparsed: ByPromptSet[int] | None = _omitted()
    answers: ByPromptSet[list[str]] | None = _omitted()


class AgreementPair(_Record):
    """Agreement of two judges on the same answers."""

    judges: tuple[str, str]
    agreement: Rate
    cohen_kappa: float | None
    n: int


class Fluency(_Record):
    """Mean distinct-n (share of unique word n-grams) and n-gram entropy (bits) of answers."""

    n_texts: int
    distinct_1: float | None
    distinct_2: float | None
    distinct_3: float | None
    entropy_1: float | None
    entropy_2: float | None
    entropy_3: float | None


class BenchmarkScores(_Record):
    """One lm-evaluation-harness task: items scored, where the task came from, and its metrics
    under lm-eval's names (``acc``, ``acc_stderr``, ``acc_norm``, ...)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float | None]  # the metrics

    n: int
    source: Literal["builtin", "lm-eval"]

    def metric(self, name: str) -> float | None:
        """The metric ``name``, or None when the task does not report it."""
        return (self.__pydantic_extra__ or {}).get(name)

    @property
    def metrics(self) -> dict[str, float | None]:
        """Every metric, by lm-eval name."""
        return dict(self.__pydantic_extra__ or {})


class CategoryKL(_Record):
    """The KL divergences of one category of harmless prompts (``kl_by_category``)."""

    n: int = Field(ge=1)
    kl_divergence: float = Field(description="First-token KL, averaged over the category.")
    kl_divergence_multi_token: float


class SafeEditExample(_Record):
    """One edited input, the model's answer and whether the deciding judge counted it safe
    (``unfinished``: the answer never arrived after the reasoning, and was not judged)."""

    input: str
    response: str
    refused: bool
    unfinished: bool | None = _omitted()


class SafeEditScores(_Record):
    """SafeEdit-style scores of one model (``detox``): defense success on the edited inputs,
    defense generalization on four kinds of unseen input and their average, fluency of the
    answers to the edited inputs, and general-knowledge accuracy."""

    defense_success: Rate
    dg_only_question: Rate
    dg_other_attack: Rate
    dg_other_question: Rate
    dg_other_both: Rate
    dg_average: Rate
    knowledge_accuracy: Rate
    fluency: Fluency
    n_instances: int = Field(ge=0)
    n_knowledge: int = Field(ge=0)
    judge: str = Field(description="The judge whose refusal verdict counts as safe.")
    judges: dict[str, dict[str, Rate]] | None = _omitted()
    unfinished: dict[str, Rate] | None = Field(
        default=None,
        exclude_if=_is_none,
        description="With --thinking on: per score (defense_success, dg_*, knowledge), the share "
        "of answers that never arrived after the reasoning; every score is over the finished "
        "answers.",
    )
    examples: list[SafeEditExample]


class ModelResult(_Record):
    """Everything measured on one model (``baseline`` or ``edited``).

    ``run`` reports carry the refusal rate, the completions and, for the edited model, the KL
    divergences; ``evaluate`` reports add over-refusal, per-judge rates, reference
    cross-entropy, fluency and benchmarks. Reasoning models add the unfinished answers
    (``n_unfinished``, ``unfinished_rate``: present with ``--thinking on`` or when any answer
    was unfinished); every rate is then over the finished answers only.
    """

    refusal_rate: Rate
    n_prompts: int = Field(ge=0)
    judge: str = Field(description="The judge that decided each completion's ``refused``.")
    n_unfinished: int | None = _omitted()
    unfinished_rate: Rate | None = Field(
        default=None,
        exclude_if=_is_none,
        description="Share of prompts whose answer never arrived within the token budget.",
    )
    late_refusal_rate: Rate | None = Field(
        default=None,
        exclude_if=_is_none,
        description="Share of finished answers whose first refusal phrase comes after the first "
        "sentence (counted in refusal_rate too).",
    )
    n_late_refusals: int | None = _omitted()
    kl_divergence: float | None = _omitted()
    kl_divergence_multi_token: float | None = _omitted()
    kl_tokens: int | None = _omitted()
    kl_by_category: dict[str, CategoryKL] | None = Field(
        default=None,
        exclude_if=_is_none,
        description="First-token and multi-token KL per category of the harmless prompts.",
    )
    over_refusal_rate: Rate | None = _omitted()
    over_refusal: OverRefusal | None = _omitted()
    judges: dict[str, JudgeResult] | None = _omitted()
    judge_agreement: ByPromptSet[list[AgreementPair]] | None = _omitted()
    reference_cross_entropy: float | None = _omitted()
    fluency: ByPromptSet[Fluency] | None = _omitted()
    benchmarks: dict[str, BenchmarkScores] | None = _omitted()
    safeedit: SafeEditScores | None = _omitted()
    completions: list[Completion]

    @model_validator(mode="after")
    def _one_completion_per_prompt(self) -> ModelResult:
        if len(self.completions) != self.n_prompts:
            raise ValueError(
                f"n_prompts is {self.n_prompts} but there are {len(self.completions)} completions"
            )
        return self


class BaselineCache(_Record):
    """Where the unedited model's evaluation came from (:mod:`abliterate.eval.cache`)."""

    hit: bool = Field(description="True: read from the cache; False: measured (and stored).")
    key: str = Field(description="The entry's content address (sha256 of its key).")
    stored: bool = Field(description="Whether the measured evaluation was written to the cache.")


class LossPoint(_Record):
    """The training loss logged at one optimizer step."""

    step: int = Field(ge=0)
    loss: float


class Training(_Record):
    """How a model was fine-tuned (``sft``, ``heal``) and how its loss went."""

    method: Literal["sft", "dpo", "distill"]
    adapter: Literal["lora", "qlora", "full"]
    data: str = Field(description="The training data: a dataset, or the pairs built from a run.")
    n_examples: int = Field(ge=0, description="Training examples (after the held-out ones).")
    n_heldout: int = Field(ge=0)
    steps: int = Field(ge=0, description="Optimizer steps taken, resumed ones included.")
    epochs: float
    learning_rate: float
    batch_size: int = Field(description="Examples per optimizer step (all devices).")
    lora_r: int | None = _omitted()
    lora_alpha: int | None = _omitted()
    beta: float | None = _omitted()
    loss_type: list[str] | None = _omitted()
    resumed_from_step: int | None = Field(None, description="Checkpoint step resumed from.")
    heldout_loss_before: float | None = None
    heldout_loss_after: float | None = None
    pairs: dict[str, int] | None = _omitted()
    seconds: float = Field(ge=0, description="Wall time of this process's training.")
    losses: list[LossPoint]


# --- composable alignment: steering and detoxification --------------------------------------


class SweepPoint(_Record):
    """A steering's metric at one strength, with the first prompt's answer as an example and
    the answers' repetitiveness (``distinct_3``: the mean share of distinct word 3-grams; 1 is
    no repetition, a steering too strong for the model falls toward 0 as it loops). With
    ``--thinking on`` the metric reads the answers after the reasoning, over the finished ones,
    and ``unfinished_rate`` is the share that never arrived."""

    strength: float
    value: float
    example: str
    distinct_3: float | None = _omitted()
    unfinished_rate: Rate | None = _omitted()


class SteeringResult(_Record):
    """What ``steer`` applied and its strength sweep."""

    direction: str = Field(description="The direction file.")
    description: str
    site: Site
    layers: list[int]
    strength: float
    mode: Literal["add", "remove"]
    metric: Literal["length", "refusal"]
    metric_unit: str
    metric_prompts: PromptSetRecord
    sweep: list[SweepPoint]
    prior_edit: str | None = _omitted()
    control_vector: str | None = _omitted()
    control_vector_refused: str | None = _omitted()
    bake_refused: str | None = _omitted()


class DinmInstanceRecord(_Record):
    """DINM on one instance: the located layer, the per-layer distances between its safe and
    unsafe answers' mean states, and the loss terms at each Adam step."""

    id: str
    layer: int
    distances: list[float]
    nll: list[float]
    kl: list[float]
    guard_kl: list[float] = Field(
        default_factory=list,
        description="The guard's KL at each step (empty without a guard, and in reports written "
        "before it existed).",
    )


class DetoxResult(_Record):
    """What ``detox`` did: the instances, the DINM settings and each instance's record."""

    instances: PromptSetRecord
    mode: Literal["sequence", "batch"]
    steps: int
    lr: float
    kl_weight: float
    guard_prompts: int = Field(0, description="Harmless prompts the guard held in place (0: none).")
    records: list[DinmInstanceRecord]
    edited_tensors: list[str]
    prior_edit: str | None = _omitted()
    kl_to_original: float | None = Field(
        default=None,
        exclude_if=_is_none,
        description="First-token KL(original ‖ detoxified) on the harmless prompts, the "
        "original being MODEL without --edit.",
    )
    baseline_kl_to_original: float | None = _omitted()


class StageTiming(_Record):
    """Wall time and peak resident memory of one stage."""

    seconds: float
    peak_rss_mb: float


class Report(_Record):
    """``report.json``: everything a command measured, for scripts and for the renderers."""

    schema_version: Literal[1] = SCHEMA_VERSION
    command: Command
    abliterate_version: str
    model: ModelRecord
    baseline_model: ModelRecord | None = Field(
        None, description="``evaluate``: the model compared against, if any."
    )
    original_model: ModelRecord | None = _omitted()
    data: dict[str, PromptSetRecord] = Field(description="Prompt sets by role (eval_harmful...).")
    judges: list[str] | None = _omitted()
    edit: Edit | None = _omitted()
    selection: SelectionSummary | None = None
    optimization: Optimization | None = _omitted()
    checks: Checks | None = _omitted()
    measured_on: str | None = Field(
        default=None,
        exclude_if=_is_none,
        description="Why the edit was measured on another model than the one evaluated and "
        "exported (its weights were quantized or offloaded); the evaluated model is the same "
        "checkpoint in full precision, with the edit baked in.",
    )
    training: Training | None = _omitted()
    steering: SteeringResult | None = _omitted()
    detox: DetoxResult | None = _omitted()
    baseline: ModelResult | None = None
    baseline_cache: BaselineCache | None = _omitted()
    edited: ModelResult = Field(description="The edited (or evaluated) model.")
    n_examples: int = Field(4, ge=0, description="Examples shown side by side in report.md.")
    timings: dict[str, StageTiming] = Field(default_factory=dict)

    def to_json(self) -> str:
        """The ``report.json`` text: indented, with the keys described in the module doc."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


# --- reading --------------------------------------------------------------------------------

ModelT = TypeVar("ModelT", bound=BaseModel)


def _read_object(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ReportError(f"{path} does not exist.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} cannot be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ReportError(f"{path} must hold a JSON object, not {type(raw).__name__}.")
    return raw


def _validate(cls: type[ModelT], data: dict[str, Any], path: Path) -> ModelT:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise ReportError(
            f"{path} is not a valid {cls.__name__}: {where}: {first['msg']}{more}."
        ) from exc


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """A report written before ``schema_version`` existed (abliterate 0.1.0), in the current
    layout: the version is added and the command inferred (0.1.0 named only ``evaluate``).

    Trials' old ``refusal_score`` key is read by :class:`Trial` itself.
    """
    command = raw.get("command") or ("optimize" if raw.get("optimization") else "run")
    return {"schema_version": SCHEMA_VERSION, "command": command, **raw}


def load_report(path: Path) -> Report:
    """Read ``report.json``, migrating one written by abliterate 0.1.0.

    Raises:
        ReportError: The file is missing, is not JSON, has a ``schema_version`` this package
            does not read, or does not match the schema; the message names the file and the
            first problem.
    """
    raw = _read_object(path)
    version = raw.get("schema_version")
    if version is None:
        raw = migrate(raw)
    elif type(version) is not int or version != SCHEMA_VERSION:
        raise ReportError(
            f"{path} has schema_version {version!r}, but this abliterate reads version "
            f"{SCHEMA_VERSION} (and unversioned 0.1.0 reports); upgrade abliterate to read it."
        )
    return _validate(Report, raw, path)


def load_scores(path: Path) -> SelectionScores:
    """Read ``scores.json`` (the candidate scores of a selection).

    Raises:
        ReportError: As :func:`load_report`.
    """
    return _validate(SelectionScores, _read_object(path), path)
