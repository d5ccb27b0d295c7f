"""What opening a partition log finds wrong in its directory, and what it cuts.

Theory of operation
-------------------
Indexes are derived data, so opening a log always scans its segment files (Kafka's
``LogSegment.recover``); ``LogRecovery`` does that once per open and hands the log its
segments, each with its index rebuilt:

- the active segment is verified batch by batch (header bounds, offset continuity, CRC);
  the file is cut at the first bad or partial batch, and a ``RecoveryReport`` plus a
  WARNING say where, how many bytes and why;
- sealed segments get a header scan only. A broken header chain or a gap between
  segments is logged as an ERROR and remembered (``_Damage``): reads of the records it
  makes unreadable raise ``CorruptLogError``; they are never skipped. A damaged byte that
  leaves the headers intact is caught by the CRC check every read does;
- when the active segment is empty and the segment before it ends in a torn tail (power
  loss just after a roll), the empty file is dropped and the torn segment is recovered
  as the active one;
- zero-length sealed segments and leftover ``.tmp`` files are removed; an empty directory
  gets a first segment at offset 0.

Everything found is made durable by the log's first ``sync`` (every segment and the
directory are marked dirty), so what a killed predecessor left in the page cache is
fsynced before use.
"""

from __future__ import annotations

import logging
import mmap
import os

from meshq.core.batch import HEADER_SIZE, BatchHeader, crc_ok, parse_header
from meshq.core.ports import RecoveryReport
from meshq.errors import ProtocolError
from meshq.log.fileio import TMP_SUFFIX, _remove
from meshq.log.segment import _SEGMENT_NAME, _Damage, _Segment

logger = logging.getLogger("meshq.log")


