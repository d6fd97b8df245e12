"""How a model was changed other than by an ablation: fine-tuning (``sft``, ``heal``),
steering (``steer``) and DINM detoxification (``detox``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from abliterate.report.schema.base import Rate, _is_none, _omitted, _Record
from abliterate.report.schema.edit import PromptSetRecord
from abliterate.types import Site

# --- fine-tuning ----------------------------------------------------------------------------


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
