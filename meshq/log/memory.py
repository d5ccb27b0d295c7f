"""The in-memory twin of the segmented file log; it is also the simulator's disk.

Theory of operation
-------------------
``MemoryStorage`` holds one ``_Disk`` per partition: the segments as they would sit in
files, the offset the last ``sync()`` made durable, and the lost ranges (offsets whose
batch failed its CRC check when read: the simulator flips bits in the stored bytes). ``MemoryLog`` is the open handle on
a disk and follows exactly the ``SegmentedLog`` rules for rolling, reading, retention and
truncation, so one conformance suite runs against both. ``MemoryStorage.crash()`` is power
loss: every log loses what it appended after its last sync and every open handle dies.
Nothing here touches files, clocks or randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshq.core.batch import BatchHeader, crc_ok, iter_batches, parse_header
from meshq.core.ports import CompactionResult, RecoveryReport
from meshq.errors import CorruptLogError, DiskFullError, OffsetOutOfRangeError, UsageError
from meshq.log.compaction import SegmentCompaction, latest_offsets
from meshq.log.logstate import (
    LostRange,
    clip_lost,
    lost_message,
    lost_range_at,
    merge_lost,
    next_lost_start,
    remove_lost,
)
from meshq.log.store import (
    DEFAULT_INDEX_INTERVAL_BYTES,
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SEGMENT_MS,
    check_append_batch,
    check_log_name,
    check_meta_name,
    check_min_free_bytes,
    check_options,
    check_read_args,
    decode_meta,
    encode_meta,
    out_of_range_message,
)


@dataclass
class _Segment:
    base_offset: int
    created_ms: int | None = None
    batches: list[bytes] = field(default_factory=list)
    headers: list[BatchHeader] = field(default_factory=list)
    size: int = 0

    @property
    def end_offset(self) -> int:
        return self.headers[-1].next_offset if self.headers else self.base_offset

    @property
    def max_timestamp_ms(self) -> int | None:
        return max(header.max_timestamp_ms for header in self.headers) if self.headers else None

    def cut(self, count: int) -> None:
        """Keep only the first ``count`` batches."""
        del self.batches[count:]
        del self.headers[count:]
        self.size = sum(len(batch) for batch in self.batches)
        if not self.headers:
            self.created_ms = None


@dataclass
class _Disk:
    segments: list[_Segment]
    synced_offset: int = 0
    lost: list[LostRange] = field(default_factory=list)  # stored, as the file log's state file


class MemoryLog:
    """One partition's log held in memory; same contract as ``SegmentedLog``."""

    def __init__(
        self,
        storage: MemoryStorage,
        topic: str,
        partition: int,
        disk: _Disk,
        segment_bytes: int,
        segment_ms: int,
    ) -> None:
        self._storage = storage
        self._topic = topic
        self._partition = partition
        self._disk = disk
        self._segment_bytes = segment_bytes
        self._segment_ms = segment_ms
        self._closed = False
        self._compacted_through: int | None = None  # where the last compaction with nothing pending ended
        self._detected = 0  # damaged batches found since open (reads, scrub)
        self._repaired = 0  # batches written back into lost ranges since open

    # -- state -----------------------------------------------------------------------

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def partition(self) -> int:
        return self._partition

    @property
    def start_offset(self) -> int:
        return self._disk.segments[0].base_offset

    @property
    def end_offset(self) -> int:
        return self._disk.segments[-1].end_offset

    @property
    def synced_offset(self) -> int:
        return self._disk.synced_offset

    @property
    def size_bytes(self) -> int:
        return sum(segment.size for segment in self._disk.segments)

    @property
    def recovery(self) -> list[RecoveryReport]:
        return []

    @property
    def lost_offsets(self) -> list[tuple[int, int]]:
        return [(first, last) for first, last, _reason in self._disk.lost]

    @property
    def corrupt_batches_detected(self) -> int:
        return self._detected

    @property
    def corrupt_batches_repaired(self) -> int:
        return self._repaired

    @property
    def segment_base_offsets(self) -> list[int]:
        """Base offsets of the segments, oldest first (the last one is active)."""
        return [segment.base_offset for segment in self._disk.segments]

    def __repr__(self) -> str:
        return f"MemoryLog({self._topic}-{self._partition}, {self.start_offset}..{self.end_offset})"

    # -- operations ------------------------------------------------------------------

    def append(self, batch: bytes, now_ms: int | None = None) -> BatchHeader:
        self._check_open()
        header = check_append_batch(batch, self.end_offset, self._name())
        active = self._disk.segments[-1]
        if active.headers and (
            active.size + len(batch) > self._segment_bytes
            or (now_ms is not None and active.created_ms is not None and now_ms - active.created_ms >= self._segment_ms)
        ):
            active = _Segment(base_offset=self.end_offset)
            self._disk.segments.append(active)
        self._storage._reserve(len(batch))
        active.batches.append(bytes(batch))
        active.headers.append(header)
        active.size += len(batch)
        if active.created_ms is None and now_ms is not None:
            active.created_ms = now_ms
        assert active.end_offset == header.next_offset
        return header

    def read(self, offset: int, max_bytes: int) -> bytes:
        self._check_open()
        check_read_args(offset, max_bytes)
        self._check_range(offset)
        if offset == self.end_offset:
            return b""
        lost = self._disk.lost
        entry = lost_range_at(lost, offset)
        if entry is not None:
            raise CorruptLogError(lost_message(self._topic, self._partition, entry))
        stop_offset = next_lost_start(lost, offset)
        parts: list[bytes] = []
        total = 0
        for segment in self._disk.segments:
            if segment.end_offset <= offset:
                continue
            for header, batch in zip(segment.headers, segment.batches):
                if header.next_offset <= offset:
                    continue
                if stop_offset is not None and header.next_offset > stop_offset:
                    return self._served(parts, stop_offset)
                if parts and total + len(batch) > max_bytes:
                    return b"".join(parts)
                if not crc_ok(batch, 0, header):
                    if parts:
                        return b"".join(parts)
                    # The headers here are kept apart from the bytes, so the offsets are certain.
                    entry = (header.base_offset, header.last_offset,
                             f"batch at offset {header.base_offset} failed its CRC check")
                    self._lose(entry)
                    raise CorruptLogError(lost_message(self._topic, self._partition, entry))
                parts.append(batch)
                total += len(batch)
        return self._served(parts, stop_offset)

    def _served(self, parts: list[bytes], stop_offset: int | None) -> bytes:
        if not parts and stop_offset is not None:
            entry = lost_range_at(self._disk.lost, stop_offset)
            assert entry is not None
            raise CorruptLogError(lost_message(self._topic, self._partition, entry))
        return b"".join(parts)

    def offset_for_timestamp(self, timestamp_ms: int) -> int:
        self._check_open()
        for segment in self._disk.segments:
            for header in segment.headers:
                if header.max_timestamp_ms >= timestamp_ms:
                    return header.base_offset
        return self.end_offset

    def truncate_to(self, offset: int) -> None:
        self._check_open()
        if type(offset) is not int or not self.start_offset <= offset <= self.end_offset:
            raise UsageError(
                f"cannot truncate {self._name()} to {offset!r}: "
                f"it must lie between {self.start_offset} and {self.end_offset}"
            )
        if offset == self.end_offset:
            return
        synced_offset = self._disk.synced_offset
        entry = lost_range_at(self._disk.lost, offset)
        if entry is not None and offset != entry[0]:
            raise CorruptLogError(f"cannot truncate {self._name()} to {offset}: "
                                  + lost_message(self._topic, self._partition, entry))
        if entry is None and not _is_boundary(self._disk, offset):
            raise UsageError(f"cannot truncate {self._name()} to {offset}: not a batch boundary")
        _cut_disk(self._disk, offset)
        self._disk.synced_offset = min(synced_offset, offset)
        self._disk.lost[:] = clip_lost(self._disk.lost, self.start_offset, offset)

    def sync(self) -> None:
        self._check_open()
        self._disk.synced_offset = self.end_offset

    def restart_at(self, offset: int) -> None:
        self._check_open()
        if type(offset) is not int or offset <= self.end_offset:
            raise UsageError(f"cannot restart {self._name()} at {offset!r}: it must lie past its end {self.end_offset}")
        self._disk.segments[:] = [_Segment(offset)]
        self._disk.synced_offset = offset
        self._disk.lost.clear()
        self._compacted_through = None

    def apply_retention(self, now_ms: int, retention_bytes: int | None, retention_ms: int | None) -> int:
        self._check_open()
        segments = self._disk.segments
        removed = 0
        while len(segments) > 1:
            oldest = segments[0]
            total = sum(segment.size for segment in segments)
            too_big = retention_bytes is not None and total > retention_bytes
            max_timestamp_ms = oldest.max_timestamp_ms
            too_old = (
                retention_ms is not None and max_timestamp_ms is not None and max_timestamp_ms < now_ms - retention_ms
            )
            if not (too_big or too_old):
                break
            segments.pop(0)
            removed += segments[0].base_offset - oldest.base_offset
        self._disk.synced_offset = max(self._disk.synced_offset, self.start_offset)
        self._disk.lost[:] = clip_lost(self._disk.lost, self.start_offset, self.end_offset)
        return removed

    def compact(self, limit_offset: int, now_ms: int, delete_retention_ms: int | None) -> CompactionResult:
        self._check_open()
        segments = self._disk.segments
        cleanable = [segment for segment, following in zip(segments, segments[1:])
                     if following.base_offset <= limit_offset]
        through = segments[len(cleanable)].base_offset if cleanable else None
        if not cleanable or through == self._compacted_through:
            return CompactionResult(0, 0, 0)
        limit_offset = min(limit_offset, self.end_offset)
        latest: dict[bytes, int] = {}
        producer_last: dict[int, int] = {}
        latest_offsets(self._readable_batches(segments), limit_offset, latest, producer_last)
        tombstone_before_ms = None if delete_retention_ms is None else now_ms - delete_retention_ms
        work = SegmentCompaction(latest, tombstone_before_ms, producer_last)
        self.sync()  # as the file log: what compaction rewrites is durable first
        size_before = self.size_bytes
        rewritten = 0
        for segment in cleanable:
            batches = list(self._readable_batches([segment]))
            compacted = work.segment(segment.base_offset, batches, last=segment is cleanable[-1])
            if compacted is batches:
                continue
            rewritten += 1
            if compacted:
                segment.batches = compacted
                segment.headers = [parse_header(batch) for batch in compacted]
                segment.size = sum(len(batch) for batch in compacted)
            else:
                segments.remove(segment)
        self._disk.synced_offset = max(self._disk.synced_offset, self.start_offset)
        self._disk.lost[:] = clip_lost(self._disk.lost, self.start_offset, self.end_offset)
        self._compacted_through = None if work.tombstones_kept else through
        return CompactionResult(work.records_removed, size_before - self.size_bytes, rewritten)

    def _readable_batches(self, segments: list[_Segment]):  # noqa: ANN202 - a generator of batch bytes
        """The batches of ``segments`` that are not lost (a CRC failure is remembered as lost)."""
        for segment in segments:
            for header, batch in zip(segment.headers, segment.batches):
                if lost_range_at(self._disk.lost, header.base_offset) is not None:
                    continue
                if not crc_ok(batch, 0, header):
                    entry = (header.base_offset, header.last_offset,
                             f"batch at offset {header.base_offset} failed its CRC check")
                    self._lose(entry)
                    continue
                yield batch

    def _lose(self, entry: LostRange) -> None:
        if lost_range_at(self._disk.lost, entry[0]) is None:
            self._detected += 1
        self._disk.lost[:] = merge_lost(self._disk.lost + [entry])

    # -- scrub and repair (as the file log's) ------------------------------------------

    def scrub(self, offset: int, max_bytes: int) -> int:
        self._check_open()
        check_read_args(offset, max_bytes)
        segments = self._disk.segments
        sealed_end = segments[-1].base_offset
        offset = max(offset, self.start_offset)
        if offset >= sealed_end:
            return self.start_offset
        entry = lost_range_at(self._disk.lost, offset)
        if entry is not None:
            return entry[1] + 1
        try:
            data = self.read(offset, max_bytes)
        except CorruptLogError:
            entry = lost_range_at(self._disk.lost, offset)
            assert entry is not None  # the headers here are kept apart from the bytes: offsets are certain
            return entry[1] + 1
        next_offset = offset
        for _position, header in iter_batches(data, verify_crc=False):
            next_offset = header.next_offset
        return max(next_offset, offset + 1)

    def repair(self, batches: bytes) -> int:
        self._check_open()
        try:
            found = list(iter_batches(batches, verify_crc=True))
        except CorruptLogError:
            return 0
        repaired = 0
        for position, header in found:
            entry = lost_range_at(self._disk.lost, header.base_offset)
            if entry is None or header.last_offset > entry[1] or header.base_offset < self.start_offset:
                continue
            batch = batches[position : position + header.size]
            if not self._put_back(header, batch):
                continue
            self._disk.lost[:] = remove_lost(self._disk.lost, header.base_offset, header.last_offset)
            repaired += 1
        self._repaired += repaired
        return repaired

    def _put_back(self, header: BatchHeader, batch: bytes) -> bool:
        """Put ``batch`` where its offsets belong: over the damaged copy, or into the gap."""
        segments = self._disk.segments
        for number, segment in enumerate(segments):
            limit = segments[number + 1].base_offset if number + 1 < len(segments) else self.end_offset
            if not segment.base_offset <= header.base_offset < limit:
                continue
            if header.next_offset > limit:
                return False
            index = 0
            while index < len(segment.headers) and segment.headers[index].next_offset <= header.base_offset:
                index += 1
            if index < len(segment.headers) and segment.headers[index].base_offset == header.base_offset:
                if segment.headers[index].next_offset != header.next_offset:
                    return False  # a damaged copy that does not match the offsets: leave it lost
                segment.size += len(batch) - len(segment.batches[index])
                segment.batches[index] = batch
                segment.headers[index] = header
                return True
            if index < len(segment.headers) and segment.headers[index].base_offset < header.next_offset:
                return False  # overlaps what is held
            segment.batches.insert(index, batch)
            segment.headers.insert(index, header)
            segment.size += len(batch)
            return True
        return False

    def close(self) -> None:
        if self._closed:
            return
        self.sync()
        self._closed = True
        self._storage._forget(self)

    # -- helpers ---------------------------------------------------------------------

    def _name(self) -> str:
        return f"{self._topic}-{self._partition}"

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"log {self._name()} is closed")

    def _check_range(self, offset: int) -> None:
        if not self.start_offset <= offset <= self.end_offset:
            raise OffsetOutOfRangeError(
                out_of_range_message(self._topic, self._partition, offset, self.start_offset, self.end_offset)
            )

    def _kill(self) -> None:
        self._closed = True


