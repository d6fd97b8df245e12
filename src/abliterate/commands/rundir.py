"""Run directories: checked before any work, built under a temporary name, placed on success.

The rules every command follows (:func:`check_output_dir` before any work, then
:func:`run_directory`):

* ``--out`` never names an input or a directory that contains one (the model, a baseline, a
  saved direction, judge models, prompt files, the config file, a SQLite study): paths are
  compared resolved, so ``--out ..`` or a symbolic link cannot get around it.
* An existing non-empty ``--out`` is replaced only with ``--overwrite``, and only when it is a
  run directory of this tool, recognised by its record (:data:`RUN_MARKER`, or the
  ``environment.json`` and ``config.json`` of runs made before the marker existed). What is
  replaced is logged. Anything else is refused.
* The run is built in ``.OUT.partial-HOST-PID-*`` beside ``OUT`` (with the permissions the
  umask gives) and renamed into place only when the command succeeds; on any error or
  interruption it is deleted. The final rename checks the target again, so a run that
  finishes second never silently replaces another one's results: without ``--overwrite`` its
  results are kept under a free name (``OUT-2``) and the command fails with one line.
* Folders left by a killed process (``kill -9``) are swept by the next run with the same
  ``--out``: their names carry the host and process id, and only those of dead processes of
  this host are removed.
* Problems with the path itself (``.``, ``..``, a file as parent, a read-only or virtual
  parent, a name too long for the filesystem) end in one :class:`OutputDirError` before any
  model is loaded: creating the run directory's parents and its temporary folder is tried (and
  undone) up front.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import secrets
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from abliterate import __version__
from abliterate.errors import OutputDirError
from abliterate.files import owned_by_dead_process, owner_tag, write_json

log = logging.getLogger(__name__)

RUN_MARKER = ".abliterate-run.json"
"""The record that makes a directory a run of this tool (command, version, start, owner)."""

# Bytes the temporary name ".OUT.partial-HOST-PID-XXXXXXXX" adds to OUT and HOST-PID.
_TMP_OVERHEAD = len("..partial--") + 8


def run_record(path: Path) -> dict[str, Any] | None:
    """The record of the run in ``path``, or None when ``path`` is not a run of this tool.

    Runs made before :data:`RUN_MARKER` existed are recognised by their ``environment.json``
    and ``config.json``.
    """
    marker = path / RUN_MARKER
    if marker.is_file():
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        return record if isinstance(record, dict) else {}
    if (path / "environment.json").is_file() and (path / "config.json").is_file():
        return {"command": "an earlier version"}
    return None


def _describe(path: Path, record: dict[str, Any]) -> str:
    command, started = record.get("command", "?"), record.get("started")
    return f"{path} (a run of 'abliterate {command}'{f' started {started}' if started else ''})"


def _check_name(out: Path) -> None:
    # pathlib drops "." components ("a/." is "a"), so only these forms remain to catch.
    if out.name in ("", ".", ".."):
        raise OutputDirError(
            f"--out {out} names an existing directory through '.' or '..'; give the run its own "
            "directory, e.g. --out runs/NAME."
        )


def _check_not_an_input(out: Path, target: Path, inputs: Iterable[str | Path | None]) -> None:
    for item in inputs:
        if item is None or str(item) == "":
            continue
        path = Path(item).expanduser()
        if not path.exists():  # hub ids and hf: specs are not paths; missing files fail later
            continue
        resolved = path.resolve()
        if resolved == target or target in resolved.parents:
            how = "is" if resolved == target else "contains"
            raise OutputDirError(
                f"--out {out} {how} the input {item}; a run never writes over what it reads. "
                "Choose another --out."
            )


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _probe_creatable(out: Path, target: Path) -> None:
    """Create (and remove again) the parents of ``target`` and a temporary folder beside it,
    so that a path that cannot be written fails now rather than after the work."""
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        raise OutputDirError(f"cannot create --out {out}: {existing} is not a directory.")
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(target.name)) + len(os.fsencode(owner_tag())) + _TMP_OVERHEAD
    if size > limit:
        raise OutputDirError(
            f"the name of --out {out} is too long for this filesystem: its temporary name "
            f"needs {size} bytes, at most {limit} are possible; choose a shorter name."
        )
    missing = [p for p in [target.parent, *target.parent.parents] if not os.path.lexists(p)]
    missing.reverse()  # outermost first
    created: list[Path] = []
    try:
        for directory in missing:
            os.mkdir(directory)
            created.append(directory)
        probe = target.parent / f".{target.name}.partial-{owner_tag()}-probe"
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputDirError(
            f"cannot create --out {out}: {exc.strerror or exc} ({exc.filename})."
        ) from exc
    finally:
        for directory in reversed(created):
            with suppress(OSError):  # not empty: another process uses it
                os.rmdir(directory)


def check_output_dir(out: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Fail before any work if ``out`` cannot become the run directory (module docstring).

    Args:
        out: The ``--out`` path.
        overwrite: Whether an earlier run directory at ``out`` may be replaced.
        inputs: Everything the command reads (paths, or names that may be paths: model names
            and prompt sources that do not exist as paths are skipped).

    Raises:
        OutputDirError: ``out`` is or contains an input, is an existing non-run directory or
            file, exists without ``--overwrite``, or cannot be created.
    """
    out = Path(out)
    _check_name(out)
    try:
        target = out.resolve()
        _check_not_an_input(out, target, inputs)
        _check_existing(out, overwrite)
    except (OSError, RuntimeError) as exc:  # a name too long, a loop of symbolic links
        raise OutputDirError(
            f"cannot create --out {out}: {getattr(exc, 'strerror', exc)}."
        ) from exc
    _probe_creatable(out, target)


