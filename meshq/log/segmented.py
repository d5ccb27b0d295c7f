"""The file-backed partition log (``SegmentedLog``); the data directory of logs is ``meshq.log.datadir``.

Theory of operation
-------------------
A partition lives in ``<data_dir>/topics/<topic>-<partition>/`` as segment files named
by the base offset of their first batch, zero-padded to 20 digits
(``00000000000000000000.log``); one file and the sparse index derived from it are a
``_Segment`` (``meshq.log.segment``). Only the newest segment (the active one) is written,
through a raw file descriptor opened with ``O_APPEND``: once ``append`` returns, the bytes
are in the OS page cache and survive a kill -9 of the process. ``sync`` fsyncs every
segment holding unsynced bytes, and the directory when segment files were created or
deleted.

``SegmentedLog`` owns the list of segments: it rolls a new one when the active one is full
or old, finds the segment holding an offset and lets it read, cuts the end
(``truncate_to``), deletes whole sealed segments from the oldest (retention), rewrites
sealed segments keeping the latest record per key (``compact``, ``meshq.log.compaction``)
and restarts empty at a later offset. Opening a log rebuilds every index from the files and
cuts or remembers what a crash damaged (``meshq.log.recovery``).

The log also owns its *lost ranges*: offsets whose records were damaged on disk, found by
recovery or by a read whose CRC check failed. They live in the log's state file
(``meshq.log.logstate``), are never served (a read of them raises ``CorruptLogError``
naming the topic, partition and offsets; a read that reaches them stops before them) and
never handed out again.
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_right
from collections.abc import Callable

from meshq.core.batch import BatchHeader, iter_batches, parse_header
from meshq.core.ports import CompactionResult, RecoveryReport
from meshq.errors import (
    CorruptLogError,
    DiskFullError,
    OffsetOutOfRangeError,
    StorageError,
    UsageError,
)
from meshq.log.compaction import SegmentCompaction, latest_offsets
from meshq.log.fileio import (
    _fsync_directory,
    _write_all,
    is_out_of_space,
)
from meshq.log.logstate import (
    LostRange,
    clip_lost,
    lost_message,
    lost_range_at,
    merge_lost,
    next_lost_start,
    remove_lost,
    write_log_state,
)
from meshq.log.recovery import LogRecovery
from meshq.log.segment import DamagedBatch, _Segment, segment_file_name
from meshq.log.store import (
    DEFAULT_INDEX_INTERVAL_BYTES,
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SEGMENT_MS,
    check_append_batch,
    check_options,
    check_read_args,
    out_of_range_message,
)

__all__ = ["SegmentedLog", "segment_file_name"]

logger = logging.getLogger("meshq.log")



class SegmentedLog:
    """One partition's log in a directory of segment files; see the module docstring."""

    def __init__(
        self,
        directory: str,
        topic: str,
        partition: int,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        segment_ms: int = DEFAULT_SEGMENT_MS,
        index_interval_bytes: int = DEFAULT_INDEX_INTERVAL_BYTES,
        on_close: Callable[[SegmentedLog], None] | None = None,
    ) -> None:
        check_options(segment_bytes, segment_ms, index_interval_bytes)
        self._directory = directory
        self._topic = topic
        self._partition = partition
        self._segment_bytes = segment_bytes
        self._segment_ms = segment_ms
        self._index_interval_bytes = index_interval_bytes
        self._on_close = on_close
        self._segments: list[_Segment] = []
        self._recovery: list[RecoveryReport] = []
        self._directory_dirty = False
        self._synced_offset = 0
        self._closed = False
        self._failure: str | None = None
        self._lost: list[LostRange] = []  # shared with every segment (it explains gaps)
        self._compacted: set[int] = set()  # base offsets of segments compaction rewrote
        self._compacted_through: int | None = None  # where the last compaction with nothing pending ended
        self._detected = 0  # damaged batches found (recovery, reads, scrub) since open
        self._repaired = 0  # batches written back into lost ranges from a replica's copy since open
        recovery = LogRecovery(directory, self._name(), index_interval_bytes)
        try:
            os.makedirs(directory, exist_ok=True)
            try:
                recovery.run()
            finally:
                self._segments = recovery.segments  # closed below if opening fails
            self._recovery = recovery.reports
            self._lost = recovery.lost
            self._detected = recovery.damaged
            self._compacted = recovery.compacted
            self._directory_dirty = recovery.directory_dirty
            self.sync()
        except OSError as exc:
            self._close_files()
            raise StorageError(f"cannot open the log in {directory}: {exc.strerror or exc}") from exc
        except BaseException:
            self._close_files()
            raise

    # -- state -----------------------------------------------------------------------

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def partition(self) -> int:
        return self._partition

    @property
    def directory(self) -> str:
        return self._directory

    @property
    def start_offset(self) -> int:
        return self._segments[0].base_offset

    @property
    def end_offset(self) -> int:
        return self._segments[-1].end_offset

    @property
    def synced_offset(self) -> int:
        return self._synced_offset

    @property
    def size_bytes(self) -> int:
        return sum(segment.size for segment in self._segments)

    @property
    def recovery(self) -> list[RecoveryReport]:
        return list(self._recovery)

    @property
    def lost_offsets(self) -> list[tuple[int, int]]:
        return [(first, last) for first, last, _reason in self._lost]

    @property
    def corrupt_batches_detected(self) -> int:
        return self._detected

    @property
    def corrupt_batches_repaired(self) -> int:
        return self._repaired

    @property
    def segment_base_offsets(self) -> list[int]:
        """Base offsets of the segments, oldest first (the last one is active)."""
        return [segment.base_offset for segment in self._segments]

    def __repr__(self) -> str:
        return f"SegmentedLog({self._directory!r}, {self.start_offset}..{self.end_offset})"

    # -- writing ---------------------------------------------------------------------

    def append(self, batch: bytes, now_ms: int | None = None) -> BatchHeader:
        self._check_usable()
        header = check_append_batch(batch, self.end_offset, self._name())
        active = self._segments[-1]
        rolled = False
        if active.size > 0 and (
            active.size + len(batch) > self._segment_bytes
            or (now_ms is not None and active.created_ms is not None and now_ms - active.created_ms >= self._segment_ms)
        ):
            active = self._roll()
            rolled = True
        position = active.size
        try:
            _write_all(active.descriptor(), batch)
        except OSError as exc:
            self._undo_append(active, position, rolled)
            if self._failure is not None:
                raise StorageError(f"{self._failure}; appending failed with: {exc.strerror or exc}") from exc
            if is_out_of_space(exc):
                raise DiskFullError(f"disk full while appending to {active.path}; nothing was stored") from exc
            raise StorageError(f"cannot append to {active.path}: {exc.strerror or exc}") from exc
        active.size = position + len(batch)
        active.dirty = True
        active.add_batch(header, position, self._index_interval_bytes)
        if active.created_ms is None and now_ms is not None:
            active.created_ms = now_ms
        return header

    def _roll(self) -> _Segment:
        segment = _Segment(self._directory, self.end_offset, self._name(), self._lost)
        try:
            segment.create()
        except OSError as exc:
            if is_out_of_space(exc):
                raise DiskFullError(f"disk full while creating {segment.path}; nothing was stored") from exc
            raise StorageError(f"cannot create {segment.path}: {exc.strerror or exc}") from exc
        self._segments.append(segment)
        self._directory_dirty = True
        return segment

    def _undo_append(self, active: _Segment, position: int, rolled: bool) -> None:
        """Put the files back as they were before a failed append."""
        try:
            if rolled:
                self._segments.pop()
                active.delete()
            else:
                os.ftruncate(active.fd, position)
        except OSError as exc:
            self._fail(f"could not undo a failed append to {active.path}: {exc.strerror or exc}")

    def truncate_to(self, offset: int) -> None:
        self._check_usable()
        if type(offset) is not int or not self.start_offset <= offset <= self.end_offset:
            raise UsageError(
                f"cannot truncate {self._name()} to {offset!r}: "
                f"it must lie between {self.start_offset} and {self.end_offset}"
            )
        if offset == self.end_offset:
            return
        index = self._segment_index(offset)
        segment = self._segments[index]
        if offset == segment.end_offset:
            position = segment.size
        else:
            lost = lost_range_at(self._lost, offset)
            if lost is not None and offset != lost[0]:
                raise CorruptLogError(f"cannot truncate {self._name()} to {offset}: "
                                      + lost_message(self._topic, self._partition, lost))
            position = segment.locate(offset)
            header = segment.read_header(position, None) if position is not None else None
            if header is None or header.base_offset != offset:
                if lost is None:
                    raise UsageError(
                        f"cannot truncate {self._name()} to {offset}: not a batch boundary"
                        + ("" if header is None else f" (the batch holding it starts at {header.base_offset})")
                    )
                # the start of a lost range: cut from the first batch after it
                position = segment.size if position is None else position
        try:
            while len(self._segments) > index + 1:
                self._segments.pop().delete()
                self._directory_dirty = True
            os.ftruncate(segment.descriptor(), position)
        except OSError as exc:
            self._fail(f"truncating {self._name()} to offset {offset} failed: {exc.strerror or exc}")
            raise StorageError(self._failure) from exc
        segment.forget_from(position)
        self._synced_offset = min(self._synced_offset, offset)
        self._set_lost(clip_lost(self._lost, self.start_offset, offset))
        assert self.end_offset <= offset

    def restart_at(self, offset: int) -> None:
        self._check_usable()
        if type(offset) is not int or offset <= self.end_offset:
            raise UsageError(f"cannot restart {self._name()} at {offset!r}: it must lie past its end {self.end_offset}")
        # Old segments go first: a crash in between leaves an empty log at 0, which the leader
        # simply restarts again; never a log with a gap.
        try:
            for segment in self._segments:
                segment.delete()
            self._segments = []
            _fsync_directory(self._directory)
            segment = _Segment(self._directory, offset, self._name(), self._lost)
            segment.create()
            self._segments = [segment]
            _fsync_directory(self._directory)
            self._compacted.clear()
            self._compacted_through = None
            self._set_lost([])
        except OSError as exc:
            self._fail(f"restarting {self._name()} at offset {offset} failed: {exc.strerror or exc}")
            raise StorageError(self._failure) from exc
        self._synced_offset = offset

    def sync(self) -> None:
        self._check_usable()
        try:
            for segment in self._segments:
                if segment.dirty:
                    os.fsync(segment.descriptor())
                    segment.dirty = False
            if self._directory_dirty:
                _fsync_directory(self._directory)
                self._directory_dirty = False
        except OSError as exc:
            # After a failed fsync the page cache no longer tells what is on disk.
            self._fail(f"fsync failed in {self._directory}: {exc.strerror or exc}")
            raise StorageError(self._failure) from exc
        self._synced_offset = self.end_offset

    def apply_retention(self, now_ms: int, retention_bytes: int | None, retention_ms: int | None) -> int:
        self._check_usable()
        removed = 0
        total = self.size_bytes
        while len(self._segments) > 1:
            oldest = self._segments[0]
            too_big = retention_bytes is not None and total > retention_bytes
            too_old = (
                retention_ms is not None
                and oldest.max_timestamp_ms is not None
                and oldest.max_timestamp_ms < now_ms - retention_ms
            )
            if not (too_big or too_old):
                break
            try:
                oldest.delete()
            except OSError as exc:
                raise StorageError(f"cannot delete {oldest.path}: {exc.strerror or exc}") from exc
            self._segments.pop(0)
            self._directory_dirty = True
            total -= oldest.size
            removed += self._segments[0].base_offset - oldest.base_offset
            self._compacted.discard(oldest.base_offset)
        self._synced_offset = max(self._synced_offset, self.start_offset)
        if removed and self._lost and self._lost[0][0] < self.start_offset:
            self._set_lost(clip_lost(self._lost, self.start_offset, self.end_offset))
        return removed

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._failure is None:
                self.sync()
        finally:
            self._closed = True
            self._close_files()
            if self._on_close is not None:
                self._on_close(self)

    # -- reading ---------------------------------------------------------------------

    def read(self, offset: int, max_bytes: int) -> bytes:
        self._check_usable()
        check_read_args(offset, max_bytes)
        self._check_range(offset)
        if offset == self.end_offset:
            return b""
        lost = lost_range_at(self._lost, offset)
        if lost is not None:
            raise CorruptLogError(lost_message(self._topic, self._partition, lost))
        stop_offset = next_lost_start(self._lost, offset)
        parts: list[bytes] = []
        total = 0
        index = self._segment_index(offset)
        segment = self._segments[index]
        position = segment.locate(offset)
        expected = None
        while True:
            if position is not None:
                try:
                    total, expected, full = segment.read_batches(
                        position, expected, max_bytes, parts, total, stop_offset)
                except DamagedBatch as exc:
                    raise self._damaged_on_read(segment, exc) from None
                if full:
                    break
            index += 1
            if index >= len(self._segments) or (stop_offset is not None and self._segments[index].base_offset >= stop_offset):
                break
            segment = self._segments[index]
            position = 0
            expected = segment.base_offset
        if not parts:
            # ``offset`` lies in a gap compaction left just before a lost range
            lost = lost_range_at(self._lost, stop_offset) if stop_offset is not None else None
            if lost is not None:
                raise CorruptLogError(lost_message(self._topic, self._partition, lost))
            raise CorruptLogError(f"{self._name()}: no batch found at or after offset {offset} below the end "
                                  f"{self.end_offset}; the segment files changed under the log")
        return b"".join(parts)

    def _damaged_on_read(self, segment: _Segment, exc: DamagedBatch) -> CorruptLogError:
        """A read found a batch failing its CRC check: remember its offsets as lost (when the
        batch after it confirms where they end) and name them to the reader."""
        header = exc.header
        last = header.last_offset
        following = segment.end_offset
        position = segment.locate(header.next_offset) if header.next_offset < segment.end_offset else None
        if position is not None:
            following = segment.read_header(position, None).base_offset
        if following != header.next_offset:
            return exc  # the offsets it held are uncertain: report the bytes, remember nothing
        entry = (header.base_offset, last, f"damaged batch in {segment.name}: {exc}")
        if lost_range_at(self._lost, header.base_offset) is None:
            self._detected += 1
        logger.error("%s: %s", self._name(), lost_message(self._topic, self._partition, entry))
        self._set_lost(merge_lost(self._lost + [entry]))
        return CorruptLogError(lost_message(self._topic, self._partition, entry))

    def _set_lost(self, lost: list[LostRange]) -> None:
        """Replace the lost ranges (in place: the segments hold the list) and store them."""
        if lost == self._lost:
            return
        self._lost[:] = lost
        try:
            write_log_state(self._directory, self._lost, self._compacted)
        except OSError as exc:
            # Still never served while this process runs; the next open finds what the bytes show.
            logger.error("%s: cannot store the lost offset ranges in %s: %s", self._name(), self._directory,
                         exc.strerror or exc)

    # -- scrub and repair --------------------------------------------------------------

    def scrub(self, offset: int, max_bytes: int) -> int:
        self._check_usable()
        check_read_args(offset, max_bytes)
        sealed_end = self._segments[-1].base_offset  # the active segment is checked as it is read
        offset = max(offset, self.start_offset)
        if offset >= sealed_end:
            return self.start_offset
        lost = lost_range_at(self._lost, offset)
        if lost is not None:
            return lost[1] + 1
        try:
            data = self.read(offset, max_bytes)  # every batch read is CRC-checked
        except CorruptLogError:
            lost = lost_range_at(self._lost, offset)
            if lost is not None:
                return lost[1] + 1  # just found (and remembered) by the read
            # damage whose offsets are uncertain: reads report it; go on with the next segment
            index = self._segment_index(offset)
            return self._segments[index + 1].base_offset
        next_offset = offset
        for _position, header in iter_batches(data, verify_crc=False):
            next_offset = header.next_offset
        return max(next_offset, offset + 1)

    def repair(self, batches: bytes) -> int:
        self._check_usable()
        wanted: dict[int, list[tuple[BatchHeader, bytes]]] = {}
        try:
            found = list(iter_batches(batches, verify_crc=True))
        except CorruptLogError as exc:  # a damaged answer: repair nothing from it
            logger.warning("%s: a repair answer is damaged (%s); nothing written from it", self._name(), exc)
            return 0
        for position, header in found:
            lost = lost_range_at(self._lost, header.base_offset)
            if lost is None or header.last_offset > lost[1] or header.base_offset < self.start_offset:
                continue  # not (or no longer) lost here: the intact copy stays
            index = self._segment_index(header.base_offset)
            limit = self._segments[index + 1].base_offset if index + 1 < len(self._segments) else self.end_offset
            if header.next_offset > limit:
                continue  # would not fit in the segment that holds the gap
            wanted.setdefault(index, []).append((header, batches[position : position + header.size]))
        if not wanted:
            return 0
        self.sync()  # an active segment's unsynced bytes are durable before its file is replaced
        repaired = 0
        for index, pieces in sorted(wanted.items()):
            segment = self._segments[index]
            following = self._segments[index + 1].base_offset if index + 1 < len(self._segments) else self.end_offset
            kept = [(parse_header(batch), batch) for batch in self._batches(segment.base_offset, following)]
            merged = sorted(kept + pieces, key=lambda item: item[0].base_offset)
            expected = segment.base_offset
            for header, _batch in merged:
                if header.base_offset < expected:
                    logger.warning("%s: repair batch at offset %d overlaps what %s holds; not written",
                                   self._name(), header.base_offset, segment.name)
                    break
                expected = header.next_offset
            else:
                try:
                    self._rewrite(segment, [batch for _header, batch in merged])
                    self._directory_dirty = True
                    self.sync()
                except OSError as exc:
                    self._fail(f"repairing {segment.path} failed: {exc.strerror or exc}")
                    raise StorageError(self._failure) from exc
                lost = self._lost
                for header, _batch in pieces:
                    lost = remove_lost(lost, header.base_offset, header.last_offset)
                # after the segment: a crash in between leaves the offsets lost, and repaired again
                self._set_lost(lost)
                repaired += len(pieces)
                logger.warning("%s: repaired %d damaged batches in %s from a replica's intact copy", self._name(),
                               len(pieces), segment.name)
        self._repaired += repaired
        return repaired

    # -- compaction ------------------------------------------------------------------

    def compact(self, limit_offset: int, now_ms: int, delete_retention_ms: int | None) -> CompactionResult:
        self._check_usable()
        cleanable = [
            segment for segment, following in zip(self._segments, self._segments[1:])
            if following.base_offset <= limit_offset
        ]
        through = self._segments[len(cleanable)].base_offset if cleanable else None
        if not cleanable or through == self._compacted_through:
            return CompactionResult(0, 0, 0)
        limit_offset = min(limit_offset, self.end_offset)
        latest: dict[bytes, int] = {}
        producer_last: dict[int, int] = {}
        latest_offsets(self._batches(self.start_offset, self.end_offset), limit_offset, latest, producer_last)
        tombstone_before_ms = None if delete_retention_ms is None else now_ms - delete_retention_ms
        work = SegmentCompaction(latest, tombstone_before_ms, producer_last)
        self.sync()  # sealed segments are durable before a compacted one may stand for them
        if any(segment.base_offset not in self._compacted for segment in cleanable):
            before = set(self._compacted)
            self._compacted.update(segment.base_offset for segment in cleanable)
            try:
                self._store_state()
            except DiskFullError:
                self._compacted.clear()
                self._compacted.update(before)  # as stored: nothing was rewritten yet
                raise
        size_before = self.size_bytes
        rewritten = 0
        for segment in cleanable:
            following = self._segments[self._segments.index(segment) + 1].base_offset
            batches = list(self._batches(segment.base_offset, following))
            compacted = work.segment(segment.base_offset, batches, last=segment is cleanable[-1])
            if compacted is batches:
                continue
            rewritten += 1
            try:
                if compacted:
                    self._rewrite(segment, compacted)
                else:
                    segment.delete()
                    self._segments.remove(segment)
                    self._compacted.discard(segment.base_offset)
                self._directory_dirty = True
            except OSError as exc:
                if is_out_of_space(exc):
                    # replace_file kept the old segment whole; what was rewritten before it is complete
                    self._directory_dirty = True
                    raise DiskFullError(f"disk full while compacting {segment.path}; the segment is kept as it "
                                        f"was") from exc
                self._fail(f"compacting {segment.path} failed: {exc.strerror or exc}")
                raise StorageError(self._failure) from exc
        if self._lost and self._lost[0][0] < self.start_offset:
            self._set_lost(clip_lost(self._lost, self.start_offset, self.end_offset))
        self.sync()
        self._compacted_through = None if work.tombstones_kept else through
        if rewritten:
            logger.info("%s: compaction removed %d records (%d bytes) from %d segments", self._name(),
                        work.records_removed, size_before - self.size_bytes, rewritten)
        return CompactionResult(work.records_removed, size_before - self.size_bytes, rewritten)

    def _batches(self, offset: int, end_offset: int):  # noqa: ANN202 - a generator of batch bytes
        """Every readable batch from ``offset`` whose base offset lies below ``end_offset``; lost
        ranges are skipped."""
        while offset < min(end_offset, self.end_offset):
            lost = lost_range_at(self._lost, offset)
            if lost is not None:
                offset = lost[1] + 1
                continue
            try:
                data = self.read(offset, 4 * 1024 * 1024)
            except CorruptLogError:
                lost = lost_range_at(self._lost, offset)
                if lost is None:
                    raise  # damage whose offsets are uncertain: compact nothing rather than guess
                continue
            for position, header in iter_batches(data, verify_crc=False):
                if header.base_offset >= end_offset:
                    return
                yield data[position : position + header.size]
                offset = header.next_offset

    def _rewrite(self, segment: _Segment, batches: list[bytes]) -> None:
        """Replace a sealed segment's batches and rebuild its derived state."""
        data = b"".join(batches)
        segment.replace_contents(data)
        segment.reset()
        segment.size = len(data)
        for position, header in iter_batches(data, verify_crc=False):
            segment.add_batch(header, position, self._index_interval_bytes)

    def _store_state(self) -> None:
        try:
            write_log_state(self._directory, self._lost, self._compacted)
        except OSError as exc:
            if is_out_of_space(exc):
                raise DiskFullError(f"disk full while writing the log state in {self._directory}; the previous "
                                    f"version is kept") from exc
            self._fail(f"cannot store the log state in {self._directory}: {exc.strerror or exc}")
            raise StorageError(self._failure) from exc

    def offset_for_timestamp(self, timestamp_ms: int) -> int:
        self._check_usable()
        answer = self.end_offset
        for segment in self._segments:
            if segment.max_timestamp_ms is not None and segment.max_timestamp_ms >= timestamp_ms:
                answer = segment.offset_for_timestamp(timestamp_ms)
                break
        for first, last, _reason in self._lost:
            if first < answer <= last + 1:
                return first  # the answer may lie in the unreadable records just before it
        return answer

    def _segment_index(self, offset: int) -> int:
        return bisect_right(self._segments, offset, key=lambda segment: segment.base_offset) - 1

    # -- helpers ---------------------------------------------------------------------

    def _name(self) -> str:
        return f"{self._topic}-{self._partition}"

    def _check_usable(self) -> None:
        if self._closed:
            raise UsageError(f"log {self._name()} is closed")
        if self._failure is not None:
            raise StorageError(f"log {self._name()} is unusable: {self._failure}; restart to recover from disk")

    def _check_range(self, offset: int) -> None:
        if not self.start_offset <= offset <= self.end_offset:
            raise OffsetOutOfRangeError(
                out_of_range_message(self._topic, self._partition, offset, self.start_offset, self.end_offset)
            )

    def _fail(self, reason: str) -> None:
        logger.error("%s: %s", self._name(), reason)
        self._failure = reason

    def _close_files(self) -> None:
        for segment in self._segments:
            try:
                segment.close()
            except OSError:
                pass
