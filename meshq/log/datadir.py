"""A node's data directory (``FileStorage``): the partition logs under ``topics/`` and small
documents under ``meta/``.

Theory of operation
-------------------
``FileStorage`` opens each partition's ``SegmentedLog`` (``meshq.log.segmented``) in
``topics/<topic>-<partition>/`` and keeps the open ones, so a log is opened once. Deleting a
log renames its directory to a hidden ``.deleted`` name first (fsynced), then removes it: a
crash in between leaves a leftover the next start removes, never half a log. Documents under
``meta/`` are msgpack, each written to a ``.tmp`` file and renamed into place; leftovers of
both kinds are removed when the directory is opened. The directory is locked
(``meshq.log.lock``) so that two nodes never share it, and ``check_space`` tells the node when
free space is under ``min_free_bytes``.
"""

from __future__ import annotations

import logging
import os
import re

from meshq.errors import (
    CorruptLogError,
    DiskFullError,
    StorageError,
    UsageError,
)
from meshq.log.fileio import (
    TMP_SUFFIX,
    _fsync_directory,
    _remove,
    free_bytes,
    is_out_of_space,
    replace_file,
)
from meshq.log.lock import DataDirLock
from meshq.log.segmented import SegmentedLog
from meshq.log.store import (
    DEFAULT_INDEX_INTERVAL_BYTES,
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SEGMENT_MS,
    check_log_name,
    check_meta_name,
    check_min_free_bytes,
    check_options,
    decode_meta,
    encode_meta,
)

__all__ = ["FileStorage"]

logger = logging.getLogger("meshq.log")

META_SUFFIX = ".msgpack"
DELETED_SUFFIX = ".deleted"
_LOG_DIR_NAME = re.compile(r"^(.+)-(\d+)$")


class FileStorage:
    """A node's data directory: partition logs under ``topics/``, documents under ``meta/``."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        segment_ms: int = DEFAULT_SEGMENT_MS,
        index_interval_bytes: int = DEFAULT_INDEX_INTERVAL_BYTES,
        min_free_bytes: int = 0,
    ) -> None:
        check_options(segment_bytes, segment_ms, index_interval_bytes)
        check_min_free_bytes(min_free_bytes)
        self._min_free_bytes = min_free_bytes
        self._options = {
            "segment_bytes": segment_bytes,
            "segment_ms": segment_ms,
            "index_interval_bytes": index_interval_bytes,
        }
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self._topics_dir = os.path.join(self.data_dir, "topics")
        self._meta_dir = os.path.join(self.data_dir, "meta")
        self._open: dict[tuple[str, int], SegmentedLog] = {}
        self._lock = DataDirLock(self.data_dir)
        try:
            for directory in (self._topics_dir, self._meta_dir):
                if not os.path.isdir(directory):
                    os.makedirs(directory)
                    _fsync_directory(self.data_dir)
            self._remove_leftovers()
        except OSError as exc:
            self._lock.release()
            raise StorageError(f"cannot prepare the data directory {self.data_dir}: {exc.strerror or exc}") from exc
        self._closed = False

    def _remove_leftovers(self) -> None:
        for directory, suffix in ((self._meta_dir, TMP_SUFFIX), (self._topics_dir, DELETED_SUFFIX)):
            removed = False
            for name in os.listdir(directory):
                if name.endswith(suffix):
                    path = os.path.join(directory, name)
                    logger.warning("removing leftover %s", path)
                    _remove(path)
                    removed = True
            if removed:
                _fsync_directory(directory)

    def _log_dir(self, topic: str, partition: int) -> str:
        return os.path.join(self._topics_dir, f"{topic}-{partition}")

    def open_log(self, topic: str, partition: int) -> SegmentedLog:
        self._check_open()
        check_log_name(topic, partition)
        key = (topic, partition)
        log = self._open.get(key)
        if log is None:
            directory = self._log_dir(topic, partition)
            created = not os.path.isdir(directory)
            log = SegmentedLog(directory, topic, partition, on_close=self._forget, **self._options)
            if created:
                try:
                    _fsync_directory(self._topics_dir)
                except OSError as exc:
                    log.close()
                    raise StorageError(f"cannot fsync {self._topics_dir}: {exc.strerror or exc}") from exc
            self._open[key] = log
        return log

    def logs(self) -> list[tuple[str, int]]:
        self._check_open()
        found = []
        for name in os.listdir(self._topics_dir):
            match = _LOG_DIR_NAME.match(name)
            if match and not name.startswith(".") and os.path.isdir(os.path.join(self._topics_dir, name)):
                found.append((match.group(1), int(match.group(2))))
        return sorted(found)

    def delete_log(self, topic: str, partition: int) -> None:
        self._check_open()
        check_log_name(topic, partition)
        log = self._open.pop((topic, partition), None)
        if log is not None:
            log._closed = True  # deleted: no final sync needed
            log._close_files()
        directory = self._log_dir(topic, partition)
        if not os.path.isdir(directory):
            return
        # Rename first so a crash mid-delete leaves a leftover that the next start removes.
        doomed = os.path.join(self._topics_dir, f".{topic}-{partition}{DELETED_SUFFIX}")
        try:
            if os.path.exists(doomed):
                _remove(doomed)
            os.rename(directory, doomed)
            _fsync_directory(self._topics_dir)
            _remove(doomed)
        except OSError as exc:
            raise StorageError(f"cannot delete {directory}: {exc.strerror or exc}") from exc

    def _meta_path(self, name: str) -> str:
        return os.path.join(self._meta_dir, name + META_SUFFIX)

    def read_meta(self, name: str) -> dict | None:
        self._check_open()
        check_meta_name(name)
        path = self._meta_path(name)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            return decode_meta(data)
        except ValueError as exc:
            raise CorruptLogError(f"metadata file {path} is damaged: {exc}") from None

    def write_meta(self, name: str, value: dict) -> None:
        self._check_open()
        check_meta_name(name)
        data = encode_meta(name, value)
        path = self._meta_path(name)
        try:
            replace_file(path, data)
            _fsync_directory(self._meta_dir)
        except OSError as exc:
            try:
                os.unlink(path + TMP_SUFFIX)
            except OSError:
                pass
            if is_out_of_space(exc):
                raise DiskFullError(f"disk full while writing {path}; the previous version is kept") from exc
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def check_space(self) -> str | None:
        self._check_open()
        try:
            free = free_bytes(self.data_dir)
        except OSError as exc:
            return f"cannot measure the free space of {self.data_dir}: {exc.strerror or exc}"
        if free < self._min_free_bytes:
            return (f"{self.data_dir} has {free} bytes free, below the reserve of {self._min_free_bytes} bytes "
                    f"(--min-free-bytes)")
        return None

    def close(self) -> None:
        if self._closed:
            return
        first_error: BaseException | None = None
        for log in list(self._open.values()):
            try:
                log.close()
            except Exception as exc:  # close the other logs anyway; report the first failure
                first_error = first_error or exc
        self._open.clear()
        self._closed = True
        self._lock.release()
        if first_error is not None:
            raise first_error

    def _forget(self, log: SegmentedLog) -> None:
        key = (log.topic, log.partition)
        if self._open.get(key) is log:
            del self._open[key]

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"storage {self.data_dir} is closed")

    def __repr__(self) -> str:
        return f"FileStorage({self.data_dir!r})"
