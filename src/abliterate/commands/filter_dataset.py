"""``abliterate filter-dataset IN OUT``: keep the rows of an instruction dataset whose answers
neither refuse nor moralize (or, ``--invert``, only those that do).

Writes OUT in the input's format (atomically: a temporary file renamed into place) and
``OUT.report.json`` (:class:`~abliterate.report.datasets.FilterReport`): rows read, kept and
dropped, the rows each marker and judge flagged, examples of dropped rows and the throughput.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from abliterate import __version__
from abliterate.config import FilterDatasetConfig
from abliterate.data.conversations import RowSource, RowWriter, output_container
from abliterate.errors import OutputDirError
from abliterate.eval.judges import JudgeOptions, build_judges
from abliterate.eval.markers import MarkerList
from abliterate.files import write_text
from abliterate.progress import Stages
from abliterate.report.datasets import FilterReport
from abliterate.train.filtering import filter_rows

log = logging.getLogger(__name__)


def report_path(out: Path) -> Path:
    """``OUT.report.json`` beside the output file."""
    return out.with_name(out.name + ".report.json")


def filter_dataset(config: FilterDatasetConfig) -> FilterReport:
    """Filter ``config.dataset`` into ``config.out``; return the report (also written).

    Raises:
        DatasetError: the input cannot be read, or OUT is the input or of another format.
        OutputDirError: OUT exists and ``overwrite`` is off.
        JudgeError: a marker file or judge cannot be set up.
    """
    source = RowSource.parse(config.dataset)
    container = output_container(source, config.out)
    if config.out.exists() and not config.overwrite:
        raise OutputDirError(f"{config.out} exists; pass --overwrite to replace it.")
    markers = None if config.markers == "none" else MarkerList.resolve(config.markers)
    judges = []
    if config.judge is not None:
        options = JudgeOptions(device=config.device, batch_size=config.batch_size)
        judges = build_judges(config.judge, options)
    stages = Stages()
    start = time.perf_counter()
    with stages.stage("filter"), RowWriter(config.out, container, source.parquet_schema()) as w:
        fmt, stats = filter_rows(
            source, w, fmt=None if config.format == "auto" else config.format, markers=markers,
            judges=judges, invert=config.invert, batch_rows=config.batch_size,
            n_examples=config.n_examples,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    report = FilterReport(
        abliterate_version=__version__,
        input=source.name,
        output=str(config.out),
        row_format=fmt,
        container=source.container,
        markers=None if markers is None else markers.name,
        judges=[j.name for j in judges],
        invert=config.invert,
        n_rows=stats.n_rows,
        n_kept=stats.n_kept,
        n_dropped=stats.n_rows - stats.n_kept,
        n_flagged=stats.n_flagged,
        n_assistant_turns=stats.n_assistant_turns,
        by_marker=dict(sorted(stats.by_marker.items(), key=lambda kv: (-kv[1], kv[0]))),
        by_judge=stats.by_judge,
        examples=stats.examples,  # type: ignore[arg-type]
        seconds=round(seconds, 3),
        rows_per_second=round(stats.n_rows / seconds, 1) if seconds > 0 else 0.0,
        peak_rss_mb=stages.stages[-1].peak_rss_mb,
    )
    write_text(report_path(config.out), report.to_json())
    print(
        f"Kept {report.n_kept} of {report.n_rows} rows ({report.row_format}, "
        f"{report.n_flagged} flagged) in {seconds:.1f} s: {config.out}\n"
        f"Report: {report_path(config.out)}"
    )
    return report
