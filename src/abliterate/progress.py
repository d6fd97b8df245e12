"""Progress of long work: progress bars, and the wall time and peak memory of each stage.

:func:`progress` wraps an iterable in a progress bar (live on a terminal, a line every 30 s in
logs). :class:`Stages` times named stages of a run and samples their peak memory: peak resident
memory is sampled from ``/proc/self/statm`` by a background thread every 50 ms
while a stage runs (falling back to the process high-water mark where ``/proc`` is missing), so
each stage reports its own peak rather than the largest peak seen so far.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process."""
    if _STATM.exists():
        return int(_STATM.read_text().split()[1]) * _PAGE
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class StageProfile:
    """Measurements of one stage."""

    name: str
    seconds: float
    peak_rss_mb: float


@dataclass
class Stages:
    """Collects :class:`StageProfile` records; use :meth:`stage` as a context manager."""

    stages: list[StageProfile] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block and sample its peak RSS; the log says whether it failed."""
        peak = [rss_bytes()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log.info("%s ...", name)
        start = time.perf_counter()
        outcome = "failed after"
        try:
            yield
            outcome = "done in"
        finally:
            stop.set()
            sampler.join()
            peak[0] = max(peak[0], rss_bytes())
            profile = StageProfile(name, time.perf_counter() - start, peak[0] / 2**20)
            self.stages.append(profile)
            log.info(
                "%s %s %.1f s (peak RSS %.0f MB)",
                name,
                outcome,
                profile.seconds,
                profile.peak_rss_mb,
            )

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{stage: {"seconds": s, "peak_rss_mb": m}}`` in stage order."""
        return {
            s.name: {"seconds": round(s.seconds, 2), "peak_rss_mb": round(s.peak_rss_mb, 1)}
            for s in self.stages
        }


def _bar_settings() -> dict[str, object]:
    """Live on a terminal; otherwise a plain line every 30 s (see :func:`progress`)."""
    import sys

    interactive = sys.stderr.isatty()
    return {
        "mininterval": 0.1 if interactive else 30.0,
        "dynamic_ncols": interactive,
        "ascii": not interactive,
    }


def progress_bar(
    *, total: int | None, desc: str, unit: str = "it", initial: int = 0
) -> tqdm[NoReturn]:
    """A progress bar advanced by hand (``bar.update(n)``, ``bar.set_postfix(loss=…)``), for
    work that is not one iterable: training steps, rows written. Use it as a context manager."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, **_bar_settings())


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """A progress bar over ``iterable``: live on a terminal, a line every 30 s in logs.

    tqdm's own TTY detection would hide the bar entirely in CI and piped runs, leaving minutes
    of silence; printing at a long interval keeps logs short and still shows progress.
    """
    from tqdm.auto import tqdm

    yield from tqdm(iterable, total=total, desc=desc, **_bar_settings())
