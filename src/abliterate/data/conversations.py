"""Instruction datasets as conversations, read and written as streams.

Three row formats are understood:

* ``alpaca``: ``{"instruction", "input"?, "output"}`` — one user turn (the instruction, and
  the input after a blank line) and one assistant turn;
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``
  (``role``/``content`` keys are accepted too);
* ``messages``: ``{"messages": [{"role": "user"|"assistant"|"system", "content"}, ...]}``.

Rows come from ``.jsonl``, ``.json`` (one array of objects), ``.parquet`` files or hub datasets
``hf:ORG/NAME[:split]``, always as a stream of batches (:func:`open_rows`), so that a dataset
of any size is read in bounded memory: JSONL line by line, JSON arrays with the incremental
parser ``ijson`` (``json.load`` would hold the whole file), parquet one row group at a time
(``pyarrow``), hub datasets with ``datasets``' streaming mode. A :class:`RowWriter` writes
kept rows back in the input's container: JSONL lines byte for byte as read, parquet batches
with the input's schema, JSON arrays and hub rows re-serialised.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

from abliterate.errors import DatasetError

RowFormat = Literal["alpaca", "sharegpt", "messages"]
Container = Literal["jsonl", "json", "parquet", "hub"]

FORMAT_KEYS: dict[RowFormat, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
}
"""The fields each format reads (the only columns read from a parquet file)."""

# Speaker names of the ShareGPT dumps and chat datasets in use, by role.
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: ``role`` is ``user``, ``assistant``, ``system`` or a
    dataset's own name for another speaker (a tool, say), kept as written."""

    role: str
    content: str


@dataclass(frozen=True)
class Exchange:
    """An assistant turn with the user turn it answers (empty when there is none)."""

    prompt: str
    response: str


def detect_format(row: dict[str, Any], source: str) -> RowFormat:
    """The format of a row, from its keys.

    Raises:
        DatasetError: the row has none of the formats' keys.
    """
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise DatasetError(
        f"cannot tell the format of {source}: its first row has keys {', '.join(row) or '(none)'}; "
        "expected instruction/output (alpaca), conversations (ShareGPT) or messages."
    )


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{where} must be text, not {type(value).__name__}.")
    return value


def conversation(row: dict[str, Any], fmt: RowFormat, where: str) -> list[Turn]:
    """The turns of one row.

    Args:
        where: How to name the row in an error (``data.jsonl row 17``).

    Raises:
        DatasetError: a field of the format is missing or has the wrong type.
    """
    if fmt == "alpaca":
        if "instruction" not in row or "output" not in row:
            raise DatasetError(f"{where} has no instruction/output fields (alpaca format).")
        prompt = _text(row["instruction"], f"{where} instruction")
        extra = _text(row.get("input"), f"{where} input")
        prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        return [Turn("user", prompt), Turn("assistant", _text(row["output"], f"{where} output"))]
    key = "conversations" if fmt == "sharegpt" else "messages"
    messages = row.get(key)
    if not isinstance(messages, list):
        raise DatasetError(f"{where} has no list '{key}' ({fmt} format).")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DatasetError(f"{where} {key}[{i}] is not an object.")
        speaker = message.get("from", message.get("role"))
        if not isinstance(speaker, str):
            raise DatasetError(f"{where} {key}[{i}] names no speaker (from/role).")
        content = message.get("value", message.get("content"))
        turns.append(
            Turn(_ROLES.get(speaker.lower(), speaker), _text(content, f"{where} {key}[{i}]"))
        )
    return turns


def exchanges(turns: Sequence[Turn]) -> list[Exchange]:
    """Every assistant turn with the latest user turn before it."""
    out, prompt = [], ""
    for turn in turns:
        if turn.role == "user":
            prompt = turn.content
        elif turn.role == "assistant":
            out.append(Exchange(prompt, turn.content))
    return out


# --- reading ---------------------------------------------------------------------------------


@dataclass
class RowBatch:
    """Consecutive rows of a dataset.

    Attributes:
        start: Index of the first row in the dataset.
        rows: The rows as dicts (for parquet, only the format's columns).
        lines: JSONL only: each row's line as read, written back unchanged.
        table: Parquet only: the ``pyarrow.RecordBatch`` with every column.
    """

    start: int
    rows: list[dict[str, Any]]
    lines: list[bytes] | None = None
    table: Any = None


