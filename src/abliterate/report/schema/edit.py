"""What a report is about and what was done to it: the model, the prompt sets, the edit, and the
consistency checks of the edit and of its exports."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag

from abliterate.report.schema.base import _is_none, _omitted, _Record
from abliterate.types import Site

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
    n_used: int | None = Field(
        default=None,
        ge=0,
        exclude_if=_is_none,
        description="Harmful training prompts the directions were computed from (those the "
        "unedited model refuses, --refusal-filter); absent: all n.",
    )


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


# --- how the edit was checked --------------------------------------------------------------


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
