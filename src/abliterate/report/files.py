"""Writing the chart files ``report.md`` links, each atomically (:mod:`abliterate.files`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from abliterate.files import write_text

if TYPE_CHECKING:
    from abliterate.report.charts import Figure


def write_figures(directory: Path, figures: Sequence[Figure]) -> str:
    """Write each figure to ``directory/NAME.svg``; return Markdown that shows them.

    The Markdown refers to the files relative to the directory's parent (the run directory),
    so it can be appended to ``report.md``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for f in figures:
        write_text(directory / f"{f.name}.svg", f.svg)
        lines += [f"![{f.title}]({directory.name}/{f.name}.svg)", "", f"*{f.caption}*", ""]
    return "\n".join(lines)
