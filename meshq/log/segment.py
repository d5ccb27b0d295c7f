"""One segment file of a partition log and the in-memory state derived from it.

Theory of operation
-------------------
A segment file holds batches back to back, exactly as they travel on the wire, and is named
by the base offset of its first batch, zero-padded to 20 digits
(``00000000000000000000.log``). Only the newest segment of a log (the active one) is
written, through a raw file descriptor opened with ``O_APPEND``.

Nothing but the batches is stored: what ``_Segment`` knows about its file is derived from
it and rebuilt on open (``meshq.log.recovery``). That is the size and end offset,
the max timestamp, a sparse index (one entry every ``index_interval_bytes``: batch base
offset, file position, running max timestamp) and the positions of the last batches (the
tail).

Offsets are dense except for two kinds of gap: records compaction removed (the batch after
the gap carries the ``COMPACTED_GAP`` attribute, inside its CRC) and records lost on disk
(the log's lost ranges, which the segment is handed). A segment's first batch may start
after its base offset, and a compacted segment's end offset (one past its last record) may
lie before the next segment's base. Any other jump in the offsets is damage.

A read finds its batch through the tail or the index and a short header walk, and serves
only whole batches that continue the offsets and whose CRC matches: anything else raises
``CorruptLogError`` naming the partition, the file, the byte and the offset
(``DamagedBatch`` for a CRC failure of a batch whose header is sound, so that the log can
remember the offsets it held). The segment never decides what the log does about it;
``SegmentedLog`` does.
"""

from __future__ import annotations

import os
import re
from bisect import bisect_left, bisect_right

from meshq.core.batch import HEADER_SIZE, BatchHeader, crc_ok, gap_allowed, parse_header
from meshq.errors import CorruptLogError, ProtocolError, StorageError
from meshq.log.fileio import replace_file

LOG_SUFFIX = ".log"
OFFSET_DIGITS = 20
_SEGMENT_NAME = re.compile(r"^(\d{%d})\.log$" % OFFSET_DIGITS)
_SEGMENT_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
_TAIL_BATCHES = 512  # the segment remembers the position of at least its last this-many batches (_Segment)


def segment_file_name(base_offset: int) -> str:
    """The file name of the segment whose first batch has ``base_offset``."""
    return f"{base_offset:0{OFFSET_DIGITS}d}{LOG_SUFFIX}"


class DamagedBatch(CorruptLogError):
    """A batch whose header is sound (its offsets are known) failed its CRC check."""

    def __init__(self, message: str, header: BatchHeader) -> None:
        super().__init__(message)
        self.header = header


