"""The simulator's disk-full checker (``SimOptions`` disk-full faults; ``meshq.core.partitions.space``)."""

from __future__ import annotations

from typing import Any

from meshq.core.partitions.space import FULL_RECHECK_S
from meshq.testing.checks import Violation


class SpaceChecker:
    """Disk-full invariants (``partitions.space``): while a node says its storage is full, none of
    its partition logs grows; once space returned, it says so within a full node's storage check
    (``space.FULL_RECHECK_S``, plus one heartbeat of slack) whenever it runs. Nothing acknowledged is
    lost: ``Checker`` at the end."""

    LIFT_SLACK_S = 0.5

    def __init__(self) -> None:
        self.full_disks: set[str] = set()  # nodes whose simulated disk is full now
        self.freed_at_s: dict[str, float] = {}  # node -> when space last returned
        # node -> (the PartitionState, its end offset) when the node was last seen full
        self.ends: dict[str, dict[tuple[str, int], tuple[Any, int]]] = {}
        self.full_seen = 0  # events at which a node was seen refusing writes

    def on_disk_full(self, node_id: str) -> None:
        self.full_disks.add(node_id)
        self.freed_at_s.pop(node_id, None)

    def on_disk_free(self, node_id: str, now_s: float) -> None:
        self.full_disks.discard(node_id)
        self.freed_at_s[node_id] = now_s

    def check(self, node_id: str, core: Any, now_s: float) -> None:
        if not core.space.full:
            self.ends.pop(node_id, None)
            return
        self.full_seen += 1
        freed_s = self.freed_at_s.get(node_id)
        recheck_s = min(core.config.storage_check_interval_s, FULL_RECHECK_S)
        if freed_s is not None and now_s > freed_s + recheck_s + self.LIFT_SLACK_S:
            raise Violation(f"{node_id}: still refusing writes {now_s - freed_s:.2f} s after space returned "
                            f"({core.space.full_reason})")
        seen = self.ends.setdefault(node_id, {})
        for key, state in core.partitions.items():
            end = state.log.end_offset
            known = seen.get(key)
            if known is not None and known[0] is state and end > known[1]:
                raise Violation(f"{node_id}: {key[0]}/{key[1]} grew from {known[1]} to {end} while its storage "
                                f"was full ({core.space.full_reason})")
            seen[key] = (state, end)


__all__ = ["SpaceChecker"]
