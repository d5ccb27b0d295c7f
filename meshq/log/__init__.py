"""Partition logs: the ``LogStore``/``Storage`` protocols, the in-memory twin, the file log."""

from meshq.core.ports import LogStore, RecoveryReport, Storage
from meshq.log.datadir import FileStorage
from meshq.log.lock import DataDirLock
from meshq.log.memory import MemoryLog, MemoryStorage
from meshq.log.segmented import SegmentedLog, segment_file_name
from meshq.log.store import (
    DEFAULT_INDEX_INTERVAL_BYTES,
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SEGMENT_MS,
)

__all__ = [
    "DEFAULT_INDEX_INTERVAL_BYTES",
    "DEFAULT_SEGMENT_BYTES",
    "DEFAULT_SEGMENT_MS",
    "DataDirLock",
    "FileStorage",
    "LogStore",
    "MemoryLog",
    "MemoryStorage",
    "RecoveryReport",
    "SegmentedLog",
    "Storage",
    "segment_file_name",
]
