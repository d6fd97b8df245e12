"""What was measured on one model (``baseline`` or ``edited``): completions and their
verdicts, over-refusal, judges, KL, fluency, benchmarks and SafeEdit scores."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from abliterate.report.schema.base import ByPromptSet, Rate, _is_none, _omitted, _Record

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
