"""The option groups and the command configs built from them, in one place.

They are defined by concern: :class:`Options` and the shared groups in
:mod:`abliterate.config.groups`, the groups of selection and search in
:mod:`abliterate.config.search`, and the configs of ``run``, ``optimize``, ``evaluate``, ``chat``,
``push``, ``report`` and ``apply`` in :mod:`abliterate.config.commands`.
"""

from abliterate.config.commands import (
    WRITER_KINDS,
    ApplyConfig,
    ChatConfig,
    EvaluateConfig,
    OptimizeConfig,
    PushConfig,
    ReportConfig,
    RunConfig,
)
from abliterate.config.groups import (
    EXPORT_FORMATS,
    BaselineCacheOptions,
    EvalOptions,
    EvalPromptOptions,
    ExportOptions,
    ModelOptions,
    Options,
    OutputOptions,
    PromptOptions,
    RepoId,
    SteerHookOptions,
    ThinkingOptions,
    to_dict,
)
from abliterate.config.search import SearchOptions, SelectionOptions

__all__ = [
    "EXPORT_FORMATS",
    "WRITER_KINDS",
    "ApplyConfig",
    "BaselineCacheOptions",
    "ChatConfig",
    "EvalOptions",
    "EvalPromptOptions",
    "EvaluateConfig",
    "ExportOptions",
    "ModelOptions",
    "OptimizeConfig",
    "Options",
    "OutputOptions",
    "PromptOptions",
    "PushConfig",
    "RepoId",
    "ReportConfig",
    "RunConfig",
    "SearchOptions",
    "SelectionOptions",
    "SteerHookOptions",
    "ThinkingOptions",
    "to_dict",
]
