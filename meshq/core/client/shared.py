"""A shared-subscription member's bookkeeping, as pure state: what it holds, what it owes.

Theory of operation
-------------------
A member of a shared group keeps one ``share_fetch`` long poll in flight per partition of the
topic (every partition's leader may hand it any record) while fewer than ``prefetch`` records
wait in its buffer. Each record it receives is *held* until the caller answers it: ``ack``,
``nack`` (with a delay) or ``reject``. Answers are packed per partition (``>qBI``: offset,
kind, delay ms) and leave in batches (``take_answers``), one ``share_ack`` request per
partition, never one per record. Answering a record this member does not hold (never given
to it, or answered already) raises ``UsageError`` and changes nothing. ``release_all`` (on
close) nacks every record still held or buffered, so other members get them at once.

The state takes ``now_s`` where time matters and does no I/O, so the same code runs in
``meshq.SharedConsumer`` and in tests.
"""

from __future__ import annotations

import struct
from collections import deque

from meshq.core import batch as batch_format
from meshq.core.records import Record
from meshq.errors import CorruptLogError, MeshqError, UsageError

FETCH_RETRY_S = 0.1
ACK, NACK, REJECT = 0, 1, 2
_ANSWER = struct.Struct(">qBI")
_INDEX = struct.Struct(">qi")
MAX_DELAY_MS = (1 << 32) - 1


class SharedConsumerState:
    """One member's held records, buffer, fetches and unsent answers (see the module docstring)."""

    def __init__(self, topic: str, partitions: list[int], prefetch: int = 500, retry_s: float = FETCH_RETRY_S) -> None:
        self.topic = topic
        self.partitions = sorted(partitions)
        self.prefetch = prefetch
        self.retry_s = retry_s
        self.held: dict[tuple[int, int], int] = {}  # (partition, offset) -> delivery count
        self.buffer: deque[Record] = deque()
        self._busy: set[int] = set()
        self._retry_at_s: dict[int, float] = {}
        self._answers: dict[int, list[bytes]] = {}
        self.unsent = 0
        self.stats = {"received": 0, "acked": 0, "nacked": 0, "rejected": 0, "stale": 0}

    # ------------------------------------------------------------------ fetching
    def fetches_due(self, now_s: float) -> list[tuple[int, int]]:
        """``(partition, max_records)`` of the fetches to send now; each is in flight until answered."""
        room = self.prefetch - len(self.buffer)
        if room <= 0:
            return []
        due = []
        for partition in self.partitions:
            if partition in self._busy or self._retry_at_s.get(partition, 0.0) > now_s:
                continue
            self._busy.add(partition)
            due.append((partition, max(1, room // len(self.partitions))))
        return due

    def on_fetched(self, partition: int, index: bytes, data: bytes) -> list[Record]:
        """A fetch of ``partition`` returned: buffer its records (now held by this member)."""
        self._busy.discard(partition)
        if not index:
            return []
        try:
            entries = list(_INDEX.iter_unpack(index))
            decoded = batch_format.decode_records(data, self.topic, partition)
        except (struct.error, CorruptLogError):
            decoded, entries = [], [None]
        if len(decoded) != len(entries):
            # Damaged on the way or not from a meshq node (a leader's own reads check its disk):
            # dropped and counted. The leader delivers these records again when their lease ends.
            self.stats["invalid_fetches"] = self.stats.get("invalid_fetches", 0) + 1
            return []
        records = []
        for (offset, count), record in zip(entries, decoded):
            records.append(Record(self.topic, partition, offset, record.key, record.value, record.headers,
                                  record.timestamp_ms))
            self.held[(partition, offset)] = count
        self.buffer.extend(records)
        self.stats["received"] += len(records)
        return records

    def on_fetch_failed(self, partition: int, error: MeshqError, now_s: float) -> None:
        """A fetch failed: retriable errors back the partition off; others are raised."""
        self._busy.discard(partition)
        if not error.retriable:
            raise error
        self._retry_at_s[partition] = now_s + self.retry_s

    def take(self, max_records: int) -> list[Record]:
        out = []
        buffer = self.buffer
        while buffer and len(out) < max_records:
            out.append(buffer.popleft())
        return out

    # ------------------------------------------------------------------ answers
    def answer(self, record: Record, kind: int, delay_ms: int = 0) -> None:
        """Queue the answer for a held record; ``UsageError`` (nothing changes) when it is not held."""
        if not isinstance(record, Record):
            raise UsageError(f"ack/nack take a Record returned by poll(), not {type(record).__name__}")
        if record.topic != self.topic or self.held.pop((record.partition, record.offset), None) is None:
            raise UsageError(
                f"record {record.topic}/{record.partition}@{record.offset} is not held by this consumer: it was "
                f"acked or nacked already, or was handed to another consumer; answer each record once")
        if not 0 <= delay_ms <= MAX_DELAY_MS:
            raise UsageError(f"nack delay must be between 0 and {MAX_DELAY_MS / 1000:.0f} seconds")
        self._answers.setdefault(record.partition, []).append(_ANSWER.pack(record.offset, kind, delay_ms))
        self.unsent += 1
        self.stats[("acked", "nacked", "rejected")[kind]] += 1

    def take_answers(self) -> dict[int, tuple[bytes, int]]:
        """The queued answers per partition as ``(packed, count)``, emptied."""
        answers, self._answers = self._answers, {}
        self.unsent = 0
        return {p: (b"".join(parts), len(parts)) for p, parts in sorted(answers.items())}

    def release_all(self) -> int:
        """Nack every record still held (buffered or handed out): others get them at once."""
        self.buffer.clear()
        released = 0
        for (partition, offset) in sorted(self.held):
            self._answers.setdefault(partition, []).append(_ANSWER.pack(offset, NACK, 0))
            released += 1
        self.held.clear()
        self.unsent += released
        return released

    def delivery_count(self, record: Record) -> int:
        return self.held.get((record.partition, record.offset), 0)
