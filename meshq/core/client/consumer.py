"""A stream consumer's positions, as pure state: what to fetch next, what was handed out.

Theory of operation
-------------------
A consumer keeps one fetch in flight per assigned partition (a long poll: the leader parks
it until data arrives or ``max_wait`` passes) and a buffer of decoded records. Two positions
are kept per partition:

* the *fetch position*: the next offset to ask for; it moves when a fetch returns records;
* the *position*: one past the last record handed to the caller (``take``); this is what a
  commit stores, so a member that dies redelivers what was fetched but not yet handed out
  (at-least-once).

``fetches_due`` names the fetches to send now (each partition not busy and not backing off)
as ``FetchSpec`` records carrying the partition's *generation*; ``prefetches_due`` the same for
partitions whose buffered records are down to half of their last fetch, asked while the caller
still hands records out (so a partition holds at most one and a half fetches of data); ``seek`` and ``reset`` bump
the generation, so a fetch already in flight is ignored when it returns. A retriable fetch
error backs the partition off for ``retry_s``; an offset out of range asks the caller to
reset the partition (to the earliest offset, which only the caller can look up).

A consumer-group member's partitions change at each rebalance: ``revoke`` drops a partition
(its positions, buffered records, and any fetch in flight: its generation moves on, so the
answer is ignored), ``assign`` adds one, to be started with ``start_at``.

The state takes ``now_s`` on every call and does no I/O, so the same code runs in
``meshq.Consumer`` (threads, futures, the wall clock) and in the simulator.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter

from meshq.core import batch as batch_format
from meshq.core.records import Record
from meshq.core.shared_state import record_deliver_at
from meshq.errors import CorruptLogError, MeshqError, OffsetOutOfRangeError, UsageError

FETCH_RETRY_S = 0.1  # a partition whose fetch failed (retriably) is asked again after this long
_HEADERS, _PARTITION, _OFFSET = attrgetter("headers"), attrgetter("partition"), attrgetter("offset")
_ONE_MORE = (1).__add__


@dataclass(frozen=True, slots=True)
class FetchSpec:
    """One fetch to send: ``partition`` from ``offset``, valid while its generation is current."""

    partition: int
    offset: int
    generation: int


class ConsumerState:
    """Positions, in-flight fetches and buffered records of one consumer (see the module docstring)."""

    def __init__(self, topic: str, partitions: list[int], retry_s: float = FETCH_RETRY_S) -> None:
        self.topic = topic
        self.partitions = sorted(partitions)
        self.retry_s = retry_s
        self.invalid_fetches = 0  # fetch answers whose batches did not decode (dropped, fetched again)
        self.positions: dict[int, int] = {}  # partition -> one past the last record handed out
        self.fetch_positions: dict[int, int] = {}  # partition -> the next offset to fetch
        self.committed: dict[int, int] = {}  # partition -> the offset this member last committed
        self._generation: dict[int, int] = {p: 0 for p in self.partitions}  # kept after a revoke: it only grows
        self._busy: set[int] = set()  # partitions with a fetch in flight
        self._retry_at_s: dict[int, float] = {}
        self.buffer: deque[Record] = deque()
        self.held: set[int] = set()  # partitions whose next record is delayed (``take``)
        self._last_fetched: dict[int, int] = {}  # partition -> offsets its last fetch with records spanned

    # ------------------------------------------------------------------ positions
    def start_at(self, partition: int, offset: int, committed: bool = False) -> None:
        """Begin ``partition`` at ``offset`` (``committed``: the group's stored offset)."""
        self._require(partition)
        self.positions[partition] = self.fetch_positions[partition] = offset
        if committed:
            self.committed[partition] = offset

    def seek(self, partition: int, offset: int) -> None:
        """Move ``partition`` to ``offset``: buffered records and fetches in flight of it are dropped."""
        self._require(partition)
        self._generation[partition] += 1
        self._busy.discard(partition)
        self.buffer = deque(r for r in self.buffer if r.partition != partition)
        self.positions[partition] = self.fetch_positions[partition] = offset

    def assign(self, partitions: list[int]) -> None:
        """Add ``partitions`` (a group gave them to this member); each is started with ``start_at``."""
        for partition in partitions:
            if partition not in self.partitions:
                self.partitions.append(partition)
                self._generation[partition] = self._generation.get(partition, 0) + 1
        self.partitions.sort()

    def revoke(self, partitions: list[int]) -> None:
        """Drop ``partitions``: their positions, buffered records and fetches in flight (ignored when
        they return). Commit first: what was handed out and not committed is read again by the
        partition's next owner."""
        gone = set(partitions) & set(self.partitions)
        if not gone:
            return
        self.partitions = [p for p in self.partitions if p not in gone]
        for partition in gone:
            self._generation[partition] += 1
            self._busy.discard(partition)
            self._retry_at_s.pop(partition, None)
            self.positions.pop(partition, None)
            self.fetch_positions.pop(partition, None)
            self.committed.pop(partition, None)
            self._last_fetched.pop(partition, None)
        self.buffer = deque(r for r in self.buffer if r.partition not in gone)

    def position(self, partition: int) -> int:
        self._require(partition)
        return self.positions[partition]

    # ------------------------------------------------------------------ fetching
    def fetches_due(self, now_s: float, prefetch: bool = False) -> list[FetchSpec]:
        """The fetches to send now, one per partition that is idle and not backing off; each is
        marked in flight until ``on_fetched`` or ``on_fetch_failed`` gets its answer. With
        ``prefetch`` (``prefetches_due``) only partitions whose buffered records are low."""
        due = []
        fetch_positions, positions, last = self.fetch_positions, self.positions, self._last_fetched
        for partition in self.partitions:
            if partition in self._busy or self._retry_at_s.get(partition, 0.0) > now_s or partition in self.held:
                continue
            if partition not in fetch_positions:
                continue  # not started yet
            if prefetch and 2 * (fetch_positions[partition] - positions[partition]) > last.get(partition, 0):
                continue  # more than half of its last fetch still buffered
            self._busy.add(partition)
            due.append(FetchSpec(partition, fetch_positions[partition], self._generation[partition]))
        return due

    def prefetches_due(self, now_s: float) -> list[FetchSpec]:
        """Like ``fetches_due``, but only for partitions whose buffered records (by offset) are down
        to half of what their last fetch brought or less: asked while the caller still has records
        to hand out, so the next ones are on their way meanwhile. A partition then holds at most
        one and a half fetches (buffered and in flight), as before at most one."""
        return self.fetches_due(now_s, prefetch=True)

    def current(self, spec: FetchSpec) -> bool:
        """Whether the answer to ``spec`` still counts (no seek, reset or revoke since it was sent)."""
        return spec.generation == self._generation.get(spec.partition) and spec.partition in self.fetch_positions

    def on_fetched(self, spec: FetchSpec, data: bytes) -> list[Record]:
        """A fetch returned ``data`` (raw batches): buffer its records; returns them (empty if stale)."""
        if not self.current(spec):
            return []
        self._busy.discard(spec.partition)
        if not data:
            return []
        try:
            records = batch_format.decode_records(data, self.topic, spec.partition, spec.offset)
        except CorruptLogError:
            # A node never serves a batch its own disk damaged (its reads check): bytes that fail
            # here were damaged on the way or sent by something that is not a meshq node. Drop
            # them and count them; the partition is fetched again from the same offset.
            self.invalid_fetches += 1
            return []
        if records:
            if records[0].offset < spec.offset:
                raise AssertionError("a fetch returned records before the requested offset")
            self.buffer.extend(records)
            self.fetch_positions[spec.partition] = records[-1].offset + 1
            self._last_fetched[spec.partition] = records[-1].offset + 1 - spec.offset
        elif self.fetch_positions[spec.partition] == spec.offset:
            # Only control batches (shared-subscription state): their offsets are gaps; read on past them.
            after = batch_format.next_offset_after(data)
            if after is not None and after > spec.offset:
                self.fetch_positions[spec.partition] = after
        return records

    def on_fetch_failed(self, spec: FetchSpec, error: MeshqError, now_s: float) -> bool:
        """A fetch failed. Returns True when the caller must ``reset`` the partition (its offset is
        out of range); a retriable error backs the partition off; any other error is raised."""
        if not self.current(spec):
            return False
        self._busy.discard(spec.partition)
        if isinstance(error, OffsetOutOfRangeError):
            return True
        if not error.retriable:
            raise error
        self._retry_at_s[spec.partition] = now_s + self.retry_s
        return False

    def reset(self, partition: int, offset: int) -> None:
        """Continue ``partition`` from ``offset`` after its position fell out of the log."""
        self._require(partition)
        self.positions[partition] = self.fetch_positions[partition] = offset

    def take(self, max_records: int, now_ms: int | None = None) -> list[Record]:
        """Hand out up to ``max_records`` buffered records; their positions move past them.

        With ``now_ms``, a record whose ``meshq-deliver-at`` header is still in the future holds
        back its partition (head of line: it and every later record of that partition wait, so
        the order per partition is kept); other partitions go on. ``held`` names the partitions
        held back, which ``fetches_due`` does not fetch further meanwhile.
        """
        buffer = self.buffer
        positions = self.positions
        held = self.held
        held.clear()
        count = min(max_records, len(buffer))
        if count and (now_ms is None or not any(map(_HEADERS, islice(buffer, count)))):
            # no record among the next ``count`` can be delayed (no headers): hand them out whole,
            # each partition's position set once per record at C speed (the later offset wins)
            if count == len(buffer):
                out = list(buffer)
                buffer.clear()
            else:
                popleft = buffer.popleft
                out = [popleft() for _ in range(count)]
            positions.update(zip(map(_PARTITION, out), map(_ONE_MORE, map(_OFFSET, out))))
            return out
        out = []
        kept = []
        while buffer and len(out) < max_records:
            record = buffer.popleft()
            if (held and record.partition in held) or (
                    record.headers and now_ms is not None and record_deliver_at(record.headers) > now_ms):
                held.add(record.partition)
                kept.append(record)
                continue
            out.append(record)
            positions[record.partition] = record.offset + 1
        if kept:
            buffer.extendleft(reversed(kept))
        return out

    def in_flight(self) -> int:
        return len(self._busy)

    # ------------------------------------------------------------------ commits
    def to_commit(self, offsets: dict[int, int] | None = None) -> dict[int, int]:
        """What a commit stores: ``offsets`` (default: the positions) that differ from the last
        commit of this member."""
        positions = offsets if offsets is not None else self.positions
        return {p: o for p, o in sorted(positions.items()) if self.committed.get(p) != o}

    def on_committed(self, offsets: dict[int, int]) -> None:
        self.committed.update({p: o for p, o in offsets.items() if p in self.positions})

    def _require(self, partition: int) -> None:
        if partition not in self.partitions:
            raise UsageError(f"partition {partition} is not assigned to this consumer ({self.partitions})")
