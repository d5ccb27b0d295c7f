"""The stream consumer: ordered reads per partition, optional group offsets.

Theory of operation
-------------------
This is the I/O shell around ``meshq.core.client.consumer.ConsumerState`` (positions,
fetches in flight, buffered records; the same state the simulator's consumer runs): it
sends the fetches the state names as commands to the node's runtime (long polls), waits on
their futures with the wall clock, and hands buffered records out in ``poll``. ``commit``
stores one past each record returned (at-least-once: a crash redelivers what was fetched
but not yet returned).

With ``group`` (and no explicit ``partitions``) the consumer is a member of the group: the
node's core joins and heartbeats for it (``meshq.core.client.group_client``), so user code
may take its time between polls without losing the session. Each ``poll`` first applies
what the member learned: a new assignment (its partitions start at the group's committed
offsets), or a rebalance — then it commits its positions (with auto-commit), drops every
partition and buffered record, and lets the member rejoin. A consumer that does not poll
within the session timeout (``failure_timeout_s`` + 1 s) of a rebalance is removed from the
group and its partitions go to the others. ``close`` commits and leaves, so the others
rebalance at once.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import logging
import time
from concurrent.futures import Future
from typing import Any

from meshq.core.client.consumer import ConsumerState, FetchSpec
from meshq.core.client.group_member import GroupView
from meshq.core.client.requests import FetchResult
from meshq.core.events import (
    CommitOffsets,
    Fetch,
    FetchCommitted,
    JoinGroup,
    LeaveGroup,
    ListOffsets,
    ReleaseGroup,
    WatchGroup,
)
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
        self._in_flight: dict[Future, FetchSpec] = {}
        self._last_commit_s = time.monotonic()
        self._member: str | None = None  # the group member's id (a group without explicit partitions)
        self._generation = -1  # the group generation the held partitions belong to
        self._assigned_version = -1  # the member's view version of the assignment held
        self._watch: Future | None = None  # resolves when the member's view changes
        self._unstarted: list[int] = []  # assigned partitions whose start offset is still to be looked up
        if group is not None and partitions is None:
            self._state = ConsumerState(topic, [])
            self._member = node._call(JoinGroup(group, topic, config.partitions), timeout)
            self._watch_member(0)
            return
        self._state = ConsumerState(topic, sorted(partitions) if partitions is not None
                                    else list(range(config.partitions)))
        self._initialize_positions(timeout)

    @property
    def member_id(self) -> str | None:
        """This consumer's id in its group (None without group membership)."""
        return self._member

    @property
    def partitions(self) -> list[int]:
        """The partitions this consumer holds now (see ``assignment``)."""
        return list(self._state.partitions)

    # ------------------------------------------------------------------ group membership
    def _watch_member(self, version: int) -> None:
        self._watch = Future()
        self.node.runtime.submit(WatchGroup(self._member, version, waiter=self._watch))

    def _apply_group(self) -> None:
        """Act on what the member learned since the last poll: take a new assignment, or let go."""
        if self._watch is not None and self._watch.done():
            try:
                view: GroupView = self._watch.result()
            except MeshqError as exc:
                self._watch = None
                raise UsageError(f"consumer of group {self.group!r} cannot go on: {exc}") from exc
            if view.state in ("revoking", "left"):
                self._let_go(view.generation)
            elif view.state == "assigned" and view.version != self._assigned_version:
                self._assigned_version = view.version  # each new "assigned" version is a new assignment
                self._let_go(None)  # holds nothing by now (it released to rejoin); to be sure
                self._generation = view.generation
                self._state.assign(list(view.partitions))
                self._unstarted = list(view.partitions)
                self._last_commit_s = time.monotonic()
                log.info("group %s: %s holds %s/%s in generation %d", self.group, self._member, self.topic,
                         list(view.partitions), view.generation)
            self._watch = None
            if view.state != "left":
                self._watch_member(view.version)
        if self._unstarted:
            self._start_assigned()

    def _start_assigned(self) -> None:
        """Start newly assigned partitions at the group's committed offsets (else ``start``); on a
        retriable failure (the coordinator moving) try again at the next poll."""
        try:
            committed = self.node._call(FetchCommitted(self.group, self.topic), 5.0)
            for partition in list(self._unstarted):
                if (self.topic, partition) in committed:
                    self._state.start_at(partition, committed[(self.topic, partition)], committed=True)
                else:
                    self._state.start_at(partition, self._resolve_start(partition, self._start, 5.0))
                self._unstarted.remove(partition)
        except MeshqError as exc:
            if not exc.retriable:
                raise
            log.debug("group %s: start of %s delayed: %s", self.group, self._unstarted, exc)

    def _let_go(self, generation: int | None) -> None:
        """A rebalance: commit (with auto-commit), drop every partition, let the member rejoin."""
        if self._state.partitions and self.auto_commit:
            try:
                self.commit(timeout=5.0)
            except MeshqError as exc:
                log.warning("group %s: commit before the rebalance failed (%s); records since the last "
                            "commit will be read again", self.group, exc)
        self._state.revoke(list(self._state.partitions))
        self._unstarted = []
        if generation is not None:
            self.node.runtime.submit(ReleaseGroup(self._member, generation))

    # ------------------------------------------------------------------ positions
    def _initialize_positions(self, timeout: float) -> None:
        committed: dict[tuple[str, int], int] = {}
        if self.group is not None:
            committed = self.node._call(FetchCommitted(self.group, self.topic), timeout)
        for partition in self._state.partitions:
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
        """The partitions this consumer reads now (a group member's change at each rebalance)."""
        if self._member is not None and not self._closed:
            self._apply_group()
        return list(self._state.partitions)

    # ------------------------------------------------------------------ poll
    def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Record]:
        """Return up to ``max_records`` records, waiting at most ``timeout`` seconds for the first."""
        self._require_open()
        deadline = time.monotonic() + timeout
        while True:
            if self._member is not None:
                self._apply_group()
            if self._state.buffer:
                out = self._state.take(max_records, int(time.time() * 1000))
                if out:
                    self._maybe_auto_commit()
                    if self.node._latency is not None:  # (once per poll, not per record)
                        self.node._latency.observe_consume(out)
                    return out
                # only delayed records are buffered: wait (below) for other partitions or the time
            self._issue_fetches(max(0.0, deadline - time.monotonic()))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._maybe_auto_commit()
                return []
            waiting = list(self._in_flight)
            if self._watch is not None:
                waiting.append(self._watch)
            if not waiting:
                time.sleep(min(remaining, 0.05))
                continue
            if self._state.held:
                remaining = min(remaining, 0.05)  # a delayed record may fall due meanwhile
            done, _ = concurrent.futures.wait(waiting, timeout=remaining, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                if future is not self._watch:
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
        # A member's commit names its generation: refused (RebalanceError) once the partitions moved on.
        self.node._call(CommitOffsets(self.group, {(self.topic, p): o for p, o in changed.items()},
                                      member=self._member, generation=self._generation), timeout)
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
        """Commit (with auto-commit), leave the group (the others rebalance at once) and stop. Idempotent."""
        if self._closed:
            return
        try:
            if self.auto_commit and self._state.partitions:
                self.commit()
        finally:
            self._closed = True
            self._in_flight.clear()
            if self._member is not None:
                self._state.revoke(list(self._state.partitions))
                try:
                    self.node._call(LeaveGroup(self._member), 5.0)
                except MeshqError as exc:
                    log.warning("group %s: leave of %s not confirmed (%s); the coordinator evicts it when its "
                                "session ends", self.group, self._member, exc)

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
