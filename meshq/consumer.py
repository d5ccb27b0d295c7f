"""The stream consumer: ordered reads per partition, optional group offsets.

Theory of operation
-------------------
This is the I/O shell around ``meshq.core.client.consumer.ConsumerState`` (positions,
fetches in flight, buffered records; the same state the simulator's consumer runs): it
sends the fetches the state names as commands to the node's runtime (long polls), waits on
their futures with the wall clock, and hands buffered records out in ``poll`` (sending, as it
does, the next fetch of each partition whose buffer is down to half of its last fetch, so the
records after these are on their way while the caller works; a fetch is decoded with the cyclic
garbage collector paused, ``_without_cyclic_gc``). That control
flow is ``ConsumerFlow``, written once as generators of I/O steps: ``Consumer`` carries the
steps out blocking, ``meshq.aio.Consumer`` awaiting them on the event loop. ``commit``
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
import gc
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
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
from meshq.io.steps import Steps, drive

log = logging.getLogger("meshq.consumer")


@dataclass(slots=True)
class Call:
    """A step: hand ``command`` to the core and wait (``timeout_s``) for its result."""

    command: Any
    timeout_s: float


@dataclass(slots=True)
class Submit:
    """A step: hand ``command`` to the core; the outcome is a Future of the driver's kind."""

    command: Any


@dataclass(slots=True)
class Wait:
    """A step: wait up to ``timeout_s`` for the first of ``futures`` (none: just sleep); the
    outcome is the set of those done."""

    futures: list
    timeout_s: float


