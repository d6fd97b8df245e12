"""``filter-dataset``: drop the rows of an instruction dataset whose answers refuse or moralize.

Rows stream from a :class:`~abliterate.data.conversations.RowSource` in batches. Every assistant
turn of a batch is matched against a :class:`~abliterate.eval.markers.MarkerList` and shown to
each further judge (classifier or LLM judges from :data:`abliterate.eval.judges.JUDGES`, which
see the whole batch of turns at once). A row is *flagged* when anything matched any of its
assistant turns, and a flagged conversation is dropped whole (or, ``invert``, only flagged rows
are kept, to build a refusal set). Rows are written in input order, so the same input and
judges give the same output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from abliterate.data.conversations import (
    Exchange,
    RowFormat,
    RowSource,
    RowWriter,
    conversation,
    exchanges,
    formatted_batches,
)
from abliterate.eval.markers import MarkerList
from abliterate.progress import progress_bar

if TYPE_CHECKING:
    from abliterate.eval.judges import Judge

EXCERPT = 500
"""Characters of a prompt or response kept in a dropped-row example."""


@dataclass
class Verdict:
    """Why one row was flagged (empty lists: it was not)."""

    markers: list[str] = field(default_factory=list)
    judges: list[str] = field(default_factory=list)
    turn: Exchange | None = None

    @property
    def flagged(self) -> bool:
        """Whether any marker or judge matched."""
        return bool(self.markers or self.judges)


@dataclass
class FilterStats:
    """Counts of a filtering pass (see :class:`~abliterate.report.datasets.FilterReport`)."""

    n_rows: int = 0
    n_kept: int = 0
    n_flagged: int = 0
    n_assistant_turns: int = 0
    by_marker: dict[str, int] = field(default_factory=dict)
    by_judge: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, object]] = field(default_factory=list)


def _judge_batch(
    rows: Sequence[list[Exchange]], markers: MarkerList | None, judges: Sequence[Judge]
) -> list[Verdict]:
    """One verdict per row from every assistant turn of the batch."""
    verdicts = [Verdict() for _ in rows]
    owner = [i for i, turns in enumerate(rows) for _ in turns]  # row of each flattened turn
    flat = [turn for turns in rows for turn in turns]
    for i, turn in zip(owner, flat, strict=True):
        found = markers.matches(turn.response) if markers is not None else []
        verdict = verdicts[i]
        for marker in found:
            if marker not in verdict.markers:
                verdict.markers.append(marker)
        if found and verdict.turn is None:
            verdict.turn = turn
    if flat:
        prompts = [t.prompt for t in flat]
        responses = [t.response for t in flat]
        for judge in judges:
            for i, turn, refused in zip(owner, flat, judge(prompts, responses), strict=True):
                if refused and judge.name not in verdicts[i].judges:
                    verdicts[i].judges.append(judge.name)
                    verdicts[i].turn = verdicts[i].turn or turn
    return verdicts


def _example(index: int, verdict: Verdict, turns: list[Exchange]) -> dict[str, object]:
    turn = verdict.turn or (turns[0] if turns else Exchange("", ""))
    return {
        "row": index,
        "markers": verdict.markers,
        "judges": verdict.judges,
        "prompt": turn.prompt[:EXCERPT],
        "response": turn.response[:EXCERPT],
    }


def filter_rows(
    source: RowSource,
    writer: RowWriter,
    *,
    fmt: RowFormat | None,
    markers: MarkerList | None,
    judges: Sequence[Judge],
    invert: bool = False,
    batch_rows: int = 256,
    n_examples: int = 20,
) -> tuple[RowFormat, FilterStats]:
    """Stream ``source`` through the judges into ``writer``.

    Args:
        fmt: The row format, or None to detect it from the first row.
        markers: The marker list, or None for judges only.
        judges: Further judges (each called once per batch with all its assistant turns).
        invert: Keep only the flagged rows.
        batch_rows: Rows read, judged and written at a time (memory is bounded by one batch,
            and by one row group for parquet).
        n_examples: Dropped rows recorded as examples (the first ones, in input order).

    Returns:
        The row format and the counts.

    Raises:
        DatasetError: a row does not have the format's fields.
    """
    found, batches = formatted_batches(source, batch_rows, fmt)
    stats = FilterStats()
    bar = progress_bar(total=source.n_rows(), desc="Filtering", unit="rows")
    with bar:
        for batch in batches:
            turns = [
                exchanges(conversation(row, found, f"{source.name} row {batch.start + i}"))
                for i, row in enumerate(batch.rows)
            ]
            verdicts = _judge_batch(turns, markers, judges)
            keep = [v.flagged == invert for v in verdicts]
            writer.write(batch, keep)
            for i, (verdict, kept) in enumerate(zip(verdicts, keep, strict=True)):
                _count(stats, verdict, kept)
                if not kept and len(stats.examples) < n_examples:
                    stats.examples.append(_example(batch.start + i, verdict, turns[i]))
            stats.n_assistant_turns += sum(len(t) for t in turns)
            bar.update(len(batch.rows))
            bar.set_postfix(kept=stats.n_kept, dropped=stats.n_rows - stats.n_kept, refresh=False)
    return found, stats


def _count(stats: FilterStats, verdict: Verdict, kept: bool) -> None:
    stats.n_rows += 1
    stats.n_kept += kept
    stats.n_flagged += verdict.flagged
    for marker in verdict.markers:
        stats.by_marker[marker] = stats.by_marker.get(marker, 0) + 1
    for judge in verdict.judges:
        stats.by_judge[judge] = stats.by_judge.get(judge, 0) + 1