class LogRecovery:
    """Opens one log directory's segment files and repairs what a crash left behind."""

    def __init__(self, directory: str, log_name: str, index_interval_bytes: int) -> None:
        self._directory = directory
        self._log_name = log_name
        self._index_interval_bytes = index_interval_bytes
        self.segments: list[_Segment] = []  # oldest first, the last one active; open
        self.reports: list[RecoveryReport] = []
        self.directory_dirty = False  # segment or temporary files were created or removed

    def run(self) -> None:
        """Open the directory's segment files, check them and cut or remember what is wrong."""
        bases = []
        for name in sorted(os.listdir(self._directory)):
            path = os.path.join(self._directory, name)
            match = _SEGMENT_NAME.match(name)
            if match:
                bases.append(int(match.group(1)))
            elif name.endswith(TMP_SUFFIX):
                logger.warning("%s: removing leftover temporary file %s", self._log_name, path)
                _remove(path)
                self.directory_dirty = True
            else:
                logger.warning("%s: ignoring unexpected file %s", self._log_name, path)
        segments = []
        for base_offset in sorted(bases):
            segment = _Segment(self._directory, base_offset, self._log_name)
            segment.size = os.fstat(segment.descriptor()).st_size
            segments.append(segment)
        self.segments = segments
        # Zero-length sealed segments hold nothing; they are leftovers of interrupted work.
        for segment in segments[:-1]:
            if segment.size == 0:
                logger.warning("%s: removing empty sealed segment %s", self._log_name, segment.path)
                segment.delete()
                self.directory_dirty = True
        segments = self.segments = [s for s in segments[:-1] if s.size > 0] + segments[-1:]
        if not segments:
            segment = _Segment(self._directory, 0, self._log_name)
            segment.create()
            segment.dirty = True
            self.segments = [segment]
            self.directory_dirty = True
            return
        for segment, following in zip(segments, segments[1:]):
            self._scan_sealed(segment, following.base_offset)
        active = segments[-1]
        if len(segments) > 1 and active.size == 0:
            previous = segments[-2]
            if previous.damage is not None and previous.damage.torn_tail:
                # Power loss right after a roll: the new file exists, the old one's tail does not.
                logger.warning(
                    "%s: removing empty segment %s because %s ends in a torn batch",
                    self._log_name,
                    active.path,
                    previous.name,
                )
                active.delete()
                self.directory_dirty = True
                segments.pop()
                previous.reset()
                previous.size = os.fstat(previous.fd).st_size
                active = previous
        for segment in segments[:-1]:
            if segment.damage is not None:
                self._report_damage(segment)
        self._recover_active(active)
        # What a killed predecessor left in the page cache is made durable before use.
        for segment in segments:
            segment.dirty = True
        self.directory_dirty = True

    def _scan_sealed(self, segment: _Segment, next_base_offset: int) -> None:
        """Rebuild the index of a sealed segment from its headers; remember damage."""
        size = segment.size
        position = 0
        reason = None
        torn_tail = False
        with _MappedFile(segment.fd, size) as view:
            while position < size:
                header, reason, torn_tail = _next_batch(view, position, size, segment.end_offset)
                if header is None:
                    break
                if header.next_offset > next_base_offset:
                    reason = f"batch holds offsets up to {header.last_offset} but the next segment starts at {next_base_offset}"
                    break
                segment.add_batch(header, position, self._index_interval_bytes)
                position += header.size
        if reason is None and segment.end_offset != next_base_offset:
            reason, torn_tail = (
                f"segment ends at offset {segment.end_offset} but the next one starts at {next_base_offset}",
                True,
            )
        if reason is not None:
            segment.damage = _Damage(position, segment.end_offset, next_base_offset, reason, torn_tail)

    def _report_damage(self, segment: _Segment) -> None:
        damage = segment.damage
        assert damage is not None
        if damage.first_offset < damage.end_offset:
            what = f"offsets {damage.first_offset} to {damage.end_offset - 1} are unreadable"
        else:
            what = "no records are lost"
        logger.error(
            "%s: sealed segment %s is damaged at byte %d: %s; %s",
            self._log_name,
            segment.path,
            damage.position,
            damage.reason,
            what,
        )
        self.reports.append(RecoveryReport(segment.name, damage.position, 0, f"{damage.reason}; {what}"))

    def _recover_active(self, segment: _Segment) -> None:
        """Verify every batch of the active segment; cut the file at the first bad one."""
        size = segment.size
        position = 0
        reason = None
        with _MappedFile(segment.fd, size) as view:
            while position < size:
                header, reason, _torn = _next_batch(view, position, size, segment.end_offset)
                if header is None:
                    break
                if not crc_ok(view, position, header):
                    reason = f"CRC mismatch in the batch at offset {header.base_offset}"
                    break
                segment.add_batch(header, position, self._index_interval_bytes)
                position += header.size
        segment.date_from_first_batch()
        if reason is None:
            return
        cut = size - position
        os.ftruncate(segment.fd, position)
        segment.size = position
        segment.dirty = True
        logger.warning(
            "%s: recovered segment %s: cut %d bytes at byte %d (%s)",
            self._log_name,
            segment.path,
            cut,
            position,
            reason,
        )
        self.reports.append(RecoveryReport(segment.name, position, cut, reason))


class _MappedFile:
    """A read-only memory map of a whole file (empty for a zero-length file)."""

    def __init__(self, fd: int | None, size: int) -> None:
        self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size > 0 else None

    def __enter__(self) -> mmap.mmap | bytes:
        return self._map if self._map is not None else b""

    def __exit__(self, *exc_info: object) -> None:
        if self._map is not None:
            self._map.close()


def _next_batch(view: mmap.mmap | bytes, position: int, size: int, expected_offset: int) -> tuple[BatchHeader | None, str | None, bool]:
    """The batch header at ``position`` if it is whole and continues the log at ``expected_offset``.

    Returns ``(header, None, False)``, or ``(None, reason, torn)`` where ``torn`` says the file
    simply ends inside the batch (a torn write) rather than holding wrong bytes.
    """
    remaining = size - position
    if remaining < HEADER_SIZE:
        return None, f"partial batch header ({remaining} of {HEADER_SIZE} bytes)", True
    try:
        header = parse_header(view, position)
    except ProtocolError as exc:
        return None, f"bad batch header: {exc}", False
    if header.base_offset != expected_offset:
        return None, (f"batch base offset {header.base_offset} does not continue the log "
                      f"(expected {expected_offset})"), False
    if header.size > remaining:
        return None, f"partial batch ({remaining} of {header.size} bytes)", True
    return header, None, False
