"""The state of one shared (work-queue) subscription on one partition, as pure data.

Theory of operation
-------------------
The leader of a data partition owns, for every shared group reading it, one
``SharedState``. Offsets of the partition are in one of these states::

    unscanned --scan--> ready ----take/deliver----> in flight --ack------> done
                  \\--> waiting (delayed) --due--/     |  \\--nack(delay)--> waiting
                                    ^-------------------+  \\--reject / max_deliveries--> dead-lettering --> done
                                  (ack_timeout expired: back to ready, or dead-lettering
                                   when it was delivered max_deliveries times)

* ``floor``: every offset below it is done (acked, dead-lettered, or not a data record:
  control batches of the partition's own log also take offsets). ``done`` holds the done
  offsets at or above the floor; the floor moves up as they fill in.
* ``counts``: how many times each unfinished record was handed out; ``in_flight``: who holds
  it now, until when (a deadline on the leader's clock) and with which limits.
* ``ready``: ten heaps of offsets, one per priority (0..9). ``take`` hands out records with
  this rule (docs/guarantees.md, "Priorities"): among ready records, the highest priority
  level goes first, oldest offset first; but every ``LOW_SLOT_EVERY``-th slot goes to the
  oldest ready record of the levels below the highest one that has records. So lower levels
  always get at least 1 slot in ``LOW_SLOT_EVERY`` while they have ready records: a ready
  record is handed out within ``LOW_SLOT_EVERY * (n + 1)`` slots, n being the ready records
  of lower levels older than it (none starves).
* ``waiting``: delayed records (header ``meshq-deliver-at`` in the future, or a nack with a
  delay), in a heap ordered by due time; one timer for the earliest, so many delayed records
  cost nothing while they wait.

Every change that must survive a failover is an *op*, a small msgpack-able list, that the
leader writes into the partition's log as a control batch (``meshq.core.partitions.shared``)
and that a new leader ``apply``-s on replay: ``["d", [[offset, count, member, timeout_ms,
max_deliveries], ...]]`` deliveries, ``["a", [offset, ...]]`` acks, ``["r", [[offset,
not_before_ms], ...]]`` nacks, ``["x", [[offset, reason], ...]]`` dead letters, and
``["s", snapshot]`` the whole state (replay starts at the last one). Deadlines are not
stored: a replayed in-flight record gets a fresh ``timeout_ms`` from the replay.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

PRIORITY_HEADER = "meshq-priority"
DELIVER_AT_HEADER = "meshq-deliver-at"  # unix milliseconds, ASCII decimal
DELIVERY_COUNT_HEADER = "meshq-delivery-count"
DLQ_REASON_HEADER = "meshq-dlq-reason"
DLQ_PARTITION_HEADER = "meshq-original-partition"
DLQ_OFFSET_HEADER = "meshq-original-offset"
DEFAULT_PRIORITY = 4
LEVELS = 10
LOW_SLOT_EVERY = 4  # every 4th delivery slot goes to the oldest ready record of the lower levels
REASON_MAX_DELIVERIES = "max_deliveries"
REASON_REJECTED = "rejected"


def record_priority(headers: dict) -> int:
    """The priority a record's headers carry (absent or malformed: the default, 4)."""
    raw = headers.get(PRIORITY_HEADER) if headers else None
    if raw is None:
        return DEFAULT_PRIORITY
    try:
        value = int(raw)
    except ValueError:
        return DEFAULT_PRIORITY
    return value if 0 <= value < LEVELS else DEFAULT_PRIORITY


def record_deliver_at(headers: dict) -> int:
    """The unix ms before which a record is not handed out (0: none or malformed)."""
    raw = headers.get(DELIVER_AT_HEADER) if headers else None
    if raw is None:
        return 0
    try:
        return max(0, int(raw))
    except ValueError:
        return 0


@dataclass(slots=True)
class InFlight:
    """A record handed to ``member``, held until ``deadline_s`` (the leader's clock)."""

    member: str
    deadline_s: float
    count: int
    timeout_ms: int
    max_deliveries: int


