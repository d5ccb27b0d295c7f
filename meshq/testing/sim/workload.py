"""The clients' side of a run: what they ask of the cluster, and what they saw come back.

Theory of operation
-------------------
The workload acts only through client-role cores, with the commands the real client API
sends, and records every outcome for the history check at the end:

* **Producers.** Every ``produce_interval_s`` a random client produces one to three unique
  values (``v1``, ``v2``, ...), keyed or not, with one of the run's acks levels; each value
  is an ``Attempt`` whose outcome (ok at a partition and offset, or failed) the core settles.
* **Topics.** Every 0.2-0.8 s a client creates a new topic: metadata writes during the faults.
* **Leave.** What ``meshq leave`` (through client c1) or ``Node.leave()`` (on the node) does.
* **Probes.** Once the liveness phase has converged, one acks=leader write to every
  partition, all of which must succeed.
* **Consumer.** ``SimConsumer``, a consumer-group member on c1, fetches every partition,
  commits its positions, and now and then restarts from the group's committed offsets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshq.core import batch as batch_format
from meshq.core.events import Command, Resolve
from meshq.testing.sim.options import TOPIC

if TYPE_CHECKING:
    from meshq.testing.sim.node import SimNode
    from meshq.testing.sim.simulation import Simulation


class SimConsumer:
    """A consumer-group member on client c1: fetches every partition, commits, sometimes restarts.

    Records what it saw so the checkers can require: no gap or reordering within a partition,
    nothing seen that the log later takes back (outside the power-loss window), and committed
    offsets that never go below an acknowledged commit nothing may have overtaken.
    """

    GROUP = "sim-group"

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.positions: dict[int, int] = {}
        self.in_flight: set[int] = set()
        self.generation = 0
        self.seen: dict[tuple[int, int], set[bytes]] = {}
        self.acked_commits: dict[int, int] = {}  # partition -> highest acknowledged committed offset
        # every commit: [sent_s, {partition: offset}, acknowledged_s or None (pending, or failed:
        # its fate is unknown, it may still be applied)]
        self.commits: list[list] = []
        self.next_commit_s = 0.0
        self.ready = False

    def step(self) -> None:
        sim = self.sim
        node = sim.nodes["c1"]
        if node.core is None or TOPIC not in node.core.metadata:
            return
        partitions = node.core.metadata[TOPIC]["config"].partitions
        if not self.ready:
            self._restart(node)
            return
        if sim.rng.random() < 0.01:  # a member leaves and another joins: resume from the group's commits
            self._restart(node)
            return
        for partition in range(partitions):
            if partition in self.in_flight or partition not in self.positions:
                continue
            self.in_flight.add(partition)
            generation = self.generation
            offset = self.positions[partition]

            def done(effect: Any, partition: int = partition, offset: int = offset, generation: int = generation):
                self.in_flight.discard(partition)
                if generation != self.generation or not isinstance(effect, Resolve):
                    return
                self._on_fetch(partition, offset, effect.result)

            sim.feed(node, Command("fetch", {"topic": TOPIC, "partition": partition, "offset": offset,
                                             "max_wait_s": 0.2, "deadline_s": sim.now_s + 2.0}, done))
        if sim.now_s >= self.next_commit_s and self.positions:
            self.next_commit_s = sim.now_s + 1.0
            offsets = {(TOPIC, p): o for p, o in sorted(self.positions.items())}
            commit = [sim.now_s, dict(self.positions), None]
            self.commits.append(commit)

            def committed(effect: Any, offsets: dict = offsets, commit: list = commit) -> None:
                if isinstance(effect, Resolve):
                    commit[2] = sim.now_s
                    for (_topic, p), o in offsets.items():
                        self.acked_commits[p] = max(self.acked_commits.get(p, 0), o)

            sim.feed(node, Command("commit", {"group": self.GROUP, "offsets": offsets,
                                              "deadline_s": sim.now_s + 2.0}, committed))

    def _restart(self, node: SimNode) -> None:
        sim = self.sim
        self.generation += 1
        self.in_flight.clear()
        self.ready = False
        generation = self.generation
        floor = self._committed_floor(sim.now_s)

        def resume(effect: Any) -> None:
            if generation != self.generation or not isinstance(effect, Resolve):
                return
            positions = {p: o for (_t, p), o in effect.result.items()}
            sim.checker.on_committed_read(positions, floor)
            meta = node.core.metadata.get(TOPIC) if node.core is not None else None
            if meta is None:
                return  # metadata being refreshed; the next step restarts again
            self.positions = {p: positions.get(p, 0) for p in range(meta["config"].partitions)}
            self.ready = True

        sim.feed(node, Command("committed", {"group": self.GROUP, "topic": TOPIC,
                                             "deadline_s": sim.now_s + 2.0}, resume))

    def _committed_floor(self, now_s: float) -> dict[int, int]:
        """Per partition, the committed offset a read sent now must not be below: the highest
        commit acknowledged before now that no lower commit may have overtaken. (A commit still
        pending or failed — its fate unknown — or one acknowledged after the other was sent can
        be applied after it: the member itself sent them concurrently.)"""
        floor: dict[int, int] = {}
        for sent_s, offsets, acked_s in self.commits:
            if acked_s is None or acked_s > now_s:
                continue
            for partition, offset in offsets.items():
                overtaken = any(other_sent_s < now_s and other.get(partition, offset) < offset
                                and (other_acked_s is None or other_acked_s > sent_s)
                                for other_sent_s, other, other_acked_s in self.commits)
                if not overtaken:
                    floor[partition] = max(floor.get(partition, 0), offset)
        return floor

    def _on_fetch(self, partition: int, offset: int, result: Any) -> None:
        if not result.data:
            return
        records = batch_format.decode_records(result.data, TOPIC, partition, offset)
        if not records:
            return
        self.sim.checker.on_consumed(partition, offset, records)
        for record in records:
            self.seen.setdefault((partition, record.offset), set()).add(record.value)
        self.positions[partition] = records[-1].offset + 1

