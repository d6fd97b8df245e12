"""Exceptions for expected, user-facing errors.

Every error a user can cause (a bad path, a model without a chat template, an unknown column)
raises a subclass of :class:`AbliterateError`. The CLI prints its message on one line and exits
non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AbliterateError(Exception):
    """Base class of all expected errors; the message is shown to the user as is."""


class ConfigError(AbliterateError, ValueError):
    """A configuration value is invalid. The message names the field and the fix."""


class ModelLoadError(AbliterateError):
    """A model could not be found or loaded."""


class DemoModelError(ModelLoadError):
    """The embedded demo model is not installed or its assembled file is corrupt."""


class UnsupportedArchitectureError(AbliterateError):
    """The model's layers or residual writers could not be resolved."""


class ChatTemplateError(AbliterateError):
    """The tokenizer has no chat template, so instructions cannot be formatted."""


class PromptSetError(AbliterateError):
    """A prompt set could not be read: missing file, unknown column, empty set."""


class DatasetError(AbliterateError):
    """An instruction or preference dataset could not be read or written: missing file,
    unknown format, malformed row."""


class TrainingError(AbliterateError):
    """Fine-tuning cannot start or resume: no chat template, checkpoints of another run, a
    training mode the machine cannot run (QLoRA without CUDA)."""


class OutputDirError(AbliterateError):
    """The output directory is or contains an input, exists and is not a run directory that
    may be replaced, or cannot be written."""


class DirectionFileError(AbliterateError, ValueError):
    """A saved direction file is missing, truncated, or was not written by this tool."""


class NonFiniteError(AbliterateError):
    """A computation produced NaN or infinite values where only finite ones make sense (an
    edit's weights)."""


class JudgeError(AbliterateError):
    """A refusal judge is unknown, misconfigured, or its model or endpoint failed."""


class BenchmarkError(AbliterateError):
    """A benchmark task is unknown, or lm-evaluation-harness is missing or failed."""


class ReportError(AbliterateError):
    """A ``report.json`` or ``scores.json`` is missing, malformed, or of an unknown version."""


class EditError(AbliterateError):
    """An edit cannot be applied, baked or exported as asked (the message says why and what
    works instead)."""


class ExportError(AbliterateError):
    """An edit or a model cannot be written in the requested format: an unsupported family or
    tokenizer, a GGUF type that cannot be requantized, an edit that is not low-rank."""


class HubError(AbliterateError):
    """An upload to the hub failed: no network, no or a wrong token, a repository refused."""
