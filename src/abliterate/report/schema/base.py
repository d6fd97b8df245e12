"""The building blocks of every ``report.json`` record: the strict frozen base, optional
fields left out when None, fractions and per-prompt-set values (see :mod:`abliterate.report.schema`
for the conventions)."""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

Rate = Annotated[float, Field(ge=0.0, le=1.0)]
"""A fraction of prompts, in [0, 1]."""

T = TypeVar("T")


def _is_none(value: object) -> bool:
    return value is None


def _omitted() -> Any:
    """A field that defaults to None and is left out of the JSON when None (see
    :mod:`abliterate.report.schema`)."""
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