class _Segment:
    """One segment file, its derived in-memory state, and checked reads from it."""

    def __init__(self, directory: str, base_offset: int, log_name: str, lost: list | None = None) -> None:
        self.base_offset = base_offset
        self.name = segment_file_name(base_offset)
        self.path = os.path.join(directory, self.name)
        self.log_name = log_name  # "<topic>-<partition>", for error messages
        self.fd: int | None = None
        self.size = 0  # bytes of the file that belong to the log
        self.end_offset = base_offset  # one past the last record (its base while empty)
        self.max_timestamp_ms: int | None = None
        self.created_ms: int | None = None
        self.index_offsets: list[int] = []
        self.index_positions: list[int] = []
        self.index_max_timestamps: list[int] = []  # running max through the entry's batch
        # Every batch of the segment's tail, not only one per index interval: replication and tail
        # consumers read what was just appended, and without these a read would walk up to an
        # index interval of headers (one pread each) to find its batch.
        self.tail_offsets: list[int] = []
        self.tail_positions: list[int] = []
        self.dirty = False  # holds bytes not yet fsynced
        # the log's lost ranges ([first, last, reason], sorted), shared with it: gaps they explain
        self.lost: list = lost if lost is not None else []

    def continues(self, header: BatchHeader, expected: int) -> bool:
        """Whether a batch at ``header.base_offset`` may follow records ending at ``expected``."""
        base = header.base_offset
        if base == expected:
            return True
        if base < expected:
            return False
        return gap_allowed(header) or any(first <= expected and base - 1 <= last for first, last, _ in self.lost)

    # -- the file --------------------------------------------------------------------

    def create(self) -> None:
        """Create the file, which must not exist yet, and keep it open."""
        self.fd = os.open(self.path, _SEGMENT_FLAGS | os.O_CREAT | os.O_EXCL, 0o644)

    def descriptor(self) -> int:
        """The open file descriptor, opening the existing file if need be."""
        if self.fd is None:
            self.fd = os.open(self.path, _SEGMENT_FLAGS)
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def replace_contents(self, data: bytes) -> None:
        """Make ``data`` the whole file, atomically: written beside it, fsynced, renamed over it
        (a crash leaves the old file or the new one, plus a ``.tmp`` leftover recovery removes).
        The caller fsyncs the directory and rebuilds the derived state."""
        replace_file(self.path, data)
        self.close()
        self.size = len(data)

    def delete(self) -> None:
        """Close the file and remove it (the directory still needs an fsync)."""
        self.close()
        os.unlink(self.path)

    # -- derived state ---------------------------------------------------------------

    def add_batch(self, header: BatchHeader, position: int, index_interval_bytes: int) -> None:
        """Account for a whole batch stored at ``position`` (the current end of the file)."""
        assert header.base_offset >= self.end_offset
        if self.max_timestamp_ms is None or header.max_timestamp_ms > self.max_timestamp_ms:
            self.max_timestamp_ms = header.max_timestamp_ms
        if not self.index_positions or position - self.index_positions[-1] >= index_interval_bytes:
            self.index_offsets.append(header.base_offset)
            self.index_positions.append(position)
            self.index_max_timestamps.append(self.max_timestamp_ms)
        tail_offsets = self.tail_offsets
        if len(tail_offsets) >= 2 * _TAIL_BATCHES:
            del tail_offsets[:_TAIL_BATCHES]
            del self.tail_positions[:_TAIL_BATCHES]
        tail_offsets.append(header.base_offset)
        self.tail_positions.append(position)
        self.end_offset = header.next_offset

    def date_from_first_batch(self) -> None:
        """Without a known creation time, count the segment's age from its first batch."""
        if self.created_ms is None and self.index_max_timestamps:
            self.created_ms = self.index_max_timestamps[0]

    def forget_tail_from(self, position: int) -> None:
        """Drop the tail entries of batches at or after ``position`` (they were cut off)."""
        keep = bisect_left(self.tail_positions, position)
        del self.tail_offsets[keep:]
        del self.tail_positions[keep:]

    def forget_from(self, position: int) -> None:
        """Drop the derived state of the bytes at and after ``position``, just cut off the file."""
        keep = bisect_left(self.index_positions, position)
        del self.index_offsets[keep:]
        del self.index_positions[keep:]
        del self.index_max_timestamps[keep:]
        self.forget_tail_from(position)
        self.size = position
        if keep == 0:
            self.end_offset = self.base_offset
            self.max_timestamp_ms = None
        else:
            # Rescan from the last kept entry to recover the end offset and max timestamp.
            scan_position = self.index_positions[-1]
            expected = self.index_offsets[-1]
            max_timestamp_ms = self.index_max_timestamps[-1]
            while scan_position < position:
                header = self.read_header(scan_position, expected)
                max_timestamp_ms = max(max_timestamp_ms, header.max_timestamp_ms)
                scan_position += header.size
                expected = header.next_offset
            assert scan_position == position
            self.end_offset = expected
            self.max_timestamp_ms = max_timestamp_ms
        self.dirty = True
        self.date_from_first_batch()
        if self.size == 0:
            self.created_ms = None

    def reset(self) -> None:
        """Forget everything derived from the file's contents."""
        self.size = 0
        self.end_offset = self.base_offset
        self.max_timestamp_ms = None
        self.index_offsets.clear()
        self.index_positions.clear()
        self.index_max_timestamps.clear()
        self.tail_offsets.clear()
        self.tail_positions.clear()

    # -- reading ---------------------------------------------------------------------

    def locate(self, offset: int) -> int | None:
        """File position of the first batch holding ``offset`` or starting after it; None when
        no batch of this segment does (``offset`` lies at or past its end)."""
        if offset >= self.end_offset:
            return None
        tail_offsets = self.tail_offsets
        if tail_offsets and offset >= tail_offsets[0]:
            entry = bisect_right(tail_offsets, offset) - 1
            position, expected = self.tail_positions[entry], tail_offsets[entry]
        else:
            entry = bisect_right(self.index_offsets, offset) - 1
            if entry < 0:
                position, expected = 0, self.base_offset
            else:
                position, expected = self.index_positions[entry], self.index_offsets[entry]
        while position < self.size:
            header = self.read_header(position, expected)
            if header.next_offset > offset:
                return position
            position += header.size
            expected = header.next_offset
        raise self.corrupt(position, offset, "offset not found where the index points")

    def offset_for_timestamp(self, timestamp_ms: int) -> int:
        """Base offset of the first batch with a max timestamp of at least ``timestamp_ms`` (one must exist)."""
        entry = bisect_left(self.index_max_timestamps, timestamp_ms)
        entry = max(entry - 1, 0)
        position = self.index_positions[entry]
        expected = self.index_offsets[entry]
        while position < self.size:
            header = self.read_header(position, expected)
            if header.max_timestamp_ms >= timestamp_ms:
                return header.base_offset
            position += header.size
            expected = header.next_offset
        raise self.corrupt(position, expected, "segment index disagrees with the file")

    def read_batches(
        self,
        position: int,
        expected: int | None,
        max_bytes: int,
        parts: list[bytes],
        total: int,
        stop_offset: int | None = None,
    ) -> tuple[int, int | None, bool]:
        """Append whole checked batches from ``position`` to ``parts``, none reaching
        ``stop_offset``; ``(total, expected next offset, done)``."""
        size = self.size
        while position < size:
            header = self.read_header(position, expected)
            if stop_offset is not None and header.next_offset > stop_offset:
                return total, expected, True
            if parts and total + header.size > max_bytes:
                return total, expected, True
            if position + header.size > size:
                raise self.corrupt(position, header.base_offset, "batch runs past the end of the segment")
            want = min(size - position, max(max_bytes - total, header.size))
            chunk = self.pread(want, position)
            cursor = 0
            while len(chunk) - cursor >= HEADER_SIZE:
                try:
                    batch = parse_header(chunk, cursor)
                except ProtocolError as exc:
                    return self._stop_or_raise(position + cursor, expected, str(exc), parts, total)
                if expected is not None and not self.continues(batch, expected):
                    reason = f"batch base offset {batch.base_offset} does not continue the log (expected {expected})"
                    return self._stop_or_raise(position + cursor, expected, reason, parts, total)
                if cursor + batch.size > len(chunk) or (parts and total + batch.size > max_bytes):
                    break
                if stop_offset is not None and batch.next_offset > stop_offset:
                    return total, expected, True
                if not crc_ok(chunk, cursor, batch):
                    if parts:
                        return total, expected, True
                    raise DamagedBatch(self.corrupt(position + cursor, batch.base_offset,
                                                    "batch failed its CRC check").args[0], batch)
                parts.append(chunk[cursor : cursor + batch.size])
                total += batch.size
                cursor += batch.size
                expected = batch.next_offset
            if cursor == 0:  # cannot happen unless the file changed under us; never spin
                raise self.corrupt(position, expected, "batch changed while being read")
            position += cursor
        return total, expected, False

    def _stop_or_raise(
        self, position: int, offset: int | None, reason: str, parts: list[bytes], total: int
    ) -> tuple[int, int | None, bool]:
        """Serve the good batches before damage; raise if the damage comes first."""
        if parts:
            return total, offset, True
        raise self.corrupt(position, offset, reason)

    def read_header(self, position: int, expected: int | None) -> BatchHeader:
        data = self.pread(HEADER_SIZE, position)
        try:
            header = parse_header(data)
        except ProtocolError as exc:
            raise self.corrupt(position, expected, str(exc)) from None
        if expected is not None and not self.continues(header, expected):
            raise self.corrupt(position, expected, f"batch base offset {header.base_offset} does not continue the log")
        return header

    def pread(self, size: int, position: int) -> bytes:
        try:
            data = os.pread(self.descriptor(), size, position)
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        if len(data) != size:
            raise self.corrupt(position, None, f"file ends {size - len(data)} bytes early")
        return data

    def corrupt(self, position: int, offset: int | None, reason: str) -> CorruptLogError:
        at = "" if offset is None else f" (offset {offset})"
        return CorruptLogError(
            f"{self.log_name}: segment {self.name} byte {position}{at}: {reason}; the damaged batch is not served"
        )
