"""Atomic file writes: a reader never sees a half-written file.

Everything Concord writes (records, manifests, checkpoints, tables) goes through these helpers:
the content is written to a temporary file in the same directory, flushed and fsynced, then
renamed over the target, which POSIX makes atomic. An interrupted run leaves either the old or the
new file, never a torn one.

A file that cannot be written (read-only directory, a file where a directory should be, full
disk) is a one-line :class:`~marl.core.errors.ConcordError` naming the path, not a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from marl.core.errors import ConcordError, one_line

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_write_json"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fileobj)`` on a temporary file, then rename it to ``path``."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _cannot_write(target, exc) from None
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # e.g. a full disk, or a directory where the file should go
            raise _cannot_write(target, exc) from None
        raise
    return target


def _cannot_write(target: Path, exc: OSError) -> ConcordError:
    where = f" ({one_line(str(exc.filename))})" if exc.filename and str(exc.filename) != str(target) else ""
    return ConcordError(f"cannot write {one_line(str(target))}: {exc.strerror or exc}{where}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    def write(fh: IO[bytes]) -> None:
        fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
