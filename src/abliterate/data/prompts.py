"""Prompt sets: built-in instruction sets, loaders for user data, chat formatting and batching.

The package ships project-written harmful, harmless and over-refusal instruction sets with fixed
train / val / eval splits (``prompt_data/*.jsonl``), so the tool works offline, and two style
sets whose prompts come with answers (``terse`` and ``verbose``: the same questions answered in a
few words and at length) for behaviour directions read at the response tokens. The harmless
set's train split is short English requests on 12 topics, in the style of the harmful ones, so
that the difference of their means is about harm and not about style; its val and eval splits
are instructions as users write them, in 12 style categories (multi-part requests, code to
write, fix or explain, formatting, rewriting, creative writing, role-play, summarising a given
passage, advice, and requests in 12 other languages), so that the damage selection and search
minimise, and the damage reported, is measured where users live. User sets come
from ``.txt`` (one prompt a line), ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` files or hub
datasets written ``hf:ORG/NAME[:split[:column]]``; a ``response`` column, when a file has one,
gives each prompt its answer. ``builtin:NAME[:split]`` names a shipped set.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from abliterate.errors import PromptSetError

BuiltinKind = Literal["harmful", "harmless", "over_refusal", "terse", "verbose"]
BUILTIN_SETS: tuple[BuiltinKind, ...] = ("harmful", "harmless", "over_refusal", "terse", "verbose")
Split = Literal["train", "val", "eval", "all"]

# Column names tried, in order, when a file's prompt column is not given.
RESPONSE_COLUMN = "response"  # only this exact name: other files' "answer" columns stay data
PROMPT_COLUMNS = ("prompt", "instruction", "goal", "behavior", "question", "query", "text", "input")


@dataclass(frozen=True)
class PromptSet:
    """A named, ordered list of instructions with optional per-prompt categories.

    Attributes:
        name: Where the set came from (``builtin:harmful:train``, a path, ``hf:...``).
        prompts: The instructions.
        categories: One category per prompt, or None when the source has none.
        responses: One answer per prompt, or None: directions from a set with answers are read
            at the answers' tokens.
    """

    name: str
    prompts: tuple[str, ...]
    categories: tuple[str, ...] | None = None
    responses: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise PromptSetError(f"prompt set '{self.name}' is empty.")
        if self.categories is not None and len(self.categories) != len(self.prompts):
            raise ValueError("categories must have one entry per prompt")
        if self.responses is not None and len(self.responses) != len(self.prompts):
            raise ValueError("responses must have one entry per prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def sha256(self) -> str:
        """Content hash of the prompts (order-sensitive), recorded in every run."""
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(p.encode("utf-8"))
            h.update(b"\0")
        # Sets without answers keep the hash they always had.
        for r in self.responses or ():
            h.update(r.encode("utf-8"))
            h.update(b"\1")
        return h.hexdigest()

    def _subset(self, name: str, picked: Sequence[int]) -> PromptSet:
        def pick(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
            return None if values is None else tuple(values[i] for i in picked)

        return PromptSet(
            name, tuple(self.prompts[i] for i in picked), pick(self.categories),
            pick(self.responses),
        )  # fmt: skip

    def spread(self, n: int | None) -> PromptSet:
        """At most ``n`` prompts taken round-robin across categories, in order within each.

        A set stored category by category (the over-refusal set) would give ``n`` prompts of one
        category with :meth:`head`; a capped evaluation should still cover every category.
        """
        if n is None or n >= len(self.prompts) or not self.categories:
            return self.head(n)
        queues: dict[str, list[int]] = {}
        for i, cat in enumerate(self.categories):
            queues.setdefault(cat, []).append(i)
        picked: list[int] = []
        while len(picked) < n:
            for queue in queues.values():
                if queue and len(picked) < n:
                    picked.append(queue.pop(0))
        picked.sort()
        return self._subset(f"{self.name}[spread:{n}]", picked)

    def head(self, n: int | None) -> PromptSet:
        """The first ``n`` prompts (all of them when ``n`` is None or larger than the set)."""
        if n is None or n >= len(self.prompts):
            return self
        return self._subset(f"{self.name}[:{n}]", range(n))


def builtin(kind: BuiltinKind, split: Split = "all") -> PromptSet:
    """A built-in prompt set, optionally restricted to one split.

    The over-refusal set has no splits: it is only ever used for evaluation; the style sets
    (``terse``, ``verbose``) have answers and no splits.

    Raises:
        PromptSetError: there is no such set, or the split is empty.
    """
    if kind not in BUILTIN_SETS:
        raise PromptSetError(
            f"there is no built-in prompt set '{kind}'; built-in sets: {', '.join(BUILTIN_SETS)}."
        )
    path = resources.files("abliterate.data") / "prompt_data" / f"{kind}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if split != "all":
        rows = [r for r in rows if r.get("split") == split]
    rows = _interleave_categories(rows)
    responses = None
    if rows and RESPONSE_COLUMN in rows[0]:
        responses = tuple(str(r[RESPONSE_COLUMN]) for r in rows)
    return PromptSet(
        name=f"builtin:{kind}:{split}",
        prompts=tuple(r["prompt"] for r in rows),
        categories=tuple(r.get("category", "") for r in rows),
        responses=responses,
    )


def _load_builtin(spec: str) -> PromptSet:
    """``builtin:NAME[:split]`` as a prompt source."""
    name, _, split = spec.partition(":")
    splits = ("train", "val", "eval", "all")
    if split and split not in splits:
        raise PromptSetError(f"'builtin:{spec}': the split must be one of {', '.join(splits)}.")
    return builtin(name, split or "all")  # type: ignore[arg-type]


def _interleave_categories(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Round-robin over categories (each in file order), so every prefix is stratified.

    The files are grouped by category; without this, ``head(n)`` (``--n-train``, ``--n-val``)
    would take whole categories in alphabetical order and miss the rest.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row.get("category", "")), []).append(row)
    out: list[dict[str, Any]] = []
    queues = list(groups.values())
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def _show(name: str) -> str:
    """A column name as it can be shown in a one-line message (escaped if it holds newlines
    or other unprintable characters)."""
    return name if name.isprintable() else repr(name)[1:-1]


def _names(columns: Sequence[str]) -> str:
    return ", ".join(_show(c) for c in columns)


def _pick_column(columns: Sequence[str], column: str | None, source: str) -> str:
    if column is not None:
        if column not in columns:
            raise PromptSetError(
                f"{source} has no column {_show(column)!r}; available columns: {_names(columns)}."
            )
        return column
    lowered = {c.lower(): c for c in columns}
    for candidate in PROMPT_COLUMNS:
        if candidate in lowered:
            return lowered[candidate]
    raise PromptSetError(
        f"cannot tell which column of {source} holds the prompts (columns: {_names(columns)}); "
        "pass --prompt-column NAME."
    )


def _kind(value: Any) -> str:
    """A JSON-style name of ``value``'s type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _rows_to_set(
    name: str, rows: Sequence[Any], column: str | None, where: Callable[[int], str]
) -> PromptSet:
    """A prompt set from rows that are all strings (the prompts) or all objects (records with a
    prompt column); ``where(i)`` says where row ``i`` is in the file (``line 3``).

    Raises:
        PromptSetError: rows of other or mixed types, no usable column, a prompt that is not a
            string, or no prompts.
    """
    if not rows:
        raise PromptSetError(f"prompt file {name} holds no rows.")
    first_is_text = isinstance(rows[0], str)
    for i, row in enumerate(rows):
        if not isinstance(row, str | dict):
            raise PromptSetError(
                f"{where(i)} of {name} is {_kind(row)}; rows must be strings (the prompts) or "
                "objects with a prompt field."
            )
        if isinstance(row, str) != first_is_text:
            raise PromptSetError(
                f"{where(i)} of {name} is {_kind(row)} but {where(0)} is {_kind(rows[0])}; a "
                "prompt file holds either strings (the prompts) or objects with a prompt "
                "field, not both."
            )
    if first_is_text:
        return PromptSet(name, tuple(p for p in (r.strip() for r in rows) if p))
    col = _pick_column([str(c) for c in rows[0] if c is not None], column, name)
    prompts = []
    for i, row in enumerate(rows):
        value = row.get(col)
        if value is not None and not isinstance(value, str):
            raise PromptSetError(
                f"{where(i)} of {name}: {_show(col)!r} is {_kind(value)}, not a string; prompts "
                "are text."
            )
        if value is not None and value.strip():
            prompts.append(value.strip())
    cats = None
    if "category" in rows[0] and len(prompts) == len(rows):
        cats = tuple(str(r.get("category") or "") for r in rows)
    if not prompts:
        raise PromptSetError(
            f"prompt file {name} has no non-empty prompts in column {_show(col)!r}."
        )
    responses = None
    if RESPONSE_COLUMN in rows[0]:
        responses = tuple(str(r.get(RESPONSE_COLUMN) or "").strip() for r in rows)
        if len(prompts) != len(rows) or not all(responses):
            raise PromptSetError(
                f"prompt file {name} has a '{RESPONSE_COLUMN}' column, but not every row has "
                "both a prompt and a response."
            )
    return PromptSet(name, tuple(prompts), cats, responses)


