"""Typed configuration: pydantic models that drive the Python API, the CLI and config files.

Options are declared once, in groups by concern: :class:`ModelOptions`, :class:`PromptOptions`
(built on :class:`EvalPromptOptions`), :class:`SelectionOptions`, :class:`SearchOptions`,
:class:`ThinkingOptions`, :class:`EvalOptions`, :class:`BaselineCacheOptions` and
:class:`OutputOptions`. Each field carries
its help text. A command's
config inherits the groups it uses (:class:`RunConfig`, :class:`OptimizeConfig`,
:class:`EvaluateConfig`, :class:`ChatConfig`, :class:`ReportConfig`), so its fields read flat
(``config.n_train``), it *is* an instance of each of its groups, and
``config.section(SearchOptions)`` hands a group whole to the code that uses it.

The commands that change a model by data (``filter-dataset``, ``sft``, ``heal``) have their
configs and groups (:class:`TrainOptions`, :class:`JudgeBenchmarkOptions`) in
:mod:`abliterate.config.training`.

Every value is validated where it enters. Built in Python (``RunConfig(n_train=8)``), a config
is validated by pydantic's usual (lax) rules. :func:`load_config` resolves a command's config
the way the CLI does, from defaults < a TOML/JSON config file < ``ABLITERATE_<OPTION>``
environment variables < command-line values, and validates each value against its field
before the layers are merged, so an error names the option *and where the bad value came
from*. File values are checked strictly (TOML and JSON have types: ``"false"`` is not a
boolean, ``3.0`` is not a count); environment and command-line values are text and are parsed.
Invalid values raise :class:`~abliterate.errors.ConfigError` with one line of text.

This module is imported by ``abliterate --help``: it must not import torch or transformers.
"""

from abliterate.config.alignment import (
    DetoxConfig,
    DirectionCombineConfig,
    DirectionConfig,
    SteerConfig,
)
from abliterate.config.commands import (
    ApplyConfig,
    ChatConfig,
    EvaluateConfig,
    OptimizeConfig,
    PushConfig,
    ReportConfig,
    RunConfig,
)
from abliterate.config.groups import (
    BaselineCacheOptions,
    EvalOptions,
    EvalPromptOptions,
    ExportOptions,
    ModelOptions,
    Options,
    OutputOptions,
    PromptOptions,
    SteerHookOptions,
    ThinkingOptions,
    to_dict,
)
from abliterate.config.messages import describe_errors, option_name
from abliterate.config.search import SearchOptions, SelectionOptions
from abliterate.config.sources import ENV_PREFIX, load_config, read_config_file
from abliterate.config.training import (
    FilterDatasetConfig,
    HealConfig,
    JudgeBenchmarkOptions,
    SftConfig,
    TrainOptions,
)

__all__ = [
    "ENV_PREFIX",
    "ApplyConfig",
    "BaselineCacheOptions",
    "ChatConfig",
    "DetoxConfig",
    "DirectionCombineConfig",
    "DirectionConfig",
    "EvalOptions",
    "EvalPromptOptions",
    "EvaluateConfig",
    "ExportOptions",
    "FilterDatasetConfig",
    "HealConfig",
    "JudgeBenchmarkOptions",
    "ModelOptions",
    "OptimizeConfig",
    "Options",
    "OutputOptions",
    "PromptOptions",
    "PushConfig",
    "ReportConfig",
    "RunConfig",
    "SearchOptions",
    "SelectionOptions",
    "SftConfig",
    "SteerConfig",
    "SteerHookOptions",
    "ThinkingOptions",
    "TrainOptions",
    "describe_errors",
    "load_config",
    "option_name",
    "read_config_file",
    "to_dict",
]
