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