def _read_txt(path: Path, column: str | None) -> PromptSet:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = tuple(ln for ln in lines if ln)
    if not prompts:
        raise PromptSetError(f"prompt file {path} is empty.")
    return PromptSet(str(path), prompts)


def _read_jsonl(path: Path, column: str | None) -> PromptSet:
    rows: list[Any] = []
    numbers: list[int] = []
    # JSON Lines are separated by "\n" alone: str.splitlines would also split inside a JSON
    # string at U+2028 and other characters JSON allows unescaped, and miscount lines.
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PromptSetError(
                f"cannot parse {path}, line {number}, column {exc.colno}: {exc.msg}."
            ) from exc
        numbers.append(number)
    return _rows_to_set(str(path), rows, column, lambda i: f"line {numbers[i]}")


def _read_json(path: Path, column: str | None) -> PromptSet:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PromptSetError(
            f"cannot parse {path}, line {exc.lineno}, column {exc.colno}: {exc.msg}."
        ) from exc
    if not isinstance(data, list):
        raise PromptSetError(f"{path} must hold a JSON list of strings or of objects.")
    return _rows_to_set(str(path), data, column, lambda i: f"element {i + 1}")


def _read_csv(path: Path, column: str | None) -> PromptSet:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except csv.Error as exc:
        raise PromptSetError(f"cannot parse {path}: {exc}.") from exc
    # Row 1 is the header.
    return _rows_to_set(str(path), rows, column, lambda i: f"row {i + 2}")


