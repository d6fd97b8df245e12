"""Writing a report's files: each one atomically, and the chart files ``report.md`` links.

A reader of a run directory (a person, a script, a second ``abliterate report``) never sees a
half-written file: each is written beside its destination and renamed over it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from abliterate.report.charts import Figure


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600); this one gets the umask's mode, like
    # any other output file.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with tmp.open("x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_figures(directory: Path, figures: Sequence[Figure]) -> str:
    """Write each figure to ``directory/NAME.svg``; return Markdown that shows them.

    The Markdown refers to the files relative to the directory's parent (the run directory),
    so it can be appended to ``report.md``.
    """
    lines = []
    for f in figures:
        write_text_atomic(directory / f"{f.name}.svg", f.svg)
        lines += [f"![{f.title}]({directory.name}/{f.name}.svg)", "", f"*{f.caption}*", ""]
    return "\n".join(lines)
