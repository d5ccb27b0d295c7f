"""What opening a partition log finds wrong in its directory, and what it cuts.

Theory of operation
-------------------
Indexes are derived data, so opening a log always scans its segment files (Kafka's
``LogSegment.recover``); ``LogRecovery`` does that once per open and hands the log its
segments, each with its index rebuilt, and the offset ranges lost on disk.

Every segment is walked batch by batch: header bounds, ascending base offsets, and for the
active segment the CRC of every batch (sealed segments get the header walk only; the CRC
check every read does catches a damaged byte that leaves the headers intact). At a bad
spot the walk looks for the next sound batch (whole, CRC-valid, continuing the offsets):

- **a torn tail** — nothing sound follows: an incomplete last write. In the active segment
  the file is cut there (those records were never acknowledged under ``fsync=always``, and
  are within the documented loss window otherwise), with a ``RecoveryReport`` and a WARNING
  saying where, how many bytes and why. In a sealed segment the offsets up to the next
  segment are lost (an ERROR);
- **damage inside the log** — sound batches follow: the damaged bytes are cut out of the
  file and the offsets between the last sound batch before and the first after are
  recorded as lost (an ERROR). The batches after the damage are kept, and the log end stays
  after them, so no offset is ever handed out twice.

Lost ranges are written to the log's state file (``meshq.log.logstate``) before any file
changes, so a later open still knows them; reads of them raise ``CorruptLogError``. A gap
between a sealed segment's last record and the next segment is lost records too, unless
compaction rewrote that segment (compaction removes records and leaves such gaps).

When the active segment is empty and the segment before it ends in a torn tail (power loss
just after a roll), the empty file is dropped and the torn segment is recovered as the
active one. Zero-length sealed segments and leftover ``.tmp`` files are removed; an empty
directory gets a first segment at offset 0. Everything found is made durable by the log's
first ``sync`` (every segment and the directory are marked dirty), so what a killed
predecessor left in the page cache is fsynced before use.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass, field

from meshq.core.batch import BATCH_MAGIC, HEADER_SIZE, BatchHeader, crc_ok, parse_header
from meshq.core.ports import RecoveryReport
from meshq.errors import ProtocolError
from meshq.log.fileio import TMP_SUFFIX, _remove
from meshq.log.logstate import STATE_FILE, LostRange, clip_lost, merge_lost, read_log_state, write_log_state
from meshq.log.segment import _SEGMENT_NAME, _Segment

logger = logging.getLogger("meshq.log")

_MAGIC_POSITION = 16  # of the magic byte within a batch header


@dataclass
class _Hole:
    """Damaged bytes between two sound batches of one segment file."""

    position: int
    end_position: int
    first_offset: int  # first offset the damaged bytes held (as far as the walk can tell)
    end_offset: int  # base offset of the sound batch after the damage
    reason: str


@dataclass
class _Scan:
    holes: list[_Hole] = field(default_factory=list)
    torn_position: int | None = None  # where a torn tail starts
    torn_offset: int = 0  # the offset the torn batch would have held
    torn_reason: str = ""


class LogRecovery:
    """Opens one log directory's segment files and repairs what a crash left behind."""

    def __init__(self, directory: str, log_name: str, index_interval_bytes: int) -> None:
        self._directory = directory
        self._log_name = log_name
        self._index_interval_bytes = index_interval_bytes
        self.segments: list[_Segment] = []  # oldest first, the last one active; open
        self.reports: list[RecoveryReport] = []
        self.lost: list[LostRange] = []  # offsets damaged on disk, never served
        self.damaged = 0  # pieces of damage found (each reported as lost offsets)
        self.compacted: set[int] = set()  # base offsets of the segments compaction rewrote
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
            elif name != STATE_FILE:
                logger.warning("%s: ignoring unexpected file %s", self._log_name, path)
        known_lost, compacted = read_log_state(self._directory, self._log_name)
        self.lost[:] = known_lost  # the segments check gaps against it while being scanned
        segments = []
        for base_offset in sorted(bases):
            segment = _Segment(self._directory, base_offset, self._log_name, self.lost)
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
            self.lost.clear()
            segment = _Segment(self._directory, 0, self._log_name, self.lost)
            segment.create()
            segment.dirty = True
            self.segments = [segment]
            self.directory_dirty = True
            if known_lost or compacted:
                write_log_state(self._directory, [], set())
            return
        scans = [self._scan(segment, verify_crc=segment is segments[-1]) for segment in segments]
        if len(segments) > 1 and segments[-1].size == 0 and scans[-2].torn_position is not None:
            # Power loss right after a roll: the new file exists, the old one's tail does not.
            previous = segments[-2]
            logger.warning("%s: removing empty segment %s because %s ends in a torn batch",
                           self._log_name, segments[-1].path, previous.name)
            segments.pop().delete()
            scans.pop()
            self.directory_dirty = True
            previous.reset()
            previous.size = os.fstat(previous.descriptor()).st_size
            scans[-1] = self._scan(previous, verify_crc=True)
        lost = list(known_lost)
        rewrites = []
        for index, (segment, scan) in enumerate(zip(segments, scans)):
            active = index == len(segments) - 1
            next_base = None if active else segments[index + 1].base_offset
            for hole in scan.holes:
                lost.append((hole.first_offset, hole.end_offset - 1, f"damaged batch in {segment.name}: {hole.reason}"))
                self._report(segment, hole.position, hole.end_position - hole.position, hole.reason,
                             hole.first_offset, hole.end_offset)
            if scan.torn_position is not None:
                cut = segment.size - scan.torn_position
                if active:
                    logger.warning("%s: recovered segment %s: cut %d bytes at byte %d (%s)", self._log_name,
                                   segment.path, cut, scan.torn_position, scan.torn_reason)
                    self.reports.append(RecoveryReport(segment.name, scan.torn_position, cut, scan.torn_reason))
                else:
                    assert next_base is not None
                    lost.append((scan.torn_offset, next_base - 1, f"{segment.name} ends in a torn batch"))
                    self._report(segment, scan.torn_position, cut, scan.torn_reason, scan.torn_offset, next_base)
            elif next_base is not None and segment.end_offset < next_base and segment.base_offset not in compacted:
                reason = f"segment ends at offset {segment.end_offset} but the next one starts at {next_base}"
                lost.append((segment.end_offset, next_base - 1, f"{segment.name}: {reason}"))
                self._report(segment, segment.size, 0, reason, segment.end_offset, next_base)
            if any(hole.end_position > hole.position for hole in scan.holes):
                rewrites.append((segment, scan))
            elif scan.torn_position is not None:
                os.ftruncate(segment.descriptor(), scan.torn_position)
                segment.forget_tail_from(scan.torn_position)
                segment.size = scan.torn_position
        end_offset = segments[-1].end_offset
        self.lost[:] = clip_lost(merge_lost(lost), segments[0].base_offset, max(end_offset, segments[-1].base_offset))
        self.compacted = {base for base in compacted if any(s.base_offset == base for s in segments[:-1])}
        if self.lost != known_lost or self.compacted != compacted:
            # Durable before any segment file changes: a crash in between loses no knowledge.
            write_log_state(self._directory, self.lost, self.compacted)
        for segment, scan in rewrites:
            self._cut_out(segment, scan, verify_crc=segment is segments[-1])
        segments[-1].date_from_first_batch()
        # What a killed predecessor left in the page cache is made durable before use.
        for segment in segments:
            segment.dirty = True
        self.directory_dirty = True

    def _report(self, segment: _Segment, position: int, cut: int, reason: str, first: int, end: int) -> None:
        what = f"offsets {first} to {end - 1} are unreadable" if first < end else "no records are lost"
        if first < end:
            self.damaged += 1
        logger.error("%s: segment %s is damaged at byte %d: %s; %s", self._log_name, segment.path, position,
                     reason, what)
        self.reports.append(RecoveryReport(segment.name, position, cut, f"{reason}; {what}"))

    def _scan(self, segment: _Segment, verify_crc: bool) -> _Scan:
        """Rebuild the segment's index from its batches; find holes and a torn tail."""
        scan = _Scan()
        size = segment.size
        position = 0
        expected = segment.base_offset
        with _MappedFile(segment.descriptor(), size) as view:
            while position < size:
                header, reason, parsed = _sound_batch(view, position, size, segment, expected, verify_crc)
                if header is not None:
                    segment.add_batch(header, position, self._index_interval_bytes)
                    position += header.size
                    expected = header.next_offset
                    continue
                assert reason is not None
                resume = _resynchronise(view, position, size, expected, parsed)
                if resume is None:
                    scan.torn_position, scan.torn_offset, scan.torn_reason = position, expected, reason
                    break
                scan.holes.append(_Hole(position, resume[0], expected, resume[1].base_offset, reason))
                position, expected = resume[0], resume[1].base_offset
        return scan

    def _cut_out(self, segment: _Segment, scan: _Scan, verify_crc: bool) -> None:
        """Rewrite the segment without its holes (and torn tail), then rebuild its index."""
        end = scan.torn_position if scan.torn_position is not None else segment.size
        chunks = []
        position = 0
        for hole in scan.holes:
            chunks.append(segment.pread(hole.position - position, position))
            position = hole.end_position
        chunks.append(segment.pread(end - position, position))
        segment.replace_contents(b"".join(chunks))
        self.directory_dirty = True
        segment.reset()
        segment.size = os.fstat(segment.descriptor()).st_size
        rescan = self._scan(segment, verify_crc)
        assert not rescan.holes and rescan.torn_position is None


