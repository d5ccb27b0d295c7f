"""One segment file of a partition log and the in-memory state derived from it.

Theory of operation
-------------------
A segment file holds batches back to back, exactly as they travel on the wire, and is named
by the base offset of its first batch, zero-padded to 20 digits
(``00000000000000000000.log``). Only the newest segment of a log (the active one) is
written, through a raw file descriptor opened with ``O_APPEND``.

Nothing but the batches is stored: what ``_Segment`` knows about its file is derived from
it and rebuilt on open (``meshq.log.recovery``). That is the readable size and end offset,
the max timestamp, a sparse index (one entry every ``index_interval_bytes``: batch base
offset, file position, running max timestamp), the positions of the last batches (the
tail), and the ``_Damage`` recovery found in a sealed segment.
"""

from __future__ import annotations

import os
import re
from bisect import bisect_left
from dataclasses import dataclass

from meshq.core.batch import BatchHeader

LOG_SUFFIX = ".log"
OFFSET_DIGITS = 20
_SEGMENT_NAME = re.compile(r"^(\d{%d})\.log$" % OFFSET_DIGITS)
_SEGMENT_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
_TAIL_BATCHES = 512  # the segment remembers the position of at least its last this-many batches (_Segment)


def segment_file_name(base_offset: int) -> str:
    """The file name of the segment whose first batch has ``base_offset``."""
    return f"{base_offset:0{OFFSET_DIGITS}d}{LOG_SUFFIX}"


@dataclass(frozen=True, slots=True)
class _Damage:
    """Records of a sealed segment that cannot be read."""

    position: int  # byte where the unreadable part of the file starts
    first_offset: int  # first unreadable offset
    end_offset: int  # one past the last unreadable offset (the next segment's base)
    reason: str
    torn_tail: bool  # the file merely ends early (nothing but a partial batch follows)


class _Segment:
    """One segment file and its derived in-memory state."""

    def __init__(self, directory: str, base_offset: int) -> None:
        self.base_offset = base_offset
        self.name = segment_file_name(base_offset)
        self.path = os.path.join(directory, self.name)
        self.fd: int | None = None
        self.size = 0  # bytes of the file that belong to the log (damaged ones included)
        self.end_offset = base_offset  # one past the last readable record
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
        self.damage: _Damage | None = None
        self.dirty = False  # holds bytes not yet fsynced

    @property
    def readable_size(self) -> int:
        return self.damage.position if self.damage is not None else self.size

    def add_batch(self, header: BatchHeader, position: int, index_interval_bytes: int) -> None:
        """Account for a whole batch stored at ``position`` (the current readable end)."""
        assert header.base_offset == self.end_offset
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

    def forget_tail_from(self, position: int) -> None:
        """Drop the tail entries of batches at or after ``position`` (they were cut off)."""
        keep = bisect_left(self.tail_positions, position)
        del self.tail_offsets[keep:]
        del self.tail_positions[keep:]

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
        self.damage = None

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