def _read_parquet(path: Path, column: str | None) -> PromptSet:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise PromptSetError(
            "reading .parquet needs pyarrow: pip install 'abliterate[parquet]'."
        ) from exc
    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, ValueError, OSError) as exc:
        # Arrow's messages can quote the damaged bytes, newlines and control characters too.
        why = " ".join("".join(c if c.isprintable() else " " for c in str(exc)).split())
        raise PromptSetError(f"{path} is not a readable Parquet file: {why}") from exc
    return _rows_to_set(str(path), rows, column, lambda i: f"row {i + 1}")


_READERS: dict[str, Callable[[Path, str | None], PromptSet]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def load_prompts(source: str, column: str | None = None) -> PromptSet:
    """Load a prompt set from a file path, ``hf:ORG/NAME[:split[:column]]`` or
    ``builtin:NAME[:split]``.

    A file holds prompts as ``.txt`` lines, or as strings or objects (with a prompt column) in
    ``.jsonl``, ``.json``, ``.csv`` or ``.parquet``; prompts must be text.

    Raises:
        PromptSetError: the file is missing, unreadable, not UTF-8, malformed (the message
            names the line or row), mixes strings and objects, has no such column, or is empty.
    """
    if source.startswith("hf:"):
        return _load_hub(source[3:], column)
    if source.startswith("builtin:"):
        return _load_builtin(source[len("builtin:") :])
    path = Path(source)
    if not path.is_file():
        raise PromptSetError(f"prompt file {path} does not exist.")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise PromptSetError(
            f"unsupported prompt file type '{path.suffix.lower()}' for {path}; "
            "use .txt, .jsonl, .json, .csv or .parquet."
        )
    try:
        return reader(path, column)
    except UnicodeDecodeError as exc:
        raise PromptSetError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8."
        ) from exc
    except RecursionError as exc:
        raise PromptSetError(f"{path} is nested too deeply to be a prompt file.") from exc
    except OSError as exc:
        raise PromptSetError(f"cannot read {path}: {exc.strerror or exc}.") from exc


def _load_hub(spec: str, column: str | None) -> PromptSet:
    parts = spec.split(":")
    repo = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else "train"
    if len(parts) > 2 and parts[2]:
        column = parts[2]
    if "/" not in repo:
        raise PromptSetError(f"hub dataset 'hf:{spec}' must be written hf:ORG/NAME[:split[:col]].")
    try:
        import datasets
    except ImportError as exc:
        raise PromptSetError(
            "hub datasets need the datasets library: pip install 'abliterate[hub]'."
        ) from exc
    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as exc:  # the hub client raises many unrelated types; report them all
        raise PromptSetError(f"cannot load hub dataset {repo} (split {split}): {exc}") from exc
    return _rows_to_set(f"hf:{repo}:{split}", list(ds), column, lambda i: f"row {i + 1}")


def resolve_prompts(
    source: str | None, kind: BuiltinKind, split: Split, column: str | None
) -> PromptSet:
    """A user source when given, else the built-in ``kind`` set's ``split``."""
    return load_prompts(source, column) if source else builtin(kind, split)