class _MappedFile:
    """A read-only memory map of a whole file (empty for a zero-length file)."""

    def __init__(self, fd: int | None, size: int) -> None:
        self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size > 0 else None

    def __enter__(self) -> mmap.mmap | bytes:
        return self._map if self._map is not None else b""

    def __exit__(self, *exc_info: object) -> None:
        if self._map is not None:
            self._map.close()


def _sound_batch(
    view: mmap.mmap | bytes, position: int, size: int, segment: _Segment, expected_offset: int, verify_crc: bool
) -> tuple[BatchHeader | None, str | None, BatchHeader | None]:
    """``(header, None, header)`` when the batch at ``position`` is whole, continues the offsets
    at ``expected_offset`` (``_Segment.continues``) and (if asked) passes its CRC check; else
    ``(None, reason, parsed)`` with the header as parsed, if it parsed at all."""
    remaining = size - position
    if remaining < HEADER_SIZE:
        return None, f"partial batch header ({remaining} of {HEADER_SIZE} bytes)", None
    try:
        header = parse_header(view, position)
    except ProtocolError as exc:
        return None, f"bad batch header: {exc}", None
    if not segment.continues(header, expected_offset):
        return None, (f"batch base offset {header.base_offset} does not continue the log "
                      f"(expected {expected_offset})"), header
    if header.size > remaining:
        return None, f"partial batch ({remaining} of {header.size} bytes)", header
    if verify_crc and not crc_ok(view, position, header):
        return None, f"CRC mismatch in the batch at offset {header.base_offset}", header
    return header, None, header