def _check_existing(out: Path, overwrite: bool) -> None:
    if out.is_symlink():
        # Renaming it would move the link, not the run it points to.
        raise OutputDirError(
            f"--out {out} is a symbolic link; pass the directory it points to, or another name."
        )
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output path {out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputDirError(
                f"output directory {out} already exists and is not empty; pass --overwrite to "
                "replace it or choose another --out."
            )
        record = run_record(out)
        if record is None:
            raise OutputDirError(
                f"{out} is not a run directory of abliterate (it has no {RUN_MARKER}), so "
                "--overwrite will not replace it; remove it yourself or choose another --out."
            )
        log.info("--overwrite: %s will be replaced when this run succeeds", _describe(out, record))


def sweep_stale(out: Path) -> list[Path]:
    """Remove the temporary folders of ``out`` left by dead processes of this host.

    A run killed between the two renames that replace ``out`` leaves the earlier run in
    ``.OUT.old-*`` and no ``out``: that folder is renamed back to ``out`` instead.

    Returns the folders removed.
    """
    out = Path(out)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        prefix = f".{out.name}.{kind}-"
        for path in out.parent.iterdir():
            if not path.name.startswith(prefix):
                continue
            # HOST-PID-RANDOM; older versions wrote no owner, and those are left alone.
            owner, _, _ = path.name[len(prefix) :].rpartition("-")
            if owner and owned_by_dead_process(owner):
                if kind == "old" and not os.path.lexists(out):
                    os.rename(path, out)
                    log.info("restored %s from %s, left by a run that was killed", out, path)
                    continue
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed %s, left by a run that was killed", path)
                removed.append(path)
    return removed


def _temporary_name(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{owner_tag()}-{secrets.token_hex(4)}")


def _keep_aside(tmp: Path, out: Path) -> Path:
    """Rename the finished run ``tmp`` to the first free ``OUT-N``; return that path."""
    for n in range(2, 1000):
        candidate = out.with_name(f"{out.name}-{n}")
        if os.path.lexists(candidate):
            continue
        try:
            os.rename(tmp, candidate)
        except OSError:
            continue
        return candidate
    return tmp


def _refuse_replacing(tmp: Path, out: Path, why: str) -> OutputDirError:
    kept = _keep_aside(tmp, out)
    return OutputDirError(f"{why}; it was left as it is and this run's results are in {kept}.")


def _place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished run ``tmp`` to ``out``, checking ``out`` again at this moment."""
    try:
        # Atomic, and refused by the OS when OUT exists and is not an empty directory.
        os.rename(tmp, out)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise OutputDirError(f"cannot create {out}: {exc.strerror or exc}.") from exc
    record = run_record(out) if out.is_dir() else None
    if not overwrite or record is None:
        why = f"{out} was created while this run worked (by another run with the same --out?)"
        if overwrite:
            why = f"{out} is not a run directory of abliterate, so --overwrite does not replace it"
        raise _refuse_replacing(tmp, out, why)
    log.info("replacing %s", _describe(out, record))
    old = _temporary_name(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError as exc:
        # Another run placed its results between the two renames: keep both.
        raise _refuse_replacing(tmp, out, f"{out} was replaced by another run meanwhile") from exc
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def run_directory(out: Path, overwrite: bool, command: str = "run") -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` if the block succeeds.

    The directory holds :data:`RUN_MARKER` from the start. On any exception (including Ctrl-C)
    it is deleted and ``out`` is left as it was. Call :func:`check_output_dir` before any
    work; this re-checks ``out`` when the results are placed (see the module docstring).
    """
    out = Path(out)
    sweep_stale(out)
    tmp = _temporary_name(out, "partial")
    try:
        # Created inside the block that removes it: a signal right after mkdir (Ctrl-C, SIGTERM
        # turned into an exception) must not leave the folder behind.
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            # mkdir (unlike mkdtemp's 0o700) gives the folder the permissions the umask allows.
            os.mkdir(tmp)
        except OSError as exc:
            raise OutputDirError(f"cannot create {out}: {exc.strerror or exc}.") from exc
        write_json(tmp / RUN_MARKER, {
            "command": command,
            "abliterate": __version__,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "owner": owner_tag(),
        })  # fmt: skip
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _place(tmp, out, overwrite)


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
