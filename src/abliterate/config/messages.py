"""pydantic's validation errors as one line of text: the option, the rule, the bad value."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import CliPositionalArg

_POSITIONAL = CliPositionalArg.__metadata__[0]  # the marker CliPositionalArg puts on a field

_EXPECTED = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_parsing_size": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "string_unicode": "must be a string",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "iterable_type": "must be a list",
    "is_instance_of": "must be a path (a string)",
    "path_type": "must be a path (a string)",
}


def oneline(text: object) -> str:
    """``text`` on one line: control characters (newlines included) shown as escapes."""
    s = str(text)
    return s if s.isprintable() else repr(s)[1:-1]


def shown(value: Any) -> str:
    """A short, one-line rendering of a bad value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        # str() of a huge int raises (Python limits int-to-text conversion to 4300 digits).
        return str(value) if value.bit_length() <= 128 else "a number too large to show"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def option_name(model: type[BaseModel], name: str) -> str:
    """How the command line spells option ``name``: ``--n-train``, or ``MODEL`` for a positional."""
    field = model.model_fields.get(name)
    if field is not None and _POSITIONAL in field.metadata:
        return name.upper()
    return "--" + name.replace("_", "-")


def did_you_mean(name: str, model: type[BaseModel]) -> str:
    close = difflib.get_close_matches(name, list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _problem_text(error: ErrorDetails, model: type[BaseModel] | None) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "abliterate":
        return error["msg"]
    if kind == "missing":
        return "is required"
    if kind == "too_short":
        return "must not be empty"
    if kind == "extra_forbidden":
        name = str(error["loc"][-1]) if error["loc"] else ""
        if model is None:
            return "is not an option"
        return f"is not an option of {model.__name__}{did_you_mean(name, model)}"
    if kind == "literal_error":
        expected = f"must be one of {ctx['expected']}"
    elif kind == "greater_than":
        expected = "must be positive" if ctx["gt"] == 0 else f"must be greater than {ctx['gt']}"
    elif kind in ("greater_than_equal", "less_than", "less_than_equal"):
        bound = {"greater_than_equal": "at least", "less_than": "less than"}.get(kind, "at most")
        expected = f"must be {bound} {ctx.get('ge', ctx.get('lt', ctx.get('le')))}"
    elif kind in _EXPECTED:
        expected = _EXPECTED[kind]
    else:  # a kind of error these fields do not raise today; pydantic's words, on one line
        expected = "is invalid: " + oneline(error["msg"]).removeprefix("Value error, ")
    return f"{expected}, got {shown(error['input'])}"


def describe_errors(
    exc: ValidationError, model: type[BaseModel] | None = None, subject: str | None = None
) -> str:
    """pydantic's (multi-line) error as one line: the first error, then ``(and N more)``.

    Args:
        exc: The validation error.
        model: The model validated, for "did you mean" on an unknown name.
        subject: What was validated (``--n-train (config file run.toml)``); default: the field's
            name from the error, if any.
    """
    errors = exc.errors(include_url=False)
    first = errors[0]
    if subject is None and first["loc"]:
        subject = str(first["loc"][0])
    problem = _problem_text(first, model)
    text = f"{subject} {problem}" if subject else problem
    return text + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
