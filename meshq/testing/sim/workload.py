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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshq.config import TopicConfig
from meshq.core import batch as batch_format
from meshq.core.events import Command, ProduceCommand, Resolve
from meshq.testing.sim.options import TOPIC, WALL_BASE_MS

if TYPE_CHECKING:
    from meshq.testing.sim.node import SimNode
    from meshq.testing.sim.simulation import Simulation

LEAVE_RETRY_S = 0.5


@dataclass
class Attempt:
    """One produced record as the client saw it."""

    value: bytes
    acks: str
    client: str
    outcome: str = "pending"  # pending | ok | failed
    error: str = ""
    partition: int = -1
    offset: int = -1


class _Waiter:
    """The waiter of one produce command: the core settles its attempts (``ResolveProduce``)."""

    def __init__(self, workload: Workload, attempts: list[Attempt]) -> None:
        self.workload = workload
        self.attempts = attempts

    def settle(self, indexes, records, topic, partition, base_offset, error) -> None:
        sim = self.workload.sim
        for j, i in enumerate(indexes):
            attempt = self.attempts[i]
            if attempt.outcome == "pending":
                self.workload.pending_attempts -= 1
            sim.log(f"{attempt.value.decode()} {'failed' if error is not None else 'ok'} "
                    f"{partition}/{base_offset + j if base_offset >= 0 else -1}")
            if error is not None:
                attempt.outcome = "failed"
                attempt.error = f"{type(error).__name__}: {error}"
            else:
                attempt.outcome = "ok"
                attempt.partition = partition
                attempt.offset = base_offset + j if base_offset >= 0 else -1
                sim.checker.on_ack(attempt, sim.now_s)


class Workload:
    """The clients' producers, topic creations, leave question and liveness probes, with their outcomes."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.attempts: list[Attempt] = []  # every value produced, probes included: the history to check
        self.pending_attempts = 0
        self.probes: list[Attempt] | None = None  # sent once the liveness phase has converged
        self.topic_creations: list[dict] = []
        self._produced = 0
        self._leave_asked_until_s = 0.0  # a leave question is outstanding until then

    def produce_step(self) -> None:
        """A random client produces one to three new values with one of the run's acks levels."""
        sim = self.sim
        clients = sorted(n for n, node in sim.nodes.items() if node.role == "client" and node.up)
        if not clients:
            return
        client = sim.nodes[sim.rng.choice(clients)]
        count = sim.rng.randrange(1, 4)
        acks = sim.rng.choice(sim.options.acks)
        attempts = []
        records = []
        for _ in range(count):
            self._produced += 1
            value = f"v{self._produced}".encode()
            attempts.append(Attempt(value, acks, client.node_id))
            key = None if sim.rng.random() < 0.5 else f"k{sim.rng.randrange(20)}".encode()
            records.append((key, value, None, WALL_BASE_MS + int(sim.now_s * 1000)))
        self.attempts.extend(attempts)
        self.pending_attempts += len(attempts)
        sim.feed(client, ProduceCommand(TOPIC, records, _Waiter(self, attempts), None, acks, sim.now_s + 3.0))

    def create_topic_step(self) -> None:
        """Metadata writes during the faults: a new topic; its fate is recorded like a produce."""
        sim = self.sim
        clients = sorted(n for n, node in sim.nodes.items() if node.role == "client" and node.up)
        if not clients:
            return
        client = sim.nodes[sim.rng.choice(clients)]
        name = f"topic{len(self.topic_creations)}"
        outcome: dict = {"name": name, "outcome": "pending"}
        self.topic_creations.append(outcome)

        def settle(effect: Any) -> None:
            outcome["outcome"] = "ok" if isinstance(effect, Resolve) else "failed"
            sim.log(f"create {name} {outcome['outcome']}")

        sim.feed(client, Command("create_topic", {"config": TopicConfig(name, 1, 3),
                                                   "deadline_s": sim.now_s + 3.0}, settle))

    def send_probes(self) -> None:
        """Liveness: once converged, one acks=leader write to every partition must succeed."""
        sim = self.sim
        client = sim.nodes["c1"]
        self.probes = []
        for partition in range(sim.options.partitions):
            self._produced += 1
            attempt = Attempt(f"v{self._produced}".encode(), "leader", client.node_id)
            self.probes.append(attempt)
            self.attempts.append(attempt)
            self.pending_attempts += 1
            sim.feed(client, ProduceCommand(TOPIC, [(None, attempt.value, None, WALL_BASE_MS + int(sim.now_s * 1000))],
                                            _Waiter(self, [attempt]), partition, "leader", sim.now_s + 5.0))
        sim.log("liveness probes sent")

    def leave_step(self) -> None:
        """What ``meshq leave`` (or ``Node.leave()``) does: ask, one question at a time, again
        every 0.5 s until the answer is ``left``; the node stops by itself (``_after_core``)."""
        sim = self.sim
        assert sim.options.leave is not None
        node_id, _when_s, via = sim.options.leave
        if sim.nodes[node_id].departed:
            return
        asker = sim.nodes[node_id if via == "node" else "c1"]
        if asker.core is not None and sim.now_s >= self._leave_asked_until_s:
            deadline_s = sim.now_s + 2.0
            self._leave_asked_until_s = deadline_s

            def answered(effect: Any) -> None:
                self._leave_asked_until_s = 0.0
                answer = (f"{effect.result['state']} ({effect.result['assigned']} partitions assigned)"
                          if isinstance(effect, Resolve) else f"{type(effect.error).__name__}: {effect.error}")
                sim.log(f"leave {node_id}: {answer}")

            sim.log(f"leave {node_id}? (asked through {asker.node_id})")
            sim.feed(asker, Command("leave", {"node_id": node_id, "deadline_s": deadline_s}, answered))
        sim.at(sim.now_s + LEAVE_RETRY_S, "leave", None)


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

