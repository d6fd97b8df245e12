"""Run directories: built under a temporary name, renamed into place only on success.

Every command writes its outputs into a run directory through :func:`run_directory`, so a
failed or interrupted run never leaves a half-written directory, and records
:func:`environment_record` (versions, device, seed, prompt-set hashes) beside its results.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from abliterate import __version__
from abliterate.errors import OutputDirError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work if ``out`` cannot be (re)created."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output path {out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputDirError(
            f"output directory {out} already exists and is not empty; pass --overwrite to "
            "replace it or choose another --out."
        )


@contextmanager
def run_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` if the block succeeds.

    On any exception (including Ctrl-C) the temporary directory is deleted and ``out`` is left
    as it was.
    """
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 16 MB chunks), as recorded for exported weights."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def environment_record(device: str, seed: int, data: dict[str, Any]) -> dict[str, Any]:
    """What ``environment.json`` records for every command: versions, device, seed, prompt sets."""
    import torch
    import transformers

    return {
        "abliterate": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "seed": seed,
        "data": data,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
