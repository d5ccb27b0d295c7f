"""The clients' side of a run: what they ask of the cluster, and what they saw come back.

Theory of operation
-------------------
The workload acts only through client-role cores, with the commands the real client API
sends, and records every outcome for the history check at the end:

* **Producers.** Every ``produce_interval_s`` a random client produces one to three unique
  values (``v1``, ``v2``, ...), keyed or not, with one of the run's acks levels; each value
  is an ``Attempt`` whose outcome (ok at a partition and offset, or failed) the core settles.
* **Calling threads.** ``threads.py``: client threads whose ``Node.produce`` goes straight
  to the leader; their records are ``Attempt``s here too.
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
from meshq.core.client.consumer import ConsumerState, FetchSpec
from meshq.core.client.leave import LeaveLoop
from meshq.core.events import (
    AskLeave,
    CommitOffsets,
    CreateTopic,
    Fetch,
    FetchCommitted,
    GetMetadata,
    ProduceCommand,
    Resolve,
)
from meshq.errors import MeshqError
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


class ProduceWaiter:
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
        self._leave_loop: LeaveLoop | None = None
        self._leave_asked_until_s = 0.0  # a leave question is outstanding until it is answered, or then
        self._next_leave_ask_s = 0.0

    def next_value(self) -> bytes:
        """A value no client produced before (``v1``, ``v2``, ...: the order check reads the number)."""
        self._produced += 1
        return f"v{self._produced}".encode()

    def produce_step(self) -> None:
        """A random client produces one to three new values with one of the run's acks levels."""
        sim = self.sim
        clients = sorted(n for n, node in sim.nodes.items() if node.role == "client" and node.up and node.runs_workload)
        if not clients:
            return
        client = sim.nodes[sim.rng.choice(clients)]
        count = sim.rng.randrange(1, 4)
        acks = sim.rng.choice(sim.options.acks)
        attempts = []
        records = []
        for _ in range(count):
            value = self.next_value()
            attempts.append(Attempt(value, acks, client.node_id))
            key = None if sim.rng.random() < 0.5 else f"k{sim.rng.randrange(20)}".encode()
            records.append((key, value, None, WALL_BASE_MS + int(sim.now_s * 1000)))
        self.attempts.extend(attempts)
        self.pending_attempts += len(attempts)
        sim.feed(client, ProduceCommand(TOPIC, records, ProduceWaiter(self, attempts), None, acks, sim.now_s + 3.0))

    def create_topic_step(self) -> None:
        """Metadata writes during the faults: a new topic; its fate is recorded like a produce."""
        sim = self.sim
        clients = sorted(n for n, node in sim.nodes.items() if node.role == "client" and node.up and node.runs_workload)
        if not clients:
            return
        client = sim.nodes[sim.rng.choice(clients)]
        name = f"topic{len(self.topic_creations)}"
        outcome: dict = {"name": name, "outcome": "pending"}
        self.topic_creations.append(outcome)

        def settle(effect: Any) -> None:
            outcome["outcome"] = "ok" if isinstance(effect, Resolve) else "failed"
            sim.log(f"create {name} {outcome['outcome']}")

        sim.feed(client, CreateTopic(TopicConfig(name, 1, 3), deadline_s=sim.now_s + 3.0, waiter=settle))

    def send_probes(self) -> None:
        """Liveness: once converged, one acks=leader write to every partition must succeed."""
        sim = self.sim
        client = sim.nodes["c1"]
        self.probes = []
        for partition in range(sim.options.partitions):
            attempt = Attempt(self.next_value(), "leader", client.node_id)
            self.probes.append(attempt)
            self.attempts.append(attempt)
            self.pending_attempts += 1
            sim.feed(client, ProduceCommand(TOPIC, [(None, attempt.value, None, WALL_BASE_MS + int(sim.now_s * 1000))],
                                            ProduceWaiter(self, [attempt]), partition, "leader", sim.now_s + 5.0))
        sim.log("liveness probes sent")

    def leave_step(self) -> None:
        """What ``meshq leave`` (or ``Node.leave()``) does, with the same ``LeaveLoop``: ask, one
        question at a time, ``LEAVE_RETRY_S`` after each answer, until the answer is ``left``; the
        node stops by itself (``Simulation._after_core``)."""
        sim = self.sim
        assert sim.options.leave is not None
        node_id, _when_s, via = sim.options.leave
        if sim.nodes[node_id].departed:
            return
        asker = sim.nodes[node_id if via == "node" else "c1"]
        if self._leave_loop is None:
            self._leave_loop = LeaveLoop(node_id, own=via == "node", deadline_s=float("inf"), poll_s=LEAVE_RETRY_S)
        loop = self._leave_loop
        if asker.core is not None and sim.now_s >= max(self._leave_asked_until_s, self._next_leave_ask_s):
            deadline_s = sim.now_s + 2.0
            self._leave_asked_until_s = deadline_s

            def answered(effect: Any) -> None:
                self._leave_asked_until_s = 0.0
                self._next_leave_ask_s = sim.now_s + loop.wait_s(sim.now_s)
                if isinstance(effect, Resolve):
                    step = loop.answered(effect.result)
                else:
                    try:
                        # The simulated client has no oracle for the agreed membership: it asks on.
                        step = loop.failed(effect.error, own_has_left=False, left_membership=lambda: False)
                    except MeshqError as exc:  # not retriable: the real client raises it to its caller
                        sim.log(f"leave {node_id}: gave up: {type(exc).__name__}: {exc}")
                        return
                report = step.report or {}
                answer = (f"{report['state']} ({report['assigned']} partitions assigned)" if "assigned" in report
                          else report.get("error", report.get("state", "")))
                sim.log(f"leave {node_id}: {answer}")

            sim.log(f"leave {node_id}? (asked through {asker.node_id})")
            sim.feed(asker, AskLeave(node_id, deadline_s, answered))
        sim.at(sim.now_s + LEAVE_RETRY_S, "leave", None)


