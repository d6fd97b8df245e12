"""The ``report.json`` record itself, and reading ``report.json`` and ``scores.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

from abliterate.errors import ReportError
from abliterate.report.schema.alignment import DetoxResult, SteeringResult, Training
from abliterate.report.schema.base import _is_none, _omitted, _Record
from abliterate.report.schema.edit import Checks, Edit, ModelRecord, PromptSetRecord
from abliterate.report.schema.results import BaselineCache, ModelResult
from abliterate.report.schema.search import Optimization, SelectionScores, SelectionSummary

SCHEMA_VERSION: Final = 1
"""The version of the ``report.json`` layout this package writes and reads."""

Command = Literal["run", "optimize", "evaluate", "detox", "heal", "steer", "sft"]
"""The command that wrote a report."""


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