def _resynchronise(
    view: mmap.mmap | bytes, position: int, size: int, expected_offset: int, parsed: BatchHeader | None
) -> tuple[int, BatchHeader] | None:
    """The first sound batch after damage at ``position``: ``(its position, its header)``, or
    None when nothing sound follows (a torn tail).

    Where the damaged batch's header still gives its length, the batch after it is tried first;
    otherwise every later position whose magic byte is right is tried. A candidate counts only
    when it is whole, continues the offsets and passes its CRC check, so garbage is not taken
    for a batch.
    """
    if parsed is not None and parsed.base_offset > expected_offset and _candidate(view, position, size, expected_offset):
        # A sound batch after a gap nothing explains (e.g. the state file naming the gap is gone):
        # the batch is kept when the next one continues it (its own base offset is outside the CRC,
        # so alone it could be a flipped base offset).
        after = _candidate(view, position + parsed.size, size, parsed.next_offset)
        if after is not None and after[1].base_offset == parsed.next_offset:
            return position, parsed
    if parsed is not None and HEADER_SIZE <= parsed.size and position + parsed.size < size:
        found = _candidate(view, position + parsed.size, size, expected_offset)
        if found is not None:
            return found
    magic = bytes([BATCH_MAGIC])
    search = position + 1 + _MAGIC_POSITION
    while True:
        at = view.find(magic, search)
        if at < 0 or at - _MAGIC_POSITION + HEADER_SIZE > size:
            return None
        found = _candidate(view, at - _MAGIC_POSITION, size, expected_offset)
        if found is not None:
            return found
        search = at + 1


def _candidate(view: mmap.mmap | bytes, position: int, size: int, expected_offset: int) -> tuple[int, BatchHeader] | None:
    try:
        header = parse_header(view, position)
    except ProtocolError:
        return None
    if header.base_offset < expected_offset or position + header.size > size or not crc_ok(view, position, header):
        return None
    return position, header
