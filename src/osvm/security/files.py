"""File writes for key material: exclusive creation and atomic replacement, with explicit modes.

Modes are set with fchmod after opening, so the process umask cannot loosen or tighten them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Flush the directory entry changes (create, rename) of directory to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_file(path: Path, data: bytes, mode: int) -> None:
    """Create path with data and mode, raising FileExistsError if it already exists.

    The file is created with mode 0600 and only then changed to mode, so a key is never readable by
    others, not even for a moment.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        os.unlink(path)
        raise


def replace_file(path: Path, data: bytes, mode: int, uid: int | None = None, gid: int | None = None) -> None:
    """Replace path atomically with data: readers see either the old file or the new one, never a part.

    The data goes to a temporary file in the same directory, which is flushed to disk and then
    renamed over path. uid and gid, when given, set the new file's owner before the rename.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
