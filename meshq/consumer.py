"""The stream consumer: ordered reads per partition, optional group offsets.

Theory of operation
-------------------
This is the I/O shell around ``meshq.core.client.consumer.ConsumerState`` (positions,
fetches in flight, buffered records; the same state the simulator's consumer runs): it
sends the fetches the state names as commands to the node's runtime (long polls), waits on
their futures with the wall clock, and hands buffered records out in ``poll``. ``commit``
stores one past each record returned (at-least-once: a crash redelivers what was fetched
but not yet returned).
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import logging
import time
from concurrent.futures import Future
from typing import Any

from meshq.core.client.consumer import ConsumerState, FetchSpec
from meshq.core.client.requests import FetchResult
from meshq.core.events import CommitOffsets, Fetch, FetchCommitted, ListOffsets
from meshq.core.partitions.server import EARLIEST, LATEST
from meshq.core.records import Record
from meshq.errors import MeshqError, UsageError

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
        self._state = ConsumerState(topic, self.partitions)
        self._in_flight: dict[Future, FetchSpec] = {}
        self._last_commit_s = time.monotonic()
        self._initialize_positions(timeout)

    # ------------------------------------------------------------------ positions
    def _initialize_positions(self, timeout: float) -> None:
        committed: dict[tuple[str, int], int] = {}
        if self.group is not None:
            committed = self.node._call(FetchCommitted(self.group, self.topic), timeout)
        for partition in self.partitions:
            if (self.topic, partition) in committed:
                self._state.start_at(partition, committed[(self.topic, partition)], committed=True)
            else:
                self._state.start_at(partition, self._resolve_start(partition, self._start, timeout))

    def _resolve_start(self, partition: int, start: tuple[str, int], timeout: float) -> int:
        kind, value = start
        if kind == "offset":
            return value
        timestamp_ms = {"earliest": EARLIEST, "latest": LATEST}.get(kind, value)
        return self.node._call(ListOffsets(self.topic, partition, timestamp_ms), timeout)

    def seek(self, partition: int, offset: Any) -> None:
        """Move ``partition`` to ``offset`` (an int, 'earliest', 'latest', or a datetime)."""
        self._require_open()
        self._state.position(partition)  # UsageError when the partition is not assigned here
        self._state.seek(partition, self._resolve_start(partition, _parse_start(offset), 10.0))

    def position(self, partition: int) -> int:
        """The offset of the next record ``poll`` will return for ``partition``."""
        return self._state.position(partition)

    def assignment(self) -> list[int]:
        return list(self.partitions)

    # ------------------------------------------------------------------ poll
    def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Record]:
        """Return up to ``max_records`` records, waiting at most ``timeout`` seconds for the first."""
        self._require_open()
        deadline = time.monotonic() + timeout
        while True:
            if self._state.buffer:
                out = self._state.take(max_records, int(time.time() * 1000))
                if out:
                    self._maybe_auto_commit()
                    return out
                # only delayed records are buffered: wait (below) for other partitions or the time
            self._issue_fetches(max(0.0, deadline - time.monotonic()))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._maybe_auto_commit()
                return []
            waiting = list(self._in_flight)
            if not waiting:
                time.sleep(min(remaining, 0.05))
                continue
            if self._state.held:
                remaining = min(remaining, 0.05)  # a delayed record may fall due meanwhile
            done, _ = concurrent.futures.wait(waiting, timeout=remaining, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                self._on_fetched(future)

    def __iter__(self):
        while not self._closed:
            yield from self.poll()

    def _issue_fetches(self, wait_s: float) -> None:
        for spec in self._state.fetches_due(time.monotonic()):
            future: Future = Future()
            self._in_flight[future] = spec
            self.node.runtime.submit(Fetch(self.topic, spec.partition, spec.offset, self.max_bytes,
                                           min(max(wait_s, 0.0), 1.0), waiter=future))

    def _on_fetched(self, future: Future) -> None:
        spec = self._in_flight.pop(future)
        try:
            result: FetchResult = future.result()
        except MeshqError as exc:
            if self._state.on_fetch_failed(spec, exc, time.monotonic()):  # raises what is not retriable
                reset = self._resolve_start(spec.partition, ("earliest", 0), 10.0)
                log.warning("%s/%d: %s; resetting to the earliest offset %d", self.topic, spec.partition, exc, reset)
                self._state.reset(spec.partition, reset)
            else:
                log.debug("fetch %s/%d failed (%s); retrying", self.topic, spec.partition, exc)
            return
        self._state.on_fetched(spec, result.data)

    # ------------------------------------------------------------------ commit
    def commit(self, offsets: dict[int, int] | None = None, timeout: float = 10.0) -> None:
        """Store the group's position (default: one past each record returned by ``poll``)."""
        self._require_open()
        if self.group is None:
            raise UsageError("commit() needs a consumer group: node.consumer(topic, group='name')")
        changed = self._state.to_commit(offsets)
        if not changed:
            return
        self.node._call(CommitOffsets(self.group, {(self.topic, p): o for p, o in changed.items()}), timeout)
        self._state.on_committed(changed)
        self._last_commit_s = time.monotonic()

    def committed(self, timeout: float = 10.0) -> dict[int, int]:
        """The group's committed offsets for this topic."""
        if self.group is None:
            raise UsageError("committed() needs a consumer group")
        stored = self.node._call(FetchCommitted(self.group, self.topic), timeout)
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