class MemoryStorage:
    """Partition logs and metadata held in memory; ``crash()`` simulates power loss."""

    def __init__(
        self,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        segment_ms: int = DEFAULT_SEGMENT_MS,
        index_interval_bytes: int = DEFAULT_INDEX_INTERVAL_BYTES,
        capacity_bytes: int | None = None,
        min_free_bytes: int = 0,
    ) -> None:
        check_options(segment_bytes, segment_ms, index_interval_bytes)
        check_min_free_bytes(min_free_bytes)
        self._min_free_bytes = min_free_bytes
        self._segment_bytes = segment_bytes
        self._segment_ms = segment_ms
        self._capacity_bytes = capacity_bytes
        self._disks: dict[tuple[str, int], _Disk] = {}
        self._open: dict[tuple[str, int], MemoryLog] = {}
        self._meta: dict[str, bytes] = {}
        self._closed = False

    def open_log(self, topic: str, partition: int) -> MemoryLog:
        self._check_open()
        check_log_name(topic, partition)
        key = (topic, partition)
        log = self._open.get(key)
        if log is None:
            disk = self._disks.get(key)
            if disk is None:
                disk = self._disks[key] = _Disk(segments=[_Segment(base_offset=0)])
            log = MemoryLog(self, topic, partition, disk, self._segment_bytes, self._segment_ms)
            self._open[key] = log
        return log

    def logs(self) -> list[tuple[str, int]]:
        self._check_open()
        return sorted(self._disks)

    def delete_log(self, topic: str, partition: int) -> None:
        self._check_open()
        check_log_name(topic, partition)
        key = (topic, partition)
        log = self._open.pop(key, None)
        if log is not None:
            log._kill()
        self._disks.pop(key, None)

    def read_meta(self, name: str) -> dict | None:
        self._check_open()
        check_meta_name(name)
        data = self._meta.get(name)
        return None if data is None else decode_meta(data)

    def write_meta(self, name: str, value: dict) -> None:
        self._check_open()
        check_meta_name(name)
        self._meta[name] = encode_meta(name, value)

    def check_space(self) -> str | None:
        self._check_open()
        if self._capacity_bytes is None:
            return None
        free = max(0, self._capacity_bytes - self.used_bytes)
        if free < self._min_free_bytes:
            return f"memory storage has {free} bytes free, below the reserve of {self._min_free_bytes} bytes"
        return None

    def set_capacity(self, capacity_bytes: int | None, min_free_bytes: int | None = None) -> None:
        """Grow or shrink the simulated disk (None: unbounded), and maybe its reserve; what is
        stored stays."""
        self._capacity_bytes = capacity_bytes
        if min_free_bytes is not None:
            check_min_free_bytes(min_free_bytes)
            self._min_free_bytes = min_free_bytes

    def crash(self) -> None:
        """Power loss: every log keeps only what its last sync covered; open logs die."""
        for log in self._open.values():
            log._kill()
        self._open.clear()
        for disk in self._disks.values():
            _cut_disk(disk, disk.synced_offset)

    def close(self) -> None:
        for log in list(self._open.values()):
            log.close()
        self._closed = True

    @property
    def used_bytes(self) -> int:
        """Bytes held by every log together."""
        return sum(segment.size for disk in self._disks.values() for segment in disk.segments)

    def _reserve(self, size: int) -> None:
        if self._capacity_bytes is not None and self.used_bytes + size > self._capacity_bytes:
            raise DiskFullError(f"memory storage is full ({self.used_bytes} of {self._capacity_bytes} bytes used)")

    def _forget(self, log: MemoryLog) -> None:
        key = (log.topic, log.partition)
        if self._open.get(key) is log:
            del self._open[key]

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("storage is closed")


def _is_boundary(disk: _Disk, offset: int) -> bool:
    return any(header.base_offset == offset for segment in disk.segments for header in segment.headers)


def _cut_disk(disk: _Disk, offset: int) -> None:
    """Drop every batch at and after ``offset`` (a batch boundary or the end)."""
    segments = disk.segments
    while len(segments) > 1 and segments[-1].base_offset > offset:
        segments.pop()
    segment = segments[-1]
    segment.cut(sum(1 for header in segment.headers if header.next_offset <= offset))
    assert segment.end_offset <= offset
    disk.synced_offset = segment.end_offset