class ConsumerFlow:
    """What a stream consumer does, written once as generators of ``Call``/``Submit``/``Wait``
    steps (``meshq.io.steps``): ``Consumer`` carries them out blocking, ``meshq.aio.Consumer``
    on the event loop."""

    def __init__(self, node: Any, topic: str, group: str | None, start: Any, auto_commit: bool,
                 auto_commit_interval_s: float, max_bytes: int) -> None:
        self.node = node
        self.topic = topic
        self.group = group
        self.auto_commit = auto_commit and group is not None
        self.auto_commit_interval_s = auto_commit_interval_s
        self.max_bytes = max_bytes
        self._start = _parse_start(start)
        self._closed = False
        self._in_flight: dict[Any, FetchSpec] = {}  # fetch Future -> what it asked
        self._last_commit_s = time.monotonic()
        self._member: str | None = None  # the group member's id (a group without explicit partitions)
        self._generation = -1  # the group generation the held partitions belong to
        self._assigned_version = -1  # the member's view version of the assignment held
        self._watch: Any = None  # a Future that resolves when the member's view changes
        self._unstarted: list[int] = []  # assigned partitions whose start offset is still to be looked up
        self._state = ConsumerState(topic, [])

    @property
    def member_id(self) -> str | None:
        """This consumer's id in its group (None without group membership)."""
        return self._member

    @property
    def partitions(self) -> list[int]:
        """The partitions this consumer holds now (see ``assignment``)."""
        return list(self._state.partitions)

    def position(self, partition: int) -> int:
        """The offset of the next record ``poll`` will return for ``partition``."""
        return self._state.position(partition)

    def _open_steps(self, partition_count: int, partitions: list[int] | None, timeout: float) -> Steps:
        if self.group is not None and partitions is None:
            self._member = yield Call(JoinGroup(self.group, self.topic, partition_count), timeout)
            yield from self._watch_member_steps(0)
            return
        self._state = ConsumerState(self.topic, sorted(partitions) if partitions is not None
                                    else list(range(partition_count)))
        committed: dict[tuple[str, int], int] = {}
        if self.group is not None:
            committed = yield Call(FetchCommitted(self.group, self.topic), timeout)
        for partition in self._state.partitions:
            if (self.topic, partition) in committed:
                self._state.start_at(partition, committed[(self.topic, partition)], committed=True)
            else:
                self._state.start_at(partition, (yield from self._resolve_start_steps(partition, self._start, timeout)))

    # ------------------------------------------------------------------ group membership
    def _watch_member_steps(self, version: int) -> Steps:
        self._watch = yield Submit(WatchGroup(self._member, version))

    def _apply_group_steps(self) -> Steps:
        """Act on what the member learned since the last poll: take a new assignment, or let go."""
        if self._watch is not None and self._watch.done():
            try:
                view: GroupView = self._watch.result()
            except MeshqError as exc:
                self._watch = None
                raise UsageError(f"consumer of group {self.group!r} cannot go on: {exc}") from exc
            if view.state == "refused":  # this key may not consume the topic: nothing is held, say why
                self._watch = None
                self._state.revoke(list(self._state.partitions))  # (a commit would be refused too)
                self._unstarted = []
                assert view.error is not None
                raise view.error
            if view.state in ("revoking", "left"):
                yield from self._let_go_steps(view.generation)
            elif view.state == "assigned" and view.version != self._assigned_version:
                self._assigned_version = view.version  # each new "assigned" version is a new assignment
                yield from self._let_go_steps(None)  # holds nothing by now (it released to rejoin); to be sure
                self._generation = view.generation
                self._state.assign(list(view.partitions))
                self._unstarted = list(view.partitions)
                self._last_commit_s = time.monotonic()
                log.info("group %s: %s holds %s/%s in generation %d", self.group, self._member, self.topic,
                         list(view.partitions), view.generation)
            self._watch = None
            if view.state != "left":
                yield from self._watch_member_steps(view.version)
        if self._unstarted:
            yield from self._start_assigned_steps()

    def _start_assigned_steps(self) -> Steps:
        """Start newly assigned partitions at the group's committed offsets (else ``start``); on a
        retriable failure (the coordinator moving) try again at the next poll."""
        try:
            committed = yield Call(FetchCommitted(self.group, self.topic), 5.0)
            for partition in list(self._unstarted):
                if (self.topic, partition) in committed:
                    self._state.start_at(partition, committed[(self.topic, partition)], committed=True)
                else:
                    self._state.start_at(partition, (yield from self._resolve_start_steps(partition, self._start, 5.0)))
                self._unstarted.remove(partition)
        except MeshqError as exc:
            if not exc.retriable:
                raise
            log.debug("group %s: start of %s delayed: %s", self.group, self._unstarted, exc)

    def _let_go_steps(self, generation: int | None) -> Steps:
        """A rebalance: commit (with auto-commit), drop every partition, let the member rejoin."""
        if self._state.partitions and self.auto_commit:
            try:
                yield from self._commit_steps(None, 5.0)
            except MeshqError as exc:
                log.warning("group %s: commit before the rebalance failed (%s); records since the last "
                            "commit will be read again", self.group, exc)
        self._state.revoke(list(self._state.partitions))
        self._unstarted = []
        if generation is not None:
            yield Submit(ReleaseGroup(self._member, generation))

    # ------------------------------------------------------------------ positions
    def _resolve_start_steps(self, partition: int, start: tuple[str, int], timeout: float) -> Steps:
        kind, value = start
        if kind == "offset":
            return value
        timestamp_ms = {"earliest": EARLIEST, "latest": LATEST}.get(kind, value)
        return (yield Call(ListOffsets(self.topic, partition, timestamp_ms), timeout))

    def _seek_steps(self, partition: int, offset: Any) -> Steps:
        self._require_open()
        self._state.position(partition)  # UsageError when the partition is not assigned here
        self._state.seek(partition, (yield from self._resolve_start_steps(partition, _parse_start(offset), 10.0)))

    # ------------------------------------------------------------------ poll
    def _poll_steps(self, timeout: float, max_records: int) -> Steps:
        self._require_open()
        deadline = time.monotonic() + timeout
        while True:
            if self._member is not None:
                yield from self._apply_group_steps()
            if self._state.buffer:
                out = self._state.take(max_records, int(time.time() * 1000))
                # the next records of partitions running low are fetched while these are handed out
                for spec in self._state.prefetches_due(time.monotonic()):
                    future = yield Submit(Fetch(self.topic, spec.partition, spec.offset, self.max_bytes,
                                                min(max(deadline - time.monotonic(), 0.0), 1.0)))
                    self._in_flight[future] = spec
                if out:
                    yield from self._maybe_auto_commit_steps()
                    if self.node._latency is not None:  # (once per poll, not per record)
                        self.node._latency.observe_consume(out)
                    return out
                # only delayed records are buffered: wait (below) for other partitions or the time
            wait_s = min(max(deadline - time.monotonic(), 0.0), 1.0)
            for spec in self._state.fetches_due(time.monotonic()):
                future = yield Submit(Fetch(self.topic, spec.partition, spec.offset, self.max_bytes, wait_s))
                self._in_flight[future] = spec
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                yield from self._maybe_auto_commit_steps()
                return []
            waiting = list(self._in_flight)
            if self._watch is not None:
                waiting.append(self._watch)
            if not waiting:
                yield Wait([], min(remaining, 0.05))
                continue
            if self._state.held:
                remaining = min(remaining, 0.05)  # a delayed record may fall due meanwhile
            done = yield Wait(waiting, remaining)
            for future in done:
                if future is not self._watch:
                    yield from self._on_fetched_steps(future)

    def _on_fetched_steps(self, future: Any) -> Steps:
        spec = self._in_flight.pop(future)
        try:
            result: FetchResult = future.result()
        except MeshqError as exc:
            if self._state.on_fetch_failed(spec, exc, time.monotonic()):  # raises what is not retriable
                reset = yield from self._resolve_start_steps(spec.partition, ("earliest", 0), 10.0)
                log.warning("%s/%d: %s; resetting to the earliest offset %d", self.topic, spec.partition, exc, reset)
                self._state.reset(spec.partition, reset)
            else:
                log.debug("fetch %s/%d failed (%s); retrying", self.topic, spec.partition, exc)
            return
        _without_cyclic_gc(self._state.on_fetched, spec, result.data)

    # ------------------------------------------------------------------ commit
    def _commit_steps(self, offsets: dict[int, int] | None, timeout: float) -> Steps:
        self._require_open()
        if self.group is None:
            raise UsageError("commit() needs a consumer group: node.consumer(topic, group='name')")
        changed = self._state.to_commit(offsets)
        if not changed:
            return
        # A member's commit names its generation: refused (RebalanceError) once the partitions moved on.
        yield Call(CommitOffsets(self.group, {(self.topic, p): o for p, o in changed.items()},
                                 member=self._member, generation=self._generation), timeout)
        self._state.on_committed(changed)
        self._last_commit_s = time.monotonic()

    def _committed_steps(self, timeout: float) -> Steps:
        if self.group is None:
            raise UsageError("committed() needs a consumer group")
        stored = yield Call(FetchCommitted(self.group, self.topic), timeout)
        return {p: o for (_t, p), o in stored.items()}

    def _maybe_auto_commit_steps(self) -> Steps:
        if self.auto_commit and time.monotonic() - self._last_commit_s >= self.auto_commit_interval_s:
            try:
                yield from self._commit_steps(None, 10.0)
            except MeshqError as exc:
                log.warning("auto-commit of group %s failed: %s", self.group, exc)

    def _close_steps(self) -> Steps:
        if self._closed:
            return
        try:
            if self.auto_commit and self._state.partitions:
                yield from self._commit_steps(None, 10.0)
        finally:
            self._closed = True
            for future in self._in_flight:
                future.cancel()
            self._in_flight.clear()
            if self._watch is not None:
                self._watch.cancel()
            if self._member is not None:
                self._state.revoke(list(self._state.partitions))
                try:
                    yield Call(LeaveGroup(self._member), 5.0)
                except MeshqError as exc:
                    log.warning("group %s: leave of %s not confirmed (%s); the coordinator evicts it when its "
                                "session ends", self.group, self._member, exc)

    def _require_open(self) -> None:
        if self._closed:
            raise UsageError("this consumer is closed")


