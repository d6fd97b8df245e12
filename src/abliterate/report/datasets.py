"""``OUT.report.json`` of ``abliterate filter-dataset``: what was read, kept and dropped, and why.

A typed record like :class:`~abliterate.report.schema.Report` (unknown keys are refused), but of
a dataset rather than a model: rows read, kept and dropped, the rows each marker and each judge
flagged, examples of dropped rows, and the throughput.
"""

from __future__ import annotations

import json
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

FILTER_SCHEMA_VERSION: Final = 1


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DroppedRow(_Record):
    """One dropped row: where it is, why, and the assistant turn that decided."""

    row: int = Field(ge=0, description="Index of the row in the input (0-based).")
    markers: list[str] = Field(description="Markers found in the row's assistant turns.")
    judges: list[str] = Field(description="Judges that flagged one of its assistant turns.")
    prompt: str = Field(description="The user turn before the deciding assistant turn.")
    response: str = Field(description="The deciding (first flagged, else first) assistant turn.")


class FilterReport(_Record):
    """Everything ``filter-dataset`` counted.

    A row is *flagged* when any marker or judge matched any of its assistant turns; flagged rows
    are dropped, or (``invert``) the only ones kept.
    """

    schema_version: Literal[1] = FILTER_SCHEMA_VERSION
    command: Literal["filter-dataset"] = "filter-dataset"
    abliterate_version: str
    input: str
    output: str
    row_format: Literal["alpaca", "sharegpt", "messages"]
    container: Literal["jsonl", "json", "parquet", "hub"]
    markers: str | None = Field(description="The marker list (None: judges only).")
    judges: list[str] = Field(description="Further judges, by name.")
    invert: bool
    n_rows: int = Field(ge=0)
    n_kept: int = Field(ge=0)
    n_dropped: int = Field(ge=0)
    n_flagged: int = Field(ge=0)
    n_assistant_turns: int = Field(ge=0, description="Assistant turns judged.")
    by_marker: dict[str, int] = Field(description="Flagged rows containing each marker.")
    by_judge: dict[str, int] = Field(description="Rows each judge flagged.")
    examples: list[DroppedRow]
    seconds: float = Field(ge=0)
    rows_per_second: float = Field(ge=0)
    peak_rss_mb: float = Field(ge=0)

    def to_json(self) -> str:
        """The file's text, indented."""
        return json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
