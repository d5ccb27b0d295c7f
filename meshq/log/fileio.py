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
OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})  # the disk, or this user's quota, is full


def is_out_of_space(exc: OSError) -> bool:
    """Whether a failed write failed for want of space (retrying once space returns may succeed)."""
    return exc.errno in OUT_OF_SPACE


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def replace_file(path: str, data: bytes) -> None:
    """Make ``data`` the whole of ``path``, atomically: written beside it as ``.tmp``, fsynced,
    renamed over it (a crash leaves the old file or the new one; a failure, such as ``ENOSPC``,
    leaves the old file and removes the ``.tmp``). The caller fsyncs the directory when the
    rename itself must be durable. Raises ``OSError``."""
    tmp_path = path + TMP_SUFFIX
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
    except OSError:
        # The old file is untouched; a half-written ``.tmp`` would only hold on to space that a
        # full disk needs back (it would be removed at the next start anyway).
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise


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
