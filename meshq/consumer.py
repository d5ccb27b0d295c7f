"""The stream consumer: ordered reads per partition, optional group offsets.

Theory of operation
-------------------
The consumer keeps one fetch in flight per assigned partition (a long poll: the leader
parks it until data arrives or ``max_wait`` passes) and a buffer of decoded records.
``poll`` returns buffered records first, else waits for the first fetch to come back.
Two positions are kept per partition: ``_fetch_position`` (next offset to ask for) and
``_positions`` (one past the last record handed to the caller) — the latter is what
``commit`` stores, so a crash redelivers what was fetched but not yet returned
(at-least-once). ``seek`` bumps a generation counter so fetches already in flight are
ignored when they return.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import logging
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

from meshq.core import batch as batch_format
from meshq.core.client.requests import FetchResult
from meshq.core.events import Command
from meshq.core.partitions.server import EARLIEST, LATEST
from meshq.core.records import Record
from meshq.errors import MeshqError, OffsetOutOfRangeError, UsageError

log = logging.getLogger("meshq.consumer")


class Consumer:
    """Reads a topic in order per partition. Create with ``node.consumer(...)``."""

    def __init__(self, node: Any, topic: str, group: str | None = None, start: Any = "earliest",
                 auto_commit: bool = True, auto_commit_interval_s: float = 5.0, max_bytes: int = 4 * 1024 * 1024,
                 partitions: list[int] | None = None, timeout: float = 10.0) -> None:
        self.node = node
        self.topic = topic
        self.group = group
        self.auto_commit = auto_commit and group is not None
        self.auto_commit_interval_s = auto_commit_interval_s
        self.max_bytes = max_bytes
        self._start = _parse_start(start)
        self._closed = False
        config = node.topic(topic, timeout=timeout, create=True)
        self.partitions = sorted(partitions) if partitions is not None else list(range(config.partitions))
        self._positions: dict[int, int] = {}
        self._fetch_position: dict[int, int] = {}
        self._generation: dict[int, int] = {p: 0 for p in self.partitions}
        self._in_flight: dict[Future, tuple[int, int]] = {}
        self._partition_busy: set[int] = set()
        self._buffer: deque[Record] = deque()
        self._retry_at: dict[int, float] = {}
        self._last_commit_s = time.monotonic()
        self._committed: dict[int, int] = {}
        self._initialize_positions(timeout)

    # ------------------------------------------------------------------ positions
    def _initialize_positions(self, timeout: float) -> None:
        committed: dict[tuple[str, int], int] = {}
        if self.group is not None:
            committed = self.node._call("committed", {"group": self.group, "topic": self.topic}, timeout)
        for partition in self.partitions:
            if (self.topic, partition) in committed:
                offset = committed[(self.topic, partition)]
                self._committed[partition] = offset
            else:
                offset = self._resolve_start(partition, self._start, timeout)
            self._positions[partition] = offset
            self._fetch_position[partition] = offset

    def _resolve_start(self, partition: int, start: tuple[str, int], timeout: float) -> int:
        kind, value = start
        if kind == "offset":
            return value
        timestamp_ms = {"earliest": EARLIEST, "latest": LATEST}.get(kind, value)
        return self.node._call("list_offsets", {"topic": self.topic, "partition": partition,
                                                "timestamp_ms": timestamp_ms}, timeout)

    def seek(self, partition: int, offset: Any) -> None:
        """Move ``partition`` to ``offset`` (an int, 'earliest', 'latest', or a datetime)."""
        self._require_open()
        if partition not in self._positions:
            raise UsageError(f"partition {partition} is not assigned to this consumer ({self.partitions})")
        resolved = self._resolve_start(partition, _parse_start(offset), 10.0)
        self._generation[partition] += 1
        self._partition_busy.discard(partition)
        self._buffer = deque(r for r in self._buffer if r.partition != partition)
        self._positions[partition] = resolved
        self._fetch_position[partition] = resolved

    def position(self, partition: int) -> int:
        """The offset of the next record ``poll`` will return for ``partition``."""
        return self._positions[partition]

    def assignment(self) -> list[int]:
        return list(self.partitions)

    # ------------------------------------------------------------------ poll
    def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Record]:
        """Return up to ``max_records`` records, waiting at most ``timeout`` seconds for the first."""
        self._require_open()
        deadline = time.monotonic() + timeout
        while True:
            if self._buffer:
                out = self._take(max_records)
                self._maybe_auto_commit()
                return out
            self._issue_fetches(max(0.0, deadline - time.monotonic()))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._maybe_auto_commit()
                return []
            waiting = list(self._in_flight)
            if not waiting:
                time.sleep(min(remaining, 0.05))
                continue
            done, _ = concurrent.futures.wait(waiting, timeout=remaining, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                self._on_fetched(future)

    def __iter__(self):
        while not self._closed:
            yield from self.poll()

    def _take(self, max_records: int) -> list[Record]:
        out = []
        buffer = self._buffer
        while buffer and len(out) < max_records:
            record = buffer.popleft()
            out.append(record)
            self._positions[record.partition] = record.offset + 1
        return out

    def _issue_fetches(self, wait_s: float) -> None:
        now = time.monotonic()
        for partition in self.partitions:
            if partition in self._partition_busy or self._retry_at.get(partition, 0.0) > now:
                continue
            future: Future = Future()
            self._partition_busy.add(partition)
            self._in_flight[future] = (partition, self._generation[partition])
            self.node.runtime.submit(Command("fetch", {
                "topic": self.topic, "partition": partition, "offset": self._fetch_position[partition],
                "max_bytes": self.max_bytes, "max_wait_s": min(max(wait_s, 0.0), 1.0),
            }, future))

    def _on_fetched(self, future: Future) -> None:
        partition, generation = self._in_flight.pop(future)
        if generation != self._generation[partition]:
            return  # a seek happened while this fetch was in flight
        self._partition_busy.discard(partition)
        try:
            result: FetchResult = future.result()
        except OffsetOutOfRangeError as exc:
            reset = self._resolve_start(partition, ("earliest", 0), 10.0)
            log.warning("%s/%d: %s; resetting to the earliest offset %d", self.topic, partition, exc, reset)
            self._fetch_position[partition] = self._positions[partition] = reset
            return
        except MeshqError as exc:
            if not exc.retriable:
                raise
            log.debug("fetch %s/%d failed (%s); retrying", self.topic, partition, exc)
            self._retry_at[partition] = time.monotonic() + 0.1
            return
        if not result.data:
            return
        position = self._fetch_position[partition]
        records = batch_format.decode_records(result.data, self.topic, partition, position)
        if records:
            assert records[0].offset >= position, "a fetch returned records before the requested offset"
            self._buffer.extend(records)
            self._fetch_position[partition] = records[-1].offset + 1

    # ------------------------------------------------------------------ commit
    def commit(self, offsets: dict[int, int] | None = None, timeout: float = 10.0) -> None:
        """Store the group's position (default: one past each record returned by ``poll``)."""
        self._require_open()
        if self.group is None:
            raise UsageError("commit() needs a consumer group: node.consumer(topic, group='name')")
        positions = offsets if offsets is not None else dict(self._positions)
        changed = {(self.topic, p): o for p, o in positions.items() if self._committed.get(p) != o}
        if not changed:
            return
        self.node._call("commit", {"group": self.group, "offsets": changed}, timeout)
        for (_topic, partition), offset in changed.items():
            self._committed[partition] = offset
        self._last_commit_s = time.monotonic()

    def committed(self, timeout: float = 10.0) -> dict[int, int]:
        """The group's committed offsets for this topic."""
        if self.group is None:
            raise UsageError("committed() needs a consumer group")
        stored = self.node._call("committed", {"group": self.group, "topic": self.topic}, timeout)
        return {p: o for (_t, p), o in stored.items()}

    def _maybe_auto_commit(self) -> None:
        if self.auto_commit and time.monotonic() - self._last_commit_s >= self.auto_commit_interval_s:
            try:
                self.commit()
            except MeshqError as exc:
                log.warning("auto-commit of group %s failed: %s", self.group, exc)

    def close(self) -> None:
        """Commit (with auto-commit) and stop. Idempotent."""
        if self._closed:
            return
        try:
            if self.auto_commit:
                self.commit()
        finally:
            self._closed = True
            self._in_flight.clear()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._closed:
            raise UsageError("this consumer is closed")


def _parse_start(start: Any) -> tuple[str, int]:
    if start in ("earliest", "latest"):
        return (start, 0)
    if isinstance(start, bool):
        raise UsageError(f"start must be 'earliest', 'latest', an offset or a datetime, not {start!r}")
    if isinstance(start, int):
        if start < 0:
            raise UsageError(f"start offset must be >= 0, not {start}")
        return ("offset", start)
    if isinstance(start, _dt.datetime):
        return ("timestamp", int(start.timestamp() * 1000))
    if isinstance(start, str) and start.startswith("timestamp:") and start[10:].isdigit():
        return ("timestamp", int(start[10:]))
    raise UsageError(
        f"start must be 'earliest', 'latest', an offset, a datetime or 'timestamp:<ms>', not {start!r}"
    )
