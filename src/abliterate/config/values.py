"""Value types of the options: each carries its own checks, so that a field can be validated on
its own (one value from one source) as well as within its model."""

from __future__ import annotations

import json
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


# accelerate's placement strategies (transformers' from_pretrained(device_map=...)).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"(cpu|disk|mps|(cuda|xpu|npu)(:\d+)?)")
_MEMORY_KEY = re.compile(r"\d+|cpu|mps|disk")
# The units accelerate's convert_file_size_to_int reads (a plain number is bytes).
_MEMORY_SIZE = re.compile(r"\d+(\.\d+)?(GiB|MiB|KiB|GB|MB|KB)?")


def parse_device_map(spec: str) -> str | dict[str, int | str]:
    """``--device-map``: a placement strategy, or a JSON object from module name (``""`` for
    the whole model) to a device: a GPU index, ``"cpu"``, ``"disk"``, ``"cuda:N"``, ``"mps"``.

    Raises:
        PydanticCustomError: anything else, with the reason.
    """
    text = spec.strip()
    if text in DEVICE_MAP_STRATEGIES:
        return text
    if not text.startswith("{"):
        raise problem(
            f"must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON object such as "
            '\'{"model.embed_tokens": 0, "model.layers": "cpu"}\', got ' + repr(spec)
        )
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise problem(f"is not valid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(mapping, dict) or not mapping:
        raise problem("must be a non-empty JSON object from module names to devices")
    for module, device in mapping.items():
        index = isinstance(device, int) and not isinstance(device, bool) and device >= 0
        if not index and not (isinstance(device, str) and _DEVICE.fullmatch(device)):
            raise problem(
                f"maps {module!r} to {device!r}; a device is a GPU index (0, 1, ...), 'cpu', "
                "'disk', 'mps' or 'cuda:N'"
            )
    return mapping


def parse_max_memory(spec: str) -> dict[int | str, str]:
    """``--max-memory``: ``"0=20GiB,1=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu":
    "60GiB"}`` (GPU indices as integers, as accelerate takes them).

    Raises:
        PydanticCustomError: a malformed item, with the expected form.
    """
    out: dict[int | str, str] = {}
    for item in (part.strip() for part in spec.split(",")):
        key, sep, size = (x.strip() for x in item.partition("="))
        if not sep or not _MEMORY_KEY.fullmatch(key) or not _MEMORY_SIZE.fullmatch(size):
            raise problem(
                f"item {item!r} is not DEVICE=SIZE; write for example '0=20GiB,cpu=60GiB' "
                "(devices: GPU indices, cpu, mps, disk; sizes in GiB, MiB, GB, MB or bytes)"
            )
        device: int | str = int(key) if key.isdigit() else key
        if device in out:
            raise problem(f"names {key} twice")
        out[device] = size
    return out


def _check_device_map(spec: str | None) -> str | None:
    if spec is not None:
        parse_device_map(spec)
    return spec


def _check_max_memory(spec: str | None) -> str | None:
    if spec is not None:
        parse_max_memory(spec)
    return spec


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
DeviceMap = Annotated[str, AfterValidator(_no_nul), AfterValidator(_check_device_map)]
"""``--device-map``: checked by :func:`parse_device_map`, kept as written (config.json)."""
MaxMemory = Annotated[str, AfterValidator(_no_nul), AfterValidator(_check_max_memory)]
"""``--max-memory``: checked by :func:`parse_max_memory`, kept as written."""
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