class Consumer(ConsumerFlow):
    """Reads a topic in order per partition. Create with ``node.consumer(...)``."""

    def __init__(self, node: Any, topic: str, group: str | None = None, start: Any = "earliest",
                 auto_commit: bool = True, auto_commit_interval_s: float = 5.0, max_bytes: int = 4 * 1024 * 1024,
                 partitions: list[int] | None = None, timeout: float = 10.0) -> None:
        super().__init__(node, topic, group, start, auto_commit, auto_commit_interval_s, max_bytes)
        config = node.topic(topic, timeout=timeout, create=True)
        self._run(self._open_steps(config.partitions, partitions, timeout))

    def _run(self, steps: Steps) -> Any:
        return drive(steps, self._do)

    def _do(self, step: Any) -> Any:
        if type(step) is Wait:
            if not step.futures:
                time.sleep(step.timeout_s)
                return set()
            return concurrent.futures.wait(step.futures, timeout=step.timeout_s,
                                           return_when=concurrent.futures.FIRST_COMPLETED)[0]
        if type(step) is Submit:
            future: Future = Future()
            step.command.waiter = future
            self.node.runtime.submit(step.command)
            return future
        return self.node._call(step.command, step.timeout_s)

    def seek(self, partition: int, offset: Any) -> None:
        """Move ``partition`` to ``offset`` (an int, 'earliest', 'latest', or a datetime)."""
        self._run(self._seek_steps(partition, offset))

    def assignment(self) -> list[int]:
        """The partitions this consumer reads now (a group member's change at each rebalance)."""
        if self._member is not None and not self._closed:
            self._run(self._apply_group_steps())
        return list(self._state.partitions)

    def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Record]:
        """Return up to ``max_records`` records, waiting at most ``timeout`` seconds for the first."""
        return self._run(self._poll_steps(timeout, max_records))

    def __iter__(self):
        while not self._closed:
            yield from self.poll()

    def commit(self, offsets: dict[int, int] | None = None, timeout: float = 10.0) -> None:
        """Store the group's position (default: one past each record returned by ``poll``)."""
        self._run(self._commit_steps(offsets, timeout))

    def committed(self, timeout: float = 10.0) -> dict[int, int]:
        """The group's committed offsets for this topic."""
        return self._run(self._committed_steps(timeout))

    def close(self) -> None:
        """Commit (with auto-commit), leave the group (the others rebalance at once) and stop. Idempotent."""
        self._run(self._close_steps())

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _without_cyclic_gc(decode: Any, *args: Any) -> Any:
    """``decode(*args)`` with Python's cyclic garbage collector paused (unless it was off already).

    A fetch decodes up to ``max_bytes`` (4 MiB: ~30,000 100-byte records) at once, and every
    record is a tracked container that stays alive in the buffer: left on, the collector runs
    a young collection every 700 of them, promotes them all and soon pays a full collection
    of the whole heap — the profile of one consumer reading a 3-replica topic (docs/performance.md,
    "Consume rates") found half its time there. Records make no reference cycles, so pausing it
    for the decode frees nothing later than it would have been. (Another thread that turns the
    collector off during these few milliseconds finds it on again afterwards.)"""
    if not gc.isenabled():
        return decode(*args)
    gc.disable()
    try:
        return decode(*args)
    finally:
        gc.enable()


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