class SharedState:
    """One shared group's progress on one partition (see the module docstring)."""

    def __init__(self, group: str, start_offset: int) -> None:
        self.group = group
        self.floor = start_offset
        self.done: set[int] = set()
        self.counts: dict[int, int] = {}
        self.in_flight: dict[int, InFlight] = {}
        self.priority: dict[int, int] = {}  # scanned, unfinished records whose priority is not the default
        self.ready: list[list[int]] = [[] for _ in range(LEVELS)]
        self.ready_count = 0
        self.queued: set[int] = set()  # the offsets in ``ready`` (a record is queued once)
        self.waiting: dict[int, int] = {}  # offset -> due unix ms
        self._waiting_heap: list[tuple[int, int]] = []  # (due_ms, offset); stale entries skipped
        self._deadlines: list[tuple[float, int]] = []  # (deadline_s, offset); stale entries skipped
        self.dead_pending: dict[int, str] = {}  # offset -> reason, while its DLQ append is under way
        self.scanned_to = start_offset
        self.slot = 0
        self.stats = {"acked": 0, "redelivered": 0, "dead_lettered": 0, "stale_acks": 0}

    # ------------------------------------------------------------------ scanning
    def unfinished(self) -> int:
        """Records scanned and not done that hold memory: ready plus in flight."""
        return self.ready_count + len(self.in_flight)

    def scan(self, records: list[tuple[int, int, int]], skipped: list[int], next_offset: int, now_ms: int) -> None:
        """The leader read the log up to ``next_offset``: ``records`` are its data records as
        ``(offset, priority, deliver_at_ms)``, ``skipped`` the offsets holding no data record."""
        done = self.done
        for offset in skipped:
            if offset >= self.floor:
                done.add(offset)
        for offset, priority, deliver_at_ms in records:
            if (offset < self.floor or offset in done or offset in self.in_flight or offset in self.waiting
                    or offset in self.dead_pending or offset in self.queued):
                continue
            if priority != DEFAULT_PRIORITY:
                self.priority[offset] = priority
            if deliver_at_ms > now_ms:
                self._wait(offset, deliver_at_ms)
            else:
                self._make_ready(offset)
        self.scanned_to = max(self.scanned_to, next_offset)
        self._advance_floor()

    def skip_to(self, offset: int) -> None:
        """Retention removed the log below ``offset``: what was never handed out there is gone."""
        if offset > self.floor:
            self.floor = offset
            self.done = {o for o in self.done if o >= offset}
        self.scanned_to = max(self.scanned_to, offset)
        self._advance_floor()

    def _make_ready(self, offset: int) -> None:
        if offset in self.queued:
            return
        heapq.heappush(self.ready[self.priority.get(offset, DEFAULT_PRIORITY)], offset)
        self.queued.add(offset)
        self.ready_count += 1

    def _wait(self, offset: int, due_ms: int) -> None:
        self.waiting[offset] = due_ms
        heapq.heappush(self._waiting_heap, (due_ms, offset))

    def _advance_floor(self) -> None:
        done = self.done
        floor = self.floor
        while floor in done:
            done.discard(floor)
            floor += 1
        self.floor = floor

    # ------------------------------------------------------------------ timers
    def release_due(self, now_ms: int) -> int:
        """Delayed records whose time came become ready; returns how many."""
        heap = self._waiting_heap
        released = 0
        while heap and heap[0][0] <= now_ms:
            due_ms, offset = heapq.heappop(heap)
            if self.waiting.get(offset) != due_ms:
                continue
            del self.waiting[offset]
            self._make_ready(offset)
            released += 1
        return released

    def next_due_ms(self) -> int | None:
        heap = self._waiting_heap
        while heap and self.waiting.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def next_deadline_s(self) -> float | None:
        heap = self._deadlines
        while heap:
            deadline_s, offset = heap[0]
            flight = self.in_flight.get(offset)
            if flight is not None and flight.deadline_s == deadline_s:
                return deadline_s
            heapq.heappop(heap)
        return None

    def expire(self, now_s: float) -> list[int]:
        """In-flight records whose ack timeout passed go back to ready; those handed out
        ``max_deliveries`` times are returned instead (the caller dead-letters them)."""
        heap = self._deadlines
        dead = []
        while heap and heap[0][0] <= now_s:
            deadline_s, offset = heapq.heappop(heap)
            flight = self.in_flight.get(offset)
            if flight is None or flight.deadline_s != deadline_s:
                continue
            del self.in_flight[offset]
            if flight.count >= flight.max_deliveries:
                self.dead_pending[offset] = REASON_MAX_DELIVERIES
                dead.append(offset)
            else:
                self.stats["redelivered"] += 1
                self._make_ready(offset)
        return dead

    # ------------------------------------------------------------------ handing out
    def take(self, max_records: int) -> list[int]:
        """Pop up to ``max_records`` ready offsets by the priority rule (module docstring)."""
        ready = self.ready
        out: list[int] = []
        while len(out) < max_records and self.ready_count:
            top = LEVELS - 1
            while not ready[top]:
                top -= 1
            self.slot += 1
            level = top
            if self.slot % LOW_SLOT_EVERY == 0:
                oldest = None
                for lower in range(top):
                    heap = ready[lower]
                    if heap and (oldest is None or heap[0] < ready[oldest][0]):
                        oldest = lower
                if oldest is not None:
                    level = oldest
            offset = heapq.heappop(ready[level])
            self.queued.discard(offset)
            out.append(offset)
            self.ready_count -= 1
        return out

    def put_back(self, offsets: list[int]) -> None:
        """Taken offsets that were not handed out after all (e.g. a partial answer)."""
        for offset in offsets:
            self._make_ready(offset)

    def over_limit(self, offset: int, max_deliveries: int) -> bool:
        """A taken record already handed out ``max_deliveries`` times: it goes to the DLQ instead."""
        return self.counts.get(offset, 0) >= max_deliveries

    def deliver(self, offsets: list[int], member: str, now_s: float, timeout_ms: int,
                max_deliveries: int) -> list[list]:
        """Hand taken ``offsets`` to ``member``; returns the op entries to persist (with counts)."""
        entries = []
        deadline_s = now_s + timeout_ms / 1000.0
        for offset in offsets:
            count = self.counts.get(offset, 0) + 1
            self.counts[offset] = count
            self.in_flight[offset] = InFlight(member, deadline_s, count, timeout_ms, max_deliveries)
            heapq.heappush(self._deadlines, (deadline_s, offset))
            entries.append([offset, count, member, timeout_ms, max_deliveries])
        return entries

    def to_dead_letter(self, offset: int, reason: str) -> None:
        """A taken (or held) record goes to the DLQ instead of being handed out."""
        self.in_flight.pop(offset, None)
        self.dead_pending[offset] = reason

    # ------------------------------------------------------------------ consumer answers
    def _held_by(self, offset: int, member: str) -> bool:
        flight = self.in_flight.get(offset)
        if flight is None or flight.member != member:
            self.stats["stale_acks"] += 1
            return False
        return True

    def ack(self, offset: int, member: str) -> bool:
        """``member`` finished ``offset``. False (nothing changes) when it does not hold it: acked
        already, never handed to it, or its ack timeout passed (it is redelivered)."""
        if not self._held_by(offset, member):
            return False
        self._finish(offset)
        self.stats["acked"] += 1
        return True

    def nack(self, offset: int, member: str, not_before_ms: int, now_ms: int) -> bool:
        """``member`` gives ``offset`` back, to be handed out again from ``not_before_ms``."""
        if not self._held_by(offset, member):
            return False
        flight = self.in_flight.pop(offset)
        if flight.count >= flight.max_deliveries:
            self.dead_pending[offset] = REASON_MAX_DELIVERIES
            return True
        self.stats["redelivered"] += 1
        if not_before_ms > now_ms:
            self._wait(offset, not_before_ms)
        else:
            self._make_ready(offset)
        return True

    def reject(self, offset: int, member: str) -> bool:
        """``member`` refuses ``offset`` for good: it goes to the dead-letter topic."""
        if not self._held_by(offset, member):
            return False
        self.to_dead_letter(offset, REASON_REJECTED)
        return True

    def dead_lettered(self, offset: int) -> None:
        """The DLQ append of ``offset`` was acknowledged."""
        if offset >= self.floor and offset not in self.done:
            self.stats["dead_lettered"] += 1
        self._finish(offset)

    def _finish(self, offset: int) -> None:
        self.in_flight.pop(offset, None)
        self.counts.pop(offset, None)
        self.priority.pop(offset, None)
        self.dead_pending.pop(offset, None)
        if offset >= self.floor:
            self.done.add(offset)
            self._advance_floor()

    def forget(self, offset: int) -> None:
        """A taken record that is no longer in the log (retention removed it): count it done."""
        self._finish(offset)

    # ------------------------------------------------------------------ persistence
    def apply(self, op: list, now_s: float) -> None:
        """Replay one persisted op (module docstring)."""
        kind, body = op[0], op[1]
        if kind == "d":
            for offset, count, member, timeout_ms, max_deliveries in body:
                if offset < self.floor or offset in self.done:
                    continue
                self.counts[offset] = count
                deadline_s = now_s + timeout_ms / 1000.0
                self.in_flight[offset] = InFlight(member, deadline_s, count, timeout_ms, max_deliveries)
                heapq.heappush(self._deadlines, (deadline_s, offset))
                self.waiting.pop(offset, None)
        elif kind == "a":
            for offset in body:
                self._finish(offset)
                self.stats["acked"] += 1
        elif kind == "r":
            for offset, not_before_ms in body:
                if self.in_flight.pop(offset, None) is not None:
                    self.stats["redelivered"] += 1
                if not_before_ms and offset >= self.floor and offset not in self.done:
                    self._wait(offset, not_before_ms)
        elif kind == "x":
            for offset, _reason in body:
                self.dead_lettered(offset)
        elif kind == "s":
            self.restore(body, now_s)

    def snapshot(self) -> dict:
        """The whole persistent state as one msgpack-able map (``apply(["s", ...])`` restores it)."""
        return {
            "floor": self.floor,
            "done": _ranges(self.done),
            "counts": sorted([o, c] for o, c in self.counts.items()),
            "in_flight": sorted([o, f.member, f.timeout_ms, f.max_deliveries] for o, f in self.in_flight.items()),
            "waiting": sorted([o, due] for o, due in self.waiting.items()),
            "stats": dict(self.stats),
        }

    def restore(self, snapshot: dict, now_s: float) -> None:
        self.__init__(self.group, snapshot["floor"])  # type: ignore[misc]
        for first, last in snapshot["done"]:
            self.done.update(range(first, last + 1))
        self.counts = {o: c for o, c in snapshot["counts"]}
        for offset, member, timeout_ms, max_deliveries in snapshot["in_flight"]:
            deadline_s = now_s + timeout_ms / 1000.0
            self.in_flight[offset] = InFlight(member, deadline_s, self.counts.get(offset, 1), timeout_ms,
                                              max_deliveries)
            heapq.heappush(self._deadlines, (deadline_s, offset))
        for offset, due in snapshot["waiting"]:
            self._wait(offset, due)
        self.stats.update(snapshot["stats"])
        self._advance_floor()

    def report(self, high_watermark: int) -> dict[str, Any]:
        """What ``status`` shows of this group on this partition."""
        return {"ack_floor": self.floor, "lag": max(0, high_watermark - self.floor), "in_flight": len(self.in_flight),
                "ready": self.ready_count, "delayed": len(self.waiting), **self.stats}


def _ranges(offsets: set[int]) -> list[list[int]]:
    """Sorted offsets as inclusive ``[first, last]`` runs."""
    out: list[list[int]] = []
    for offset in sorted(offsets):
        if out and out[-1][1] == offset - 1:
            out[-1][1] = offset
        else:
            out.append([offset, offset])
    return out
