"""The core's ports: the storage it is handed (``Storage``) and one partition's log (``LogStore``).

Theory of operation
-------------------
The core never opens a file. It is handed a ``Storage`` (a data directory: partition logs and
small metadata documents) and reaches every log through the ``LogStore`` protocol below. The
adapters live in ``meshq.log``: ``MemoryStorage``/``MemoryLog`` (the in-memory twin, also the
simulator's disk) and ``FileStorage``/``SegmentedLog`` (files), and one conformance suite
(``tests/log``) runs against both.

A partition log holds record batches (``meshq.core.batch``) back to back. Offsets start at 0,
ascend and are never reused: ``start_offset`` is the first offset still held (it advances
when retention deletes old segments), ``end_offset`` is the offset the next appended record
gets. They are dense but for records compaction removed (``compact``) and records damaged on
disk (``lost_offsets``: never served, a read raises ``CorruptLogError`` naming them). The durability step (``sync``) is asked for as an effect (``SyncLogs``) and confirmed
with ``LogsSynced``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from meshq.core.batch import BatchHeader


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What opening a log found wrong in one segment file, and what it did about it."""

    segment: str  # segment file name, e.g. "00000000000000000042.log"
    position: int  # byte position in that file where the damage starts
    bytes_cut: int  # bytes removed from the file (0 when the damage was only recorded)
    reason: str


@dataclass(frozen=True, slots=True)
class CompactionResult:
    """What one ``compact`` call did."""

    records_removed: int
    bytes_removed: int
    segments_rewritten: int  # rewritten or deleted because they held no record to keep


@runtime_checkable
class LogStore(Protocol):
    """One partition's append-only log."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def start_offset(self) -> int:
        """First offset still held (advances with retention)."""
        ...

    @property
    def end_offset(self) -> int:
        """The offset the next appended record gets (the log end offset)."""
        ...

    @property
    def synced_offset(self) -> int:
        """The end offset as of the last completed ``sync()``."""
        ...

    @property
    def size_bytes(self) -> int: ...

    @property
    def recovery(self) -> list[RecoveryReport]:
        """What opening the log cut or found damaged (empty when all was well)."""
        ...

    @property
    def lost_offsets(self) -> list[tuple[int, int]]:
        """``(first, last)`` offset ranges damaged on disk: never served, never handed out again."""
        ...

    @property
    def corrupt_batches_detected(self) -> int:
        """Damaged batches found since the log was opened (recovery, reads, scrub)."""
        ...

    @property
    def corrupt_batches_repaired(self) -> int:
        """Batches written back into lost ranges from a replica's intact copy since the log was opened."""
        ...

    def scrub(self, offset: int, max_bytes: int) -> int:
        """CRC-check about ``max_bytes`` of sealed segments from ``offset`` (a damaged batch becomes a
        lost range, counted as detected); return the offset to go on from (the start offset again
        once past the last sealed segment)."""
        ...

    def repair(self, batches: bytes) -> int:
        """Write the CRC-valid batches of ``batches`` that fill lost offsets back into place (the
        offsets and bytes a replica holds); others are ignored. Returns how many were written."""
        ...

    def append(self, batch: bytes, now_ms: int | None = None) -> BatchHeader:
        """Append one verified, stamped batch whose base offset equals ``end_offset`` (or lies past
        it, for a batch marked ``COMPACTED_GAP`` copied from a compacted replica)."""
        ...

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole CRC-checked batches from the one holding ``offset``; at least one if any."""
        ...

    def offset_for_timestamp(self, timestamp_ms: int) -> int:
        """Base offset of the first batch with max timestamp >= ``timestamp_ms``, else end."""
        ...

    def truncate_to(self, offset: int) -> None:
        """Drop every record at and after ``offset`` (a batch boundary)."""
        ...

    def sync(self) -> None:
        """Make everything appended so far durable."""
        ...

    def apply_retention(self, now_ms: int, retention_bytes: int | None, retention_ms: int | None) -> int:
        """Delete old sealed segments; return the number of records removed."""
        ...

    def compact(self, limit_offset: int, now_ms: int, delete_retention_ms: int | None) -> CompactionResult:
        """Keep only the latest record per key in the sealed segments wholly below ``limit_offset``
        (see ``meshq.log.compaction``); tombstones older than ``delete_retention_ms`` go too
        (None: never). Offsets are kept; cheap when nothing changed since the last call."""
        ...

    def restart_at(self, offset: int) -> None:
        """Drop every record and continue empty from ``offset`` (past the end), durably. Used by a
        replica whose missing records were already deleted by the leader's retention."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Storage(Protocol):
    """A node's durable state: partition logs and small metadata documents."""

    def open_log(self, topic: str, partition: int) -> LogStore:
        """The log of a partition, created empty if missing (the same object while open)."""
        ...

    def logs(self) -> list[tuple[str, int]]:
        """Every stored ``(topic, partition)``, sorted."""
        ...

    def delete_log(self, topic: str, partition: int) -> None: ...

    def read_meta(self, name: str) -> dict | None:
        """The document last written under ``name``, or None."""
        ...

    def write_meta(self, name: str, value: dict) -> None:
        """Replace the document ``name`` atomically and durably."""
        ...

    def check_space(self) -> str | None:
        """None when there is room for new records; else why not (free space below the reserve,
        or it cannot be measured). Writes that fail for want of space raise ``DiskFullError``."""
        ...

    def close(self) -> None: ...
