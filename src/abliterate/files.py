"""Files written safely: atomic writes, and the owner process of a temporary file or folder.

:func:`write_text`, :func:`write_json` and :func:`write_bytes` write to a temporary file in
the target's own directory (the same filesystem, so the final :func:`os.replace` is an atomic
rename), flush it to disk, then replace the target: a reader, a crash or ``kill -9`` sees the
old content or the complete new content, never a truncated file. The temporary file is created
with mode ``0o666`` filtered by the umask, so the result has the permissions any new file gets.

Temporary names carry their owner (:func:`owner_tag`: host and process id), so that a later
process can tell a folder left by a killed run (:func:`owned_by_dead_process`) from one that a
live run is still filling.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any


def owner_tag() -> str:
    """``HOST-PID`` of this process, for temporary names that a later run may sweep."""
    return f"{socket.gethostname()}-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def owned_by_dead_process(tag: str) -> bool:
    """Whether ``tag`` (``HOST-PID``, as :func:`owner_tag` writes it) names a process of this
    host that no longer exists. Processes of other hosts are never judged dead: their host may
    share this filesystem and still be running."""
    host, _, pid = tag.rpartition("-")
    return host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{owner_tag()}-{secrets.token_hex(4)}")
    # O_EXCL: never write through a file or link that is already there.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (with a final newline) to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 16 MB pieces (the checksum recorded for every
    exported weight file)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()
