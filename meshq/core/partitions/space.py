"""Storage space: a node whose data disk fills refuses new records, and lifts that by itself.

Theory of operation
-------------------
Two things put this node's storage in the *full* state: a write that failed for want of
space (``DiskFullError``: ``ENOSPC`` or ``EDQUOT``; the log undid it, so nothing changed), and
the periodic measurement (``Storage.check_space`` every ``storage_check_interval_s``) finding
less free space than ``min_free_bytes``. While full, every new record for a partition log is
refused with ``StorageFullError`` before anything is written: a produce or a consumer-group
commit here, and a follower's copy of its leader's batches (the follower answers that it could
not take them, so it stays in contact but falls out of the in-sync replicas instead of failing;
the other replicas carry ``acks=quorum``). Reads go on. Metadata writes (votes, epochs, the
metadata log) are never refused here: the reserve exists so that they still fit.

The state is lifted by the first check that finds room again (free space at or above the
reserve). While full, the checks come every ``FULL_RECHECK_S`` (at most every
``storage_check_interval_s``) instead, from the moment the state was entered: a disk that got
room back is writable again within a tenth of a second, not up to a whole interval later
(issue #19 item 10: the first acknowledgement after a heal within 1 s). After a failed write that may be early for a large batch: the next write then fails
again, is undone again, and the state comes back; a retry costs nothing stored.

=========  ==============================================  =========
state      event                                           next
=========  ==============================================  =========
``ok``     a write failed for want of space                ``full``
``ok``     a check found less free space than the reserve  ``full``
``full``   a check found room                              ``ok``
=========  ==============================================  =========
"""

from __future__ import annotations

import logging
from typing import Any

from meshq.core.room import Room
from meshq.errors import StorageFullError

log = logging.getLogger("meshq.core")

FULL_RECHECK_S = 0.1  # while full, free space is measured this often (one statvfs each)


class StorageSpace(Room):
    """Whether this node accepts new records, from failed writes and free-space checks."""

    TIMERS = {"storage_check": "check"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.full_reason: str | None = None  # None: new records are accepted
        self.full_since_s: float | None = None
        self._checks = 0  # the ``storage_check`` timer whose turn it is (an earlier one is superseded)

    @property
    def full(self) -> bool:
        return self.full_reason is not None

    def start(self, now_s: float) -> None:
        self._schedule_check(now_s)

    def check(self, key: Any, now_s: float) -> None:
        """The ``storage_check`` timer: measure free space; enter or lift the full state."""
        if key != self._checks:
            return  # superseded: entering the full state scheduled a sooner check
        reason = self.core.storage.check_space()
        if reason is not None:
            self._become_full(reason, now_s, reschedule=False)
        elif self.full_reason is not None:
            log.warning("node %s: storage has room again after %.1f s; accepting new records", self.node_id,
                        now_s - (self.full_since_s or now_s))
            self.full_reason = None
            self.full_since_s = None
        self._schedule_check(now_s)

    def _schedule_check(self, now_s: float) -> None:
        """The next ``storage_check``: every interval, or every ``FULL_RECHECK_S`` while full."""
        self._checks += 1
        interval = self.config.storage_check_interval_s
        self.out.schedule(now_s + (min(interval, FULL_RECHECK_S) if self.full else interval), "storage_check",
                          self._checks)

    def refuse_writes(self, topic: str, partition: int) -> None:
        """Raise ``StorageFullError`` (nothing written) while the storage is full."""
        if self.full_reason is not None:
            self.core.counters["storage_full_refused"] = self.core.counters.get("storage_full_refused", 0) + 1
            raise StorageFullError(self._message(topic, partition))

    def write_failed(self, error: StorageFullError, topic: str, partition: int, now_s: float) -> StorageFullError:
        """A write ran out of space (and was undone): become full; the error to answer with."""
        self._become_full(str(error), now_s)
        self.core.counters["storage_full_refused"] = self.core.counters.get("storage_full_refused", 0) + 1
        return StorageFullError(self._message(topic, partition))

    def append(self, state: Any, data: bytes, header: Any, now_ms: int, now_s: float) -> tuple[int, bool]:
        """``state.append`` (a leader's new batch) unless the storage is full: then
        ``StorageFullError``, and nothing was stored."""
        self.refuse_writes(state.topic, state.partition)
        try:
            base_offset, duplicate = state.append(data, header, now_ms)
        except StorageFullError as exc:
            raise self.write_failed(exc, state.topic, state.partition, now_s) from None
        if not duplicate:  # catch-up copies yield to live writes (core.throttle)
            self.core.host.copy_throttle.live(now_s, len(data))
        return base_offset, duplicate

    def note_full(self, reason: str, now_s: float) -> None:
        """A write other than a new record (a vote, an epoch) ran out of space."""
        self._become_full(reason, now_s)

    def survive(self, step: Any, *args: Any) -> None:
        """Run a timer step; a write it needed that found the disk full (a vote, an epoch, a saved
        high watermark) is given up for now, as if the timer had not fired: each such write is
        persisted before anything that depends on it is sent, so nothing was promised. The step
        runs again at its next deadline. The host runs each replica's step on its own, so one
        partition that cannot save its state does not hold up the others'."""
        try:
            step(*args)
        except StorageFullError as exc:
            self.note_full(str(exc), self.core.now_s)
            log.error("node %s: a timer step (%s) could not write: %s", self.node_id,
                      getattr(step, "__name__", step), exc)

    def report(self) -> dict:
        """This node's part of ``status``."""
        return {"storage_full": self.full, "storage_full_reason": self.full_reason}

    def _become_full(self, reason: str, now_s: float, reschedule: bool = True) -> None:
        entered = self.full_reason is None
        if entered:
            self.full_since_s = now_s
            self.core.counters["storage_full_events"] = self.core.counters.get("storage_full_events", 0) + 1
            log.error("node %s: storage full (%s); refusing new records until space returns", self.node_id, reason)
        self.full_reason = reason
        if entered and reschedule:
            self._schedule_check(now_s)  # from now on at the full state's pace

    def _message(self, topic: str, partition: int) -> str:
        return (f"node {self.node_id} refuses new records for {topic}/{partition}: its storage is full "
                f"({self.full_reason}). Nothing was stored; records already acknowledged are safe and still "
                f"readable. Free space on that node (delete files, grow the volume) and it accepts writes again "
                f"by itself within {min(self.config.storage_check_interval_s, FULL_RECHECK_S):g} s; then retry")
