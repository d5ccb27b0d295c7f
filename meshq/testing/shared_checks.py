"""Shared subscriptions' invariants, checked in the simulator (``meshq.testing.sim.shared`` owns and
feeds ``SharedChecker``); the rules are in the class docstring.
"""

from __future__ import annotations

from typing import Any

from meshq.core import batch as batch_format
from meshq.testing.checks import Violation


class SharedChecker:
    """Invariants of shared subscriptions (``meshq.testing.sim.shared``), checked as members see
    records and at the end of the run:

    * **max deliveries**: no record is handed out more than ``max_deliveries`` times (the
      delivery count each answer carries, persisted before the answer, never exceeds it);
    * **acked stays acked**: no record is handed out again after an ack of it was confirmed to
      a member (a delivery after the confirmed one would carry a higher delivery count);
    * **never early**: a record whose ``meshq-deliver-at`` lies ahead of every storage node's
      wall clock (the simulated clock plus the largest jump any node's clock ever made) is not
      handed out;
    * **nothing lost** (end of the liveness phase): every job whose produce was acknowledged was
      acked by a member (confirmed, or sent without an answer: a lost answer may hide a committed
      ack) or is in ``<topic>.dlq``; a job is in the DLQ as ``rejected`` only if a member rejected it.

    The first two and the last hold outside the power-loss window of fsync=interval (a power
    loss there may take back acknowledged writes, acks and deliveries included).
    """

    def __init__(self, sim: Any, max_deliveries: int) -> None:
        self.sim = sim
        self.max_deliveries = max_deliveries
        self.confirmed: dict[tuple[int, int], int] = {}  # (partition, offset) -> delivery count acked
        self.max_clock_ahead_ms = 0
        self.deliveries = 0

    def _clock_bound_ms(self, wall_ms: int) -> int:
        ahead = max((n.wall_offset_ms for n in self.sim.nodes.values()), default=0)
        self.max_clock_ahead_ms = max(self.max_clock_ahead_ms, ahead)
        return wall_ms + self.max_clock_ahead_ms

    def on_clock(self) -> None:
        """Sample the nodes' clock offsets (after every event: a jump is seen before it is undone)."""
        self._clock_bound_ms(0)

    def on_delivery(self, partition: int, offset: int, count: int, deliver_at_ms: int, wall_ms: int) -> None:
        self.deliveries += 1
        where = f"jobs/{partition}@{offset}"
        if count > self.max_deliveries:
            raise Violation(f"{where} handed out for the {count}th time; max_deliveries is {self.max_deliveries}")
        acked = self.confirmed.get((partition, offset))
        if acked is not None and count > acked and not self.sim.checker.power_window():
            raise Violation(f"{where} handed out again (delivery {count}) after an ack of delivery {acked} "
                            f"was confirmed")
        if deliver_at_ms > self._clock_bound_ms(wall_ms):
            raise Violation(f"{where} handed out at wall time {wall_ms} ms, before its deliver-at "
                            f"{deliver_at_ms} ms (no storage clock was ahead by more than "
                            f"{self.max_clock_ahead_ms} ms)")

    def on_confirmed(self, partition: int, offset: int, count: int) -> None:
        known = self.confirmed.get((partition, offset))
        self.confirmed[(partition, offset)] = count if known is None else min(known, count)

    def at_end(self, jobs: dict[str, tuple[int, int]], answered: set[tuple[int, int]],
               rejected_on_purpose: set[str]) -> None:
        """``jobs``: acknowledged produces, name -> (partition, offset); ``answered``: what members acked."""
        sim = self.sim
        if sim.checker.power_window():
            return
        dead: dict[bytes, str] = {}
        for node in sim.nodes.values():
            if node.core is None:
                continue
            for (topic, partition), state in sorted(node.core.partitions.items()):
                if topic != "jobs.dlq" or not state.replica.is_leader:
                    continue
                data = state.log.read(state.log.start_offset, 1 << 30) if state.log.end_offset else b""
                for record in batch_format.decode_records(data, topic, partition):
                    if record.offset < state.high_watermark:
                        dead[record.value] = record.headers.get("meshq-dlq-reason", b"").decode()
        for name, position in sorted(jobs.items()):
            reason = dead.get(name.encode())
            if position not in answered and reason is None:
                raise Violation(f"job {name} at jobs/{position[0]}@{position[1]} was acknowledged to its producer "
                                f"but never acked by a member nor dead-lettered")
            if reason == "rejected" and name not in rejected_on_purpose:
                raise Violation(f"job {name} is in the DLQ as rejected, but no member rejected it")

    def summary(self) -> dict:
        return {"shared_deliveries": self.deliveries, "shared_confirmed": len(self.confirmed)}
