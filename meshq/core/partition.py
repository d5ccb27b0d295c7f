"""Leader-side state of one partition: its log, idempotent-producer table, parked fetches.

Theory of operation
-------------------
``append`` takes a batch already verified by ``batch.verify_batch``. For an idempotent
batch (producer_id >= 0) it first consults the producer table, which remembers the
sequence ranges and base offsets of each producer's last ``PRODUCER_WINDOW`` batches:
a batch whose range is remembered is a retry and gets its original offset back
(``duplicate=True``), a batch that skips sequence numbers is refused
(``OutOfOrderSequenceError``) so a lost batch cannot be silently papered over. Any other
batch is stamped with the next offset and appended. The table is rebuilt from batch
headers when the log is opened, so dedupe survives a restart.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from meshq.core import batch as batch_format
from meshq.errors import CorruptLogError, OutOfOrderSequenceError, ProducerFencedError

log = logging.getLogger("meshq.core")

PRODUCER_WINDOW = 5
_RECOVERY_READ_BYTES = 16 * 1024 * 1024
# The newest batches stay in memory too (``read_recent``): a leader sends what it just appended
# to its caught-up followers without reading it back from the log file.
RECENT_BATCHES = 64
RECENT_BYTES = 1024 * 1024


@dataclass(slots=True)
class ProducerEntry:
    epoch: int
    # (first_sequence, last_sequence, base_offset), oldest first, at most PRODUCER_WINDOW
    batches: deque = field(default_factory=lambda: deque(maxlen=PRODUCER_WINDOW))


@dataclass(slots=True)
class AckWaiter:
    """A produce (or offset commit) answered once its records reach ``acks``."""

    needed: int  # exclusive end offset the records must reach
    acks: str
    deadline_s: float
    callback: Any  # callback(error: MeshqError | None)


@dataclass(slots=True)
class ParkedProduce:
    """A produce held while leadership of its partition moves (``meshq.core.partitions.server``)."""

    route: Any
    message: Any  # the wire.Message, served again once the move resolves
    deadline_s: float
    caller: str | None  # who sent it (meshq.core.acl): its permissions are checked again when it is served


@dataclass(slots=True)
class ParkedFetch:
    route: Any
    request_id: int
    body: dict
    deadline_s: float


class PartitionState:
    """One partition this node holds a replica of (it serves clients only while it leads)."""

    def __init__(self, topic: str, partition: int, log: Any) -> None:
        self.topic = topic
        self.partition = partition
        self.log = log
        self.producers: dict[int, ProducerEntry] = {}
        self.parked_fetches: list[ParkedFetch] = []
        self.parked_produces: list[ParkedProduce] = []
        self.waiters: list[AckWaiter] = []
        # The replication state (meshq.core.replica.Replica), attached by its constructor: it owns
        # the leader epoch and the high watermark.
        self.replica: Any = None
        # the partition was rebuilt (every replica removed for good, metadata.py): a producer it does
        # not know may continue at any sequence, its earlier batches went with the lost log
        self.rebuilt = False
        # (epoch, first offset) of each epoch seen in the batch headers, found while rebuilding
        self.batch_epochs: list[tuple[int, int]] = []
        # (base_offset, next_offset, stored bytes) of the newest batches, contiguous, oldest first;
        # exactly the bytes of the log at those offsets (appends add, truncation clears)
        # The offset of the first control batch (shared-subscription state) this log holds, None
        # when it holds none: a new leader replays control batches from there only, and not at all
        # for a partition no shared group ever read (meshq.core.partitions.shared)
        self.first_control_offset: int | None = None
        self._recent: deque[tuple[int, int, bytes]] = deque()
        self._recent_bytes = 0
        self._rebuild_producers()

    @property
    def key(self) -> tuple[str, int]:
        return (self.topic, self.partition)

    @property
    def high_watermark(self) -> int:
        return self.replica.high_watermark  # what a majority of the replica set holds

    @property
    def leader_epoch(self) -> int:
        return self.replica.epoch  # stamped into the batches this replica stores as leader

    @property
    def waiting_for_all(self) -> bool:
        return any(waiter.acks == "all" for waiter in self.waiters)

    def _rebuild_producers(self) -> None:
        self.producers.clear()
        self.batch_epochs = []
        offset = self.log.start_offset
        end = self.log.end_offset
        while offset < end:
            try:
                data = self.log.read(offset, _RECOVERY_READ_BYTES)
            except CorruptLogError as exc:
                lost = [last for first, last in self.log.lost_offsets if first <= offset <= last]
                if lost:
                    offset = lost[0] + 1  # records lost on disk: the batches after them still count
                    continue
                # Damage whose extent the log cannot tell is reported to every reader of that
                # range; the node still serves the rest. Producers whose last batches sit in or
                # after it lose retry dedupe for those batches only.
                log.error("%s/%d: producer state rebuilt only up to offset %d: %s",
                          self.topic, self.partition, offset, exc)
                return
            if not data:
                break
            for _pos, header in batch_format.iter_batches(data):
                self._remember(header, header.base_offset)
                if not self.batch_epochs or header.leader_epoch > self.batch_epochs[-1][0]:
                    self.batch_epochs.append((header.leader_epoch, header.base_offset))
                offset = header.next_offset

    def _remember(self, header: batch_format.BatchHeader, base_offset: int) -> None:
        if header.attributes & batch_format.CONTROL and self.first_control_offset is None:
            self.first_control_offset = base_offset
        if header.producer_id < 0:
            return
        entry = self.producers.get(header.producer_id)
        if entry is None or header.producer_epoch > entry.epoch:
            entry = self.producers[header.producer_id] = ProducerEntry(header.producer_epoch)
        entry.batches.append((header.base_sequence, header.last_sequence, base_offset))

    def check_duplicate(self, header: batch_format.BatchHeader) -> int | None:
        """Base offset of an already-stored identical batch, None if new; raises on a gap."""
        if header.producer_id < 0:
            return None
        entry = self.producers.get(header.producer_id)
        if header.attributes & batch_format.AT_MOST_ONCE:
            # Gaps are fine (a lost fire-and-forget batch is never retried); anything at or
            # below the last stored sequence is a duplicate or arrived out of order: drop it.
            if entry is not None and entry.batches and header.base_sequence <= entry.batches[-1][1]:
                return entry.batches[-1][2]
            return None
        if entry is None or header.producer_epoch > entry.epoch or not entry.batches:
            if header.base_sequence != 0 and not (self.rebuilt and entry is None):
                # A new producer (or epoch) starts at 0; anything else arrived ahead of its
                # predecessors, or follows records this log no longer has: refuse, never guess.
                raise OutOfOrderSequenceError(
                    f"producer {header.producer_id} epoch {header.producer_epoch} is new on "
                    f"{self.topic}/{self.partition}: its first batch must have sequence 0, not {header.base_sequence}"
                )
            return None
        if header.producer_epoch < entry.epoch:
            raise ProducerFencedError(
                f"producer {header.producer_id} epoch {header.producer_epoch} on {self.topic}/{self.partition} "
                f"is older than its epoch {entry.epoch}: this batch was superseded"
            )
        for first, last, base_offset in entry.batches:
            if first == header.base_sequence and last == header.last_sequence:
                return base_offset
        expected = entry.batches[-1][1] + 1
        if header.base_sequence != expected:
            raise OutOfOrderSequenceError(
                f"producer {header.producer_id} sent sequence {header.base_sequence} on "
                f"{self.topic}/{self.partition}, expected {expected}"
            )
        return None

    def append(self, data: bytes, header: batch_format.BatchHeader, now_ms: int) -> tuple[int, bool]:
        """Append a verified batch; returns (base_offset, duplicate)."""
        duplicate_of = self.check_duplicate(header)
        if duplicate_of is not None:
            return duplicate_of, True
        base_offset = self.log.end_offset
        stamped = batch_format.stamp(data, base_offset, self.leader_epoch)
        stored = self.log.append(stamped, now_ms=now_ms)
        assert stored.base_offset == base_offset and self.log.end_offset == base_offset + header.record_count
        self._remember(header, base_offset)
        self._keep_recent(base_offset, stored.next_offset, stamped)
        return base_offset, False

    def append_replicated(self, data: bytes, header: batch_format.BatchHeader, now_ms: int) -> None:
        """Append a batch copied from the leader (already stamped with its offset and epoch; past the
        end only after records the leader's compaction removed, which the log checks)."""
        assert header.base_offset >= self.log.end_offset
        self.log.append(data, now_ms=now_ms)
        assert self.log.end_offset == header.next_offset
        self._remember(header, header.base_offset)
        self._keep_recent(header.base_offset, header.next_offset, data)

    def _keep_recent(self, base_offset: int, next_offset: int, data: bytes) -> None:
        recent = self._recent
        if recent and recent[-1][1] != base_offset:  # cannot happen: every append goes through here
            self._forget_recent()
        recent.append((base_offset, next_offset, data))
        self._recent_bytes += len(data)
        while len(recent) > 1 and (len(recent) > RECENT_BATCHES or self._recent_bytes > RECENT_BYTES):
            self._recent_bytes -= len(recent.popleft()[2])

    def _forget_recent(self) -> None:
        self._recent.clear()
        self._recent_bytes = 0

    def read_recent(self, offset: int, max_bytes: int) -> tuple[bytes, int, int] | None:
        """``(data, base_offset, next_offset)``: what ``log.read(offset, max_bytes)`` returns, with the
        first batch's base offset and the offset after the last, from memory; None when the batch
        holding ``offset`` is no longer (or not yet) among the newest batches kept in memory."""
        recent = self._recent
        if not recent or offset < recent[0][0] or offset >= recent[-1][1]:
            return None
        index = len(recent) - 1
        while recent[index][0] > offset:
            index -= 1
        base, next_offset, data = recent[index]
        if index == len(recent) - 1 or len(data) + len(recent[index + 1][2]) > max_bytes:
            return data, base, next_offset  # the common case: one batch (a read returns at least one)
        parts = [data]
        total = len(data)
        for _base, batch_next, batch in islice(recent, index + 1, None):
            if total + len(batch) > max_bytes:
                break
            parts.append(batch)
            total += len(batch)
            next_offset = batch_next
        return b"".join(parts), base, next_offset

    def compacted(self) -> None:
        """Compaction rewrote sealed segments: the newest batches kept in memory may be stale."""
        self._forget_recent()

    def restart_at(self, offset: int) -> None:
        """Drop the whole log and continue from ``offset``: what we miss was deleted by retention."""
        self.log.restart_at(offset)
        self._forget_recent()
        self.producers.clear()
        self.batch_epochs = []

    def truncate(self, offset: int) -> None:
        """Cut the log back to ``offset`` and forget the producer batches that went with it."""
        self.log.truncate_to(offset)
        self._forget_recent()
        assert self.log.end_offset == offset
        emptied = False
        for entry in self.producers.values():
            kept = [b for b in entry.batches if b[2] < offset]
            if len(kept) != len(entry.batches):
                entry.batches.clear()
                entry.batches.extend(kept)
                emptied = emptied or not kept
        if emptied:
            # A producer lost every remembered batch: older ones may still be in the log.
            self._rebuild_producers()
