"""Property-based bad-input suite for the prompt loaders (hypothesis).

Generated files of every supported suffix: well-formed ones with wrong types, NaN and
infinities, empty and nested values, mixed strings and objects; then the same bytes damaged
(truncated, binary appended, re-encoded, NUL bytes) and plain random bytes. Every file must
end in a :class:`PromptSet` of non-empty, stripped strings or in exactly one
:class:`AbliterateError` with a one-line message; never another exception, and the loader
never writes anything. Through the CLI, the same files end in exit status 2 with one error
line and no output directory, partial or not.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from abliterate.data.prompts import PromptSet, load_prompts
from abliterate.errors import AbliterateError

SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
FAST = settings(max_examples=50, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

keys = st.sampled_from(["prompt", "instruction", "text", "category", "x", ""]) | st.text(max_size=4)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=10,
)
# Rows that look like prompt files: objects with a prompt field of any type, or bare values.
rows = st.lists(st.dictionaries(keys, scalars, max_size=3) | scalars, max_size=5)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


def _csv(table: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(table)
    return buf.getvalue().encode("utf-8")


@st.composite
def parquet_bytes(draw: st.DrawFn) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = draw(st.integers(0, 4))
    column_values = st.sampled_from([
        st.lists(st.none() | st.text(max_size=8), min_size=n, max_size=n),
        st.lists(st.integers(-5, 5), min_size=n, max_size=n),
        st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=n, max_size=n),
        st.lists(st.lists(st.text(max_size=3), max_size=2), min_size=n, max_size=n),
        st.lists(st.binary(max_size=6), min_size=n, max_size=n),
    ])  # fmt: skip
    names = draw(st.lists(keys, min_size=0, max_size=3, unique=True))
    table = pa.table({name: draw(draw(column_values)) for name in names})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def well_formed(suffix: str) -> st.SearchStrategy[bytes]:
    """Syntactically valid files of ``suffix`` whose content may be anything."""
    if suffix == ".txt":
        return st.text(max_size=200).map(lambda t: t.encode("utf-8"))
    if suffix == ".jsonl":
        return (st.lists(json_values, max_size=6) | rows).map(
            lambda vs: "\n".join(_dumps(v) for v in vs).encode("utf-8")
        )
    if suffix == ".json":
        return (json_values | rows).map(lambda v: _dumps(v).encode("utf-8"))
    if suffix == ".csv":
        cell = st.sampled_from(["prompt", "category", "", " "]) | st.text(max_size=8)
        return st.lists(st.lists(cell, max_size=4), max_size=5).map(_csv)
    return parquet_bytes()


@st.composite
def damaged(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    data = draw(base)
    how = draw(st.sampled_from(["as is", "truncated", "binary", "utf-16", "latin-1", "nul"]))
    if how == "truncated":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if how == "binary":
        return data + draw(st.binary(min_size=1, max_size=16))
    if how in ("utf-16", "latin-1"):
        return data.decode("utf-8", "replace").encode(how, "replace")
    if how == "nul":
        cut = draw(st.integers(0, len(data)))
        return data[:cut] + b"\x00" + data[cut:]
    return data


def any_file(suffix: str) -> st.SearchStrategy[bytes]:
    return damaged(well_formed(suffix)) | st.binary(max_size=64)


def _check_loader(suffix: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"prompts{suffix}"
        path.write_bytes(content)
        try:
            result = load_prompts(str(path))
        except AbliterateError as exc:
            assert "\n" not in str(exc), str(exc)
        else:
            assert isinstance(result, PromptSet) and len(result) >= 1
            assert all(isinstance(p, str) and p and p == p.strip() for p in result.prompts)
            if result.categories is not None:
                assert len(result.categories) == len(result.prompts)
        assert os.listdir(folder) == [path.name]


@pytest.mark.parametrize("suffix", SUFFIXES)
@FAST
@given(data=st.data())
@example(data=None)
def test_any_file_gives_a_prompt_set_or_one_error(suffix: str, data: st.DataObject | None) -> None:
    # The explicit example is the empty file.
    content = b"" if data is None else data.draw(any_file(suffix), label="content")
    _check_loader(suffix, content)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_huge_prompt_loads_and_is_left_to_the_context_check(suffix: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    huge = "word " * 40_000 + "end"
    path = tmp_path / f"p{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"prompt": [huge, "short"]}), path)
    else:
        path.write_bytes({
            ".txt": (huge + "\nshort\n").encode(),
            ".jsonl": (_dumps({"prompt": huge}) + "\n" + _dumps({"prompt": "short"})).encode(),
            ".json": _dumps([huge, "short"]).encode(),
            ".csv": _csv([["prompt"], [huge], ["short"]]),
        }[suffix])  # fmt: skip
    try:
        loaded = load_prompts(str(path))
    except AbliterateError as exc:  # the csv module's own field limit (128 KiB)
        assert suffix == ".csv" and "field larger than field limit" in str(exc)
    else:
        assert loaded.prompts == (huge, "short")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(suffix=st.sampled_from(SUFFIXES), data=st.data())
def test_cli_with_a_bad_prompt_file_writes_nothing(suffix: str, data: st.DataObject) -> None:
    from abliterate.cli import main

    content = data.draw(any_file(suffix), label="content")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"prompts{suffix}"
        path.write_bytes(content)
        out = Path(folder) / "out"
        # A model that does not exist: a prompt file that loads fails at the model instead.
        argv = ["evaluate", str(Path(folder) / "no-model"), "--out", str(out),
                "--eval-harmful", str(path)]  # fmt: skip
        # hypothesis runs many examples in one test: capture each one's stderr on its own.
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = main(argv)
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("abliterate: error:")]
        assert code == 2 and len(lines) == 1, err.getvalue()
        assert "Traceback" not in err.getvalue()
        assert sorted(os.listdir(folder)) == [path.name]
