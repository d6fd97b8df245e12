"""Value types of the options: each carries its own checks, so that a field can be validated on
its own (one value from one source) as well as within its model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError
from pydantic_settings import CliVariadicArg

from abliterate.types import Site


def problem(message: str) -> PydanticCustomError:
    """A validation error whose message is shown as written (after the option's name)."""
    return PydanticCustomError("abliterate", message)


def _no_nul(text: str) -> str:
    # No file name, hub id or device can hold a NUL byte, and Path operations raise on one.
    if "\x00" in text:
        raise problem("must not contain a NUL character")
    return text


def _to_path(value: Any) -> Any:
    # A string becomes a Path here (not by pydantic's coercion) so that strictly checked file
    # values, which are strings, are accepted too; Path("") would silently mean ".".
    if isinstance(value, str):
        if not value.strip():
            raise problem("must not be empty")
        return Path(_no_nul(value))
    return value


def _split_names(value: Any) -> Any:
    """``"a,b"``, ``"a b"``, ``["a", "b,c"]`` -> ``("a", "b", "c")``, without duplicates.

    Anything else is passed on for the type check to reject (a list as a tuple, so that the
    check names the bad item rather than the list).
    """
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        return value
    if not all(isinstance(v, str) for v in value):
        return tuple(value)
    names = [name for item in value for name in re.split(r"[,\s]+", item) if name]
    return tuple(dict.fromkeys(names))


def check_judges(spec: str) -> str:
    """The ``--judge`` check: at least one judge named."""
    if not spec.strip(" ,"):
        raise problem("must name at least one judge, for example 'markers'")
    return spec


def check_temperature(value: float | None) -> float | None:
    """The ``--temperature`` check: unset (greedy) or positive."""
    if value is not None and value <= 0:
        raise problem(f"must be positive, got {value}; leave it unset for greedy decoding")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
"""A string option (a path, a hub id, a URL ...)."""
PathOption = Annotated[Path, BeforeValidator(_to_path)]
"""A filesystem path; a non-empty string is accepted."""
Count = Annotated[int, Field(ge=1)]
"""A number of things (prompts, tokens, trials): at least 1."""
Index = Annotated[int, Field(ge=0)]
"""A layer or trial number: at least 0."""
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
"""A float that is neither NaN nor infinite."""
# CliVariadicArg: on the command line the option takes several values (``--sites pre mid``).
Sites = CliVariadicArg[
    Annotated[tuple[Site, ...], BeforeValidator(_split_names), Field(min_length=1)]
]
"""Residual sites: a non-empty list (``pre mid``, ``pre,mid`` or a TOML/JSON list)."""
Names = CliVariadicArg[Annotated[tuple[Text, ...], BeforeValidator(_split_names)]]
"""A list of names: comma- or space-separated text, or a TOML/JSON list."""


def _split_numbers(value: Any) -> Any:
    """``"1,2"``, ``"1 2"``, ``["1", "2,3"]`` -> ``("1", "2", "3")`` for the number check; lists
    of numbers (config files) pass as tuples."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        return value
    if not all(isinstance(v, str) for v in value):
        return tuple(value)
    return tuple(part for item in value for part in re.split(r"[,\s]+", item) if part)


Indices = CliVariadicArg[Annotated[tuple[Index, ...], BeforeValidator(_split_numbers)]]
"""Layer numbers: a list (``10 11 12``, ``10,11,12`` or a TOML/JSON list); may be empty."""
Strengths = CliVariadicArg[Annotated[tuple[FiniteFloat, ...], BeforeValidator(_split_numbers)]]
"""Finite numbers: a list (``-2 0 2 4``, ``0,2`` or a TOML/JSON list); may be empty."""