@dataclass(frozen=True)
class RowSource:
    """A dataset to stream: a file (``.jsonl``, ``.json``, ``.parquet``) or ``hf:ORG/NAME[:split]``.

    Attributes:
        spec: As the user wrote it.
        container: How rows are stored.
        path: The file, or None for a hub dataset.
    """

    spec: str
    container: Container
    path: Path | None

    @classmethod
    def parse(cls, spec: str) -> RowSource:
        """Check that ``spec`` names a readable dataset.

        Raises:
            DatasetError: a missing file, or one of an unsupported type.
        """
        if spec.startswith("hf:"):
            if "/" not in spec[3:].split(":")[0]:
                raise DatasetError(f"hub dataset '{spec}' must be written hf:ORG/NAME[:split].")
            return cls(spec, "hub", None)
        path = Path(spec)
        if not path.is_file():
            raise DatasetError(f"dataset {path} does not exist.")
        suffix = path.suffix.lower().lstrip(".")
        if suffix not in ("jsonl", "json", "parquet"):
            raise DatasetError(
                f"unsupported dataset file type '.{suffix}' for {path}; use .jsonl, .json, "
                ".parquet or hf:ORG/NAME[:split]."
            )
        return cls(spec, suffix, path)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        """How reports name the dataset."""
        return self.spec

    def parquet_schema(self) -> Any:
        """The ``pyarrow`` schema of a parquet file (None for other containers)."""
        if self.container != "parquet":
            return None
        return _pyarrow_parquet().ParquetFile(self.path).schema_arrow

    def n_rows(self) -> int | None:
        """The number of rows when known without reading them (parquet metadata)."""
        if self.container != "parquet":
            return None
        return int(_pyarrow_parquet().ParquetFile(self.path).metadata.num_rows)

    def batches(self, size: int, columns: Sequence[str] | None = None) -> Iterator[RowBatch]:
        """The dataset in batches of ``size`` rows, in order.

        Args:
            columns: Parquet only: the columns converted to Python rows (the rest travel in
                :attr:`RowBatch.table` untouched).

        Raises:
            DatasetError: the file cannot be parsed (the message names the row or position).
        """
        if self.container == "jsonl":
            yield from self._jsonl(size)
        elif self.container == "json":
            yield from _chunks(self._json_rows(), size)
        elif self.container == "parquet":
            yield from self._parquet(size, columns)
        else:
            yield from _chunks(self._hub_rows(), size)

    def _jsonl(self, size: int) -> Iterator[RowBatch]:
        assert self.path is not None
        batch = RowBatch(0, [], [])
        index = 0
        with self.path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise DatasetError(f"{self.path} line {number} is not JSON: {exc}") from exc
                if not isinstance(row, dict):
                    raise DatasetError(f"{self.path} line {number} is not a JSON object.")
                batch.rows.append(row)
                assert batch.lines is not None
                batch.lines.append(line if line.endswith(b"\n") else line + b"\n")
                index += 1
                if len(batch.rows) == size:
                    yield batch
                    batch = RowBatch(index, [], [])
        if batch.rows:
            yield batch

    def _json_rows(self) -> Iterator[dict[str, Any]]:
        import ijson

        assert self.path is not None
        with self.path.open("rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            if not head.startswith(b"["):
                raise DatasetError(
                    f"{self.path} must hold one JSON array of objects (or use .jsonl, one object "
                    "a line)."
                )
            f.seek(0)
            try:
                for i, row in enumerate(ijson.items(f, "item", use_float=True)):
                    if not isinstance(row, dict):
                        raise DatasetError(f"{self.path} item {i} is not a JSON object.")
                    yield row
            except ijson.JSONError as exc:
                raise DatasetError(f"cannot parse {self.path}: {exc}") from exc

    def _parquet(self, size: int, columns: Sequence[str] | None) -> Iterator[RowBatch]:
        pq = _pyarrow_parquet()
        file = pq.ParquetFile(self.path)
        names = file.schema_arrow.names
        wanted = [c for c in (columns or names) if c in names]
        if not wanted:
            raise DatasetError(
                f"{self.path} has none of the columns {', '.join(columns or [])}; its columns are "
                f"{', '.join(names)}."
            )
        start = 0
        # iter_batches decodes one row group at a time: memory is bounded by the largest group.
        for table in file.iter_batches(batch_size=size):
            rows = table.select(wanted).to_pylist()
            yield RowBatch(start, rows, table=table)
            start += len(rows)

    def _hub_rows(self) -> Iterator[dict[str, Any]]:
        repo, _, split = self.spec[3:].partition(":")
        try:
            import datasets
        except ImportError as exc:
            raise DatasetError(
                "hub datasets need the datasets library: pip install 'abliterate[hub]'."
            ) from exc
        try:
            stream = datasets.load_dataset(repo, split=split or "train", streaming=True)
            yield from stream
        except Exception as exc:  # the hub client raises many unrelated types; report them all
            raise DatasetError(f"cannot stream hub dataset {repo}: {exc}") from exc


def formatted_batches(
    source: RowSource, size: int, fmt: RowFormat | None
) -> tuple[RowFormat, Iterator[RowBatch]]:
    """The row format (detected from the first row unless given) and every batch of rows.

    Parquet files are read with the columns of every format (those present), the other columns
    travel in :attr:`RowBatch.table` undecoded.
    """
    columns = [c for keys in FORMAT_KEYS.values() for c in keys]
    batches = source.batches(size, columns)
    first = next(batches, None)
    if first is None:
        return fmt or "messages", iter(())
    found = fmt or detect_format(first.rows[0], source.name)

    def every_batch() -> Iterator[RowBatch]:
        yield first
        yield from batches

    return found, every_batch()


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[RowBatch]:
    batch = RowBatch(0, [])
    for index, row in enumerate(rows, start=1):
        batch.rows.append(row)
        if len(batch.rows) == size:
            yield batch
            batch = RowBatch(index, [])
    if batch.rows:
        yield batch


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DatasetError(
            "reading .parquet needs pyarrow: pip install 'abliterate[parquet]'."
        ) from exc
    return pq


# --- writing ---------------------------------------------------------------------------------


def output_container(source: RowSource, out: Path) -> Container:
    """The container the kept rows are written in: the input's (a hub dataset's rows go to
    ``.jsonl`` or ``.json``, as ``out`` is named).

    Raises:
        DatasetError: ``out`` is named for another container than the input's, or is the input.
    """
    suffix = out.suffix.lower().lstrip(".")
    if source.container == "hub":
        if suffix not in ("jsonl", "json"):
            raise DatasetError(f"rows of a hub dataset are written as .jsonl or .json, not {out}.")
        return suffix  # type: ignore[return-value]
    assert source.path is not None
    if out.resolve() == source.path.resolve():
        raise DatasetError(f"the output {out} is the input; the input is never overwritten.")
    if suffix != source.container:
        raise DatasetError(
            f"the kept rows are written in the input's format (.{source.container}); name the "
            f"output {out.with_suffix('.' + source.container)}."
        )
    return source.container


class RowWriter:
    """Writes kept rows to a temporary file beside ``out``, renamed into place on success (a
    failed or interrupted filter leaves ``out`` as it was)."""

    def __init__(self, out: Path, container: Container, parquet_schema: Any = None) -> None:
        if container == "parquet" and parquet_schema is None:
            raise ValueError("a parquet output needs the input's schema")
        self.out, self.container, self.schema = out, container, parquet_schema
        self.n_written = 0
        self._tmp: Path | None = None
        self._file: IO[bytes] | None = None
        self._parquet: Any = None

    def __enter__(self) -> RowWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkstemp, whose files are private (0600): the output gets the umask's mode.
        self._tmp = self.out.with_name(f".{self.out.name}.{secrets.token_hex(6)}.partial")
        self._tmp.touch(exist_ok=False)
        if self.container == "parquet":
            import pyarrow.parquet as pq

            self._parquet = pq.ParquetWriter(str(self._tmp), self.schema)
        else:
            self._file = self._tmp.open("wb")
            if self.container == "json":
                self._file.write(b"[")
        return self

    def write(self, batch: RowBatch, keep: Sequence[bool]) -> None:
        """Append the rows of ``batch`` whose ``keep`` is true."""
        if self.container == "parquet":
            self._write_parquet(batch, keep)
            return
        assert self._file is not None
        for i, flag in enumerate(keep):
            if not flag:
                continue
            if self.container == "jsonl":
                line = batch.lines[i] if batch.lines is not None else _dumps(batch.rows[i]) + b"\n"
                self._file.write(line)
            else:
                self._file.write((b",\n" if self.n_written else b"\n") + _dumps(batch.rows[i]))
            self.n_written += 1

    def _write_parquet(self, batch: RowBatch, keep: Sequence[bool]) -> None:
        import pyarrow as pa

        kept = batch.table.filter(pa.array(list(keep), type=pa.bool_()))
        if kept.num_rows:
            self._parquet.write_batch(kept)
        self.n_written += kept.num_rows

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tmp is not None
        if self._file is not None:
            if exc_type is None and self.container == "json":
                self._file.write(b"\n]\n" if self.n_written else b"]\n")
            self._file.close()
        if self._parquet is not None:
            self._parquet.close()
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        self._tmp.replace(self.out)


def _dumps(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8")