class SimConsumer:
    """A consumer-group member on client c1, running the real consumer's ``ConsumerState``:
    fetches every partition (one long poll in flight each), hands every record out at once,
    commits what changed every second, and now and then restarts from the group's commits.

    Records what it saw so the checkers can require: no gap or reordering within a partition,
    nothing seen that the log later takes back (outside the power-loss window), and committed
    offsets that never go below an acknowledged commit nothing may have overtaken.
    """

    GROUP = "sim-group"

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.state: ConsumerState | None = None  # the current member's positions
        self.generation = 0  # members so far (a restart is a new member)
        self.seen: dict[tuple[int, int], set[bytes]] = {}
        self.acked_commits: dict[int, int] = {}  # partition -> highest acknowledged committed offset
        # every commit: [sent_s, {partition: offset}, acknowledged_s or None (pending, or failed:
        # its fate is unknown, it may still be applied)]
        self.commits: list[list] = []
        self.next_commit_s = 0.0
        self.final_read = "not asked"  # not asked | pending | done: the read of the group's commits at the end

    def step(self) -> None:
        sim = self.sim
        node = sim.nodes["c1"]
        if node.core is None:
            return
        state = self.state
        if state is None:
            if TOPIC not in node.core.metadata:  # a fetch asks for it itself; a (re)start needs it first
                sim.feed(node, GetMetadata(TOPIC, deadline_s=sim.now_s + 2.0, waiter=lambda effect: None))
                return
            self._restart(node)
            return
        if sim.rng.random() < 0.01:  # a member leaves and another joins: resume from the group's commits
            self._restart(node)
            return
        generation = self.generation
        for spec in state.fetches_due(sim.now_s):

            def done(effect: Any, spec: FetchSpec = spec, generation: int = generation) -> None:
                if generation != self.generation or self.state is None:
                    return  # an answer to a member that is gone
                if isinstance(effect, Resolve):
                    self._on_fetch(spec, effect.result.data)
                    return
                try:
                    reset = self.state.on_fetch_failed(spec, effect.error, sim.now_s)
                except MeshqError as exc:  # not retriable: the real consumer raises it to the caller
                    sim.log(f"consumer: {type(exc).__name__}: {exc}; the member restarts")
                    self.state = None
                    return
                if reset:  # out of range: rebuilt past it, else (no retention here) a restart finds it again
                    start = sim.checker.rebuilt_start(spec.partition, spec.offset, self.generation)
                    if start is not None:
                        self.state.reset(spec.partition, start)
                    else:
                        self.state = None

            sim.feed(node, Fetch(TOPIC, spec.partition, spec.offset, max_wait_s=0.2, deadline_s=sim.now_s + 2.0,
                                 waiter=done))
        changed = state.to_commit()
        if sim.now_s >= self.next_commit_s and changed:
            self.next_commit_s = sim.now_s + 1.0
            commit = [sim.now_s, dict(changed), None]
            self.commits.append(commit)

            def committed(effect: Any, changed: dict = changed, commit: list = commit,
                          generation: int = generation) -> None:
                if isinstance(effect, Resolve):
                    commit[2] = sim.now_s
                    for p, o in changed.items():
                        self.acked_commits[p] = max(self.acked_commits.get(p, 0), o)
                    if generation == self.generation and self.state is not None:
                        self.state.on_committed(changed)

            sim.feed(node, CommitOffsets(self.GROUP, {(TOPIC, p): o for p, o in changed.items()},
                                         sim.now_s + 2.0, committed))

    def _restart(self, node: SimNode) -> None:
        """A new member: it starts where the group's committed offsets say."""
        sim = self.sim
        self.generation += 1
        self.state = None
        generation = self.generation
        floor = self._committed_floor(sim.now_s)

        def resume(effect: Any) -> None:
            if generation != self.generation or not isinstance(effect, Resolve):
                return
            committed = {p: o for (_t, p), o in effect.result.items()}
            sim.checker.on_committed_read(committed, floor)
            meta = node.core.metadata.get(TOPIC) if node.core is not None else None
            if meta is None:
                return  # metadata being refreshed; the next step restarts again
            state = ConsumerState(TOPIC, list(range(meta["config"].partitions)))
            for partition in state.partitions:
                state.start_at(partition, committed.get(partition, 0), committed=partition in committed)
            self.state = state

        sim.feed(node, FetchCommitted(self.GROUP, TOPIC, sim.now_s + 2.0, resume))
    def read_commits_at_the_end(self) -> None:
        """Once the cluster has converged: read the group's committed offsets once more. Each must
        still be at least the highest commit acknowledged before that nothing may have overtaken
        (a coordinator that took over must have rebuilt them from its log). Asked again until it
        is answered; the run ends only once it was."""
        sim = self.sim
        node = sim.nodes["c1"]
        if self.final_read != "not asked" or node.core is None:
            return
        self.final_read = "pending"
        self.generation += 1  # the member stops here: answers to its fetches no longer count
        self.state = None
        floor = self._committed_floor(sim.now_s)

        def answered(effect: Any) -> None:
            if not isinstance(effect, Resolve):
                self.final_read = "not asked"  # ask again at the next event
                return
            committed = {p: o for (_t, p), o in effect.result.items()}
            sim.checker.on_committed_read(committed, floor)
            self.final_read = "done"
            sim.log("consumer: committed offsets read back after convergence")

        sim.feed(node, FetchCommitted(self.GROUP, TOPIC, sim.now_s + 2.0, answered))

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

    def _on_fetch(self, spec: FetchSpec, data: bytes) -> None:
        assert self.state is not None
        records = self.state.on_fetched(spec, data)
        if not records:
            return
        self.sim.checker.on_consumed(spec.partition, spec.offset, records, member=self.generation)
        for record in records:
            self.seen.setdefault((spec.partition, record.offset), set()).add(record.value)
        self.state.take(len(self.state.buffer))  # handed out at once: the positions move past them
