"""``report.json`` and ``scores.json`` as typed, validated data.

Every command that evaluates a model (``run``, ``optimize``, ``evaluate``, and later ``detox``,
``heal``, ``steer``) writes one :class:`Report`; the renderers (Markdown, HTML, charts) read its
typed fields. The JSON keys are the ones abliterate 0.1.0 wrote, so scripts keep working
(``baseline`` / ``edited`` with ``refusal_rate``, ``kl_divergence``, ``completions`` of
``{prompt, response, refused}``, ...); reports now also carry ``schema_version``.

Two conventions keep the written keys exactly those of 0.1.0:

* a field that some reports lack altogether (``kl_divergence`` of an unedited model, the
  ``evaluate`` extras of a ``run`` report, ``optimization`` of a run that did not search) is
  *omitted* when it is None (:func:`~abliterate.report.schema.base._omitted`);
* a field that 0.1.0 wrote as ``null`` (``model.revision``, ``selection`` of an optimized run,
  ``baseline`` of an evaluation without a baseline model) is written as ``null``.

:func:`load_report` reads a file, migrates a report written before ``schema_version`` existed
(abliterate 0.1.0) and refuses anything else with a one-line :class:`ReportError`.

The records live in submodules by concern, and every public name is importable from here:

* :mod:`~abliterate.report.schema.base`: the strict frozen ``_Record``, ``_omitted``,
  ``Rate`` and :class:`ByPromptSet`;
* :mod:`~abliterate.report.schema.edit`: the model, prompt sets, edit and checks;
* :mod:`~abliterate.report.schema.search`: selection (``scores.json``) and optimization;
* :mod:`~abliterate.report.schema.results`: what was measured on one model;
* :mod:`~abliterate.report.schema.alignment`: fine-tuning, steering and detoxification;
* :mod:`~abliterate.report.schema.report`: :class:`Report` and the readers.
"""

from abliterate.report.schema.alignment import (
    DetoxResult,
    DinmInstanceRecord,
    LossPoint,
    SteeringResult,
    SweepPoint,
    Training,
)
from abliterate.report.schema.base import (
    ByPromptSet,
    Rate,
)
from abliterate.report.schema.edit import (
    AblationEdit,
    Checks,
    DirectionRecord,
    Edit,
    EditedWriters,
    ExportCheck,
    ModelRecord,
    OtherEdit,
    PromptSetRecord,
)
from abliterate.report.schema.report import (
    SCHEMA_VERSION,
    Command,
    Report,
    StageTiming,
    load_report,
    load_scores,
    migrate,
)
from abliterate.report.schema.results import (
    AgreementPair,
    BaselineCache,
    BenchmarkScores,
    CategoryKL,
    Completion,
    Fluency,
    JudgeResult,
    ModelResult,
    OverRefusal,
    SafeEditExample,
    SafeEditScores,
)
from abliterate.report.schema.search import (
    Calibration,
    CalibrationTrial,
    CandidateScore,
    Openings,
    Optimization,
    Refinement,
    RefusalOpening,
    ReliabilityBin,
    SearchBaseline,
    SearchPrecision,
    SearchSeconds,
    SelectionPrecision,
    SelectionScores,
    SelectionSummary,
    Trial,
    TrialParams,
)

__all__ = [
    "SCHEMA_VERSION",
    "AblationEdit",
    "AgreementPair",
    "BaselineCache",
    "BenchmarkScores",
    "ByPromptSet",
    "Calibration",
    "CalibrationTrial",
    "CandidateScore",
    "CategoryKL",
    "Checks",
    "Command",
    "Completion",
    "DetoxResult",
    "DinmInstanceRecord",
    "DirectionRecord",
    "Edit",
    "EditedWriters",
    "ExportCheck",
    "Fluency",
    "JudgeResult",
    "LossPoint",
    "ModelRecord",
    "ModelResult",
    "Openings",
    "Optimization",
    "OtherEdit",
    "OverRefusal",
    "PromptSetRecord",
    "Rate",
    "Refinement",
    "RefusalOpening",
    "ReliabilityBin",
    "Report",
    "SafeEditExample",
    "SafeEditScores",
    "SearchBaseline",
    "SearchPrecision",
    "SearchSeconds",
    "SelectionPrecision",
    "SelectionScores",
    "SelectionSummary",
    "StageTiming",
    "SteeringResult",
    "SweepPoint",
    "Training",
    "Trial",
    "TrialParams",
    "load_report",
    "load_scores",
    "migrate",
]
