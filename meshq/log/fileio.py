"""The raw file operations the file log and its data directory are built from.

Each is one careful step that the standard library leaves to the caller: write every byte
through a raw descriptor (``os.write`` may write fewer), make a directory's entries durable
(a created, renamed or deleted file is only on disk once its directory is fsynced), and
remove a leftover whether it is a file or a tree. A file is written as ``<name>.tmp`` and
renamed into place, so a ``.tmp`` file found on open is a leftover of interrupted work.
"""

from __future__ import annotations

import errno
import os
import shutil

TMP_SUFFIX = ".tmp"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def replace_file(path: str, data: bytes) -> None:
    """Make ``data`` the whole of ``path``, atomically: written beside it as ``.tmp``, fsynced,
    renamed over it (a crash leaves the old file or the new one). The caller fsyncs the
    directory when the rename itself must be durable. Raises ``OSError``."""
    tmp_path = path + TMP_SUFFIX
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp_path, path)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
