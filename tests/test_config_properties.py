"""Property-based tests: generated bad values from every source (config file, environment,
command line) end in a valid config or in one ConfigError line, never in another exception."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abliterate.cli import COMMANDS, parse_command
from abliterate.config import EvaluateConfig, Options, RunConfig, load_config, to_dict
from abliterate.errors import ConfigError

# Kept small: these run in `make test` on two shared cores. The same temporary file is
# rewritten by every example, hence the function-scoped fixture is fine.
SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

NAMES = sorted(RunConfig.model_fields)
# Option names, near misses and anything else.
KEYS = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from(NAMES).map(lambda n: n.replace("_", "-")),
    st.sampled_from(NAMES).map(lambda n: n[:-1]),
    st.text(max_size=12),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=10**20, max_value=10**400),
    st.floats(),  # NaN and the infinities included
    st.text(max_size=20),
    st.sampled_from(["", " ", "false", "true", "no", "0", "nan", "-inf", "1e999", "pre,mid"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _outcome(load: Any) -> Options | str:
    """The config, or the one-line message of a ConfigError; any other exception fails."""
    try:
        return load()  # type: ignore[no-any-return]
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        assert len(message) < 2000, "messages are short, whatever the value"
        return message


def _round_trips(config: Options) -> None:
    record = to_dict(config)
    assert json.loads(json.dumps(record)) == record and type(config)(**record) == config


@SETTINGS
@given(table=st.dictionaries(KEYS, VALUES, max_size=4))
def test_json_config_files(tmp_path: Path, table: dict[str, Any]) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(table))  # NaN/Infinity included, as Python writes them
    result = _outcome(lambda: load_config(RunConfig, config_file=path))
    if isinstance(result, Options):
        _round_trips(result)
        for key, value in table.items():
            field = key.replace("-", "_")
            # A strictly typed file: a value that loaded kept its type (no "false" -> True).
            if isinstance(getattr(result, field), bool):
                assert value is getattr(result, field)
            if isinstance(value, float):
                assert math.isfinite(value)


def _toml_value(value: Any) -> str:
    # TOML for what TOML can say; JSON's spelling of a string is a valid TOML basic string
    # except for lone surrogates, which make the file invalid (an error path, also tested).
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    return json.dumps(value)  # null is no TOML: the file is then invalid


@SETTINGS
@given(table=st.dictionaries(KEYS, VALUES, max_size=4))
def test_toml_config_files(tmp_path: Path, table: dict[str, Any]) -> None:
    path = tmp_path / "c.toml"
    text = "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items())
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    result = _outcome(lambda: load_config(RunConfig, config_file=path))
    if isinstance(result, Options):
        _round_trips(result)


@SETTINGS
@given(
    content=st.one_of(
        st.binary(max_size=64),
        st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
        VALUES.map(lambda v: json.dumps(v).encode()),  # non-table JSON among them
        st.sampled_from([b"[1, 2]", b'"x"', b"null", b"3", b"[" * 3000, b"\xef\xbb\xbf{}"]),
    ),
    suffix=st.sampled_from([".toml", ".json", ".yaml", ""]),
)
def test_arbitrary_config_file_bytes(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_bytes(content)
    result = _outcome(lambda: load_config(RunConfig, config_file=path))
    assert isinstance(result, str) or content.removeprefix(b"\xef\xbb\xbf").strip() in (b"", b"{}")


@SETTINGS
@given(
    env=st.dictionaries(
        st.sampled_from(NAMES).map(lambda n: "ABLITERATE_" + n.upper()),
        st.one_of(st.text(max_size=20), SCALARS.map(str)),
        max_size=4,
    )
)
def test_environment_values(env: dict[str, str]) -> None:
    result = _outcome(lambda: load_config(RunConfig, environ=env))
    if isinstance(result, Options):
        _round_trips(result)


FLAGS = sorted(
    {"--" + n.replace("_", "-") for n in (*RunConfig.model_fields, *EvaluateConfig.model_fields)}
    | {"--no-save-model", "--no-overwrite", "--optimize", "-v", "--config"}
)
# Tokens that print help or the version and exit by design (status 0) are left out.
HELP = re.compile(r"^-[^-]*h|^--(h|he|hel|help|version)(=|$)")


@SETTINGS
@given(
    command=st.sampled_from(sorted(COMMANDS)),
    tokens=st.lists(
        st.one_of(
            st.sampled_from(FLAGS),
            st.text(max_size=10),
            SCALARS.map(str),
            st.sampled_from(["pre", "mid", "post", "a,b", "[", "]", '["pre"', "null", "--"]),
        ),
        max_size=8,
    ).filter(lambda tokens: not any(HELP.match(t) for t in tokens)),
)
def test_command_lines(command: str, tokens: list[str]) -> None:
    # parse_command only: a valid command line would otherwise start a run.
    try:
        invocation = parse_command([command, *tokens], environ={})
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert invocation.command == command
    _round_trips(invocation.config)


@SETTINGS
@given(n=st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_a_count_loads_exactly_when_it_is_positive(tmp_path: Path, n: int) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"n_train = {n}\n")
    result = _outcome(lambda: load_config(RunConfig, config_file=path))
    if n >= 1:
        assert isinstance(result, RunConfig) and result.n_train == n
    else:
        assert result == f"--n-train (config file {path}) must be at least 1, got {n}"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("field", ["strength", "kl_threshold", "prune_last_layers"])
def test_no_float_option_admits_a_non_finite_value(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match="must be a finite number"):
        RunConfig(**{field: value})
