"""One node per data directory: an exclusive ``flock`` on ``<data_dir>/meshq.lock``.

``flock`` locks belong to an open file description, so a second ``DataDirLock`` on the
same directory conflicts whether it is taken by another process or by this one. The
kernel drops the lock when the holder dies, so a crashed node never leaves a stale lock;
the pid written into the file only serves the error message.
"""

from __future__ import annotations

import errno
import fcntl
import os

from meshq.errors import DataDirLockedError, StorageError

LOCK_FILE_NAME = "meshq.lock"


class DataDirLock:
    """An exclusive lock on a data directory, taken on construction."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.path = os.path.join(self.data_dir, LOCK_FILE_NAME)
        self._fd: int | None = None
        try:
            os.makedirs(self.data_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open the lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StorageError(f"cannot lock {self.path}: {exc.strerror}") from exc
            raise DataDirLockedError(
                f"data directory {self.data_dir} is already used by another meshq node "
                f"(pid {holder}); stop that node or choose another --data directory"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot write the lock file {self.path}: {exc.strerror}") from exc
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the directory up (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DataDirLock({self.data_dir!r}, held={self.held})"


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
