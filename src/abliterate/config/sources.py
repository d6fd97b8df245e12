"""Where option values come from: a config file, the environment, the command line; layered
and validated one value at a time, so that an error names the option and its source."""

from __future__ import annotations

import functools
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from abliterate.config.groups import Options
from abliterate.config.messages import describe_errors, did_you_mean, oneline, option_name, shown
from abliterate.errors import ConfigError

ENV_PREFIX = "ABLITERATE_"
"""Environment variables ``ABLITERATE_<OPTION>`` (e.g. ``ABLITERATE_N_TRAIN=64``) set options."""

C = TypeVar("C", bound=Options)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a config file that sets an option twice is
    # more likely a mistake than an override.
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"key {key!r} appears twice")
        data[key] = value
    return data


def read_config_file(path: Path) -> dict[str, Any]:
    """The table of a ``.toml`` or ``.json`` config file (``n-train`` read as ``n_train``).

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8, not valid TOML/JSON, not a
            table, or names an option twice.
    """
    where = f"config file {oneline(path)}"
    kind = path.suffix.lower()
    if kind not in (".toml", ".json"):
        raise ConfigError(f"{where} must end in .toml or .json.")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {oneline(exc.strerror or exc)}.") from exc
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
        if kind == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = json.loads(text, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}).") from exc
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError and JSONDecodeError included
        raise ConfigError(f"{where} is not valid {kind[1:].upper()}: {oneline(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a table of option names and values.")
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in values:
            raise ConfigError(f"{where} sets {name!r} twice.")
        values[name] = value
    return values


@functools.cache
def _field_adapter(model: type[Options], name: str) -> TypeAdapter[Any]:
    """Validates one field of ``model`` on its own: its type with its constraints and checks."""
    field = model.model_fields[name]
    # The field's type with its constraints and validators: a type built at run time, which
    # mypy cannot follow (hence Any).
    form: Any = field.annotation
    if field.metadata:
        annotated: Any = Annotated
        form = annotated[(form, *field.metadata)]
    return TypeAdapter(form)


def _checked(model: type[Options], name: str, value: Any, where: str, strict: bool) -> Any:
    subject = f"{option_name(model, name)} ({where})"
    if name not in model.model_fields:
        hint = did_you_mean(name, model) or "; --help lists the options."
        raise ConfigError(f"unknown option {shown(name)} in {where}{hint}")
    try:
        return _field_adapter(model, name).validate_python(value, strict=strict)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, subject=subject)) from exc


def load_config(
    model: type[C],
    *,
    command_line: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Resolve a command's config from its sources, as the CLI does.

    Precedence: the defaults < ``config_file`` (TOML/JSON) < ``environ``'s ``ABLITERATE_<OPTION>``
    variables < ``command_line``. Each value is validated against its field before the layers
    are merged (file values strictly, by their TOML/JSON type; environment and command-line
    text is parsed), so an error names the option and its source; the merged config is then
    checked as a whole (rules that tie options together).

    Args:
        model: The config class, e.g. :class:`RunConfig`.
        command_line: Option values from the command line, by field name.
        config_file: A ``.toml`` or ``.json`` file of options.
        environ: The environment (e.g. ``os.environ``); ``None`` reads no variables.

    Raises:
        ConfigError: one line naming the first bad option and where its value came from.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        where = f"config file {oneline(config_file)}"
        for name, value in read_config_file(config_file).items():
            values[name] = _checked(model, name, value, where, strict=True)
    environ = environ or {}
    for name in model.model_fields:
        variable = ENV_PREFIX + name.upper()
        if variable in environ:
            where = f"environment variable {variable}"
            values[name] = _checked(model, name, environ[variable], where, strict=False)
    for name, value in (command_line or {}).items():
        values[name] = _checked(model, name, value, "command line", strict=False)
    return model(**values)
