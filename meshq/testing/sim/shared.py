"""A shared-subscription workload for the simulator: jobs, workers, failures on purpose.

Theory of operation
-------------------
With ``SimOptions.shared``, client c1 creates the topic ``jobs`` (the run's partition count,
replication factor 3) and, during the fault phase, a random client produces one or two jobs
(``j1``, ``j2``, ...) every 0.1 s with ``acks=quorum``: a fifth of them delayed by 0.2-2 s
(header ``meshq-deliver-at``), a third with a random priority. Every client runs two members
of the shared group ``workers``, each keeping one ``share_fetch`` long poll per partition in
flight (``ack_timeout`` 1 s, ``max_deliveries`` 3), exactly the commands ``meshq.shared``
sends. A member answers each job at once, by its number: ``n % 10 == 3`` rejected (dead
letter), ``n % 10 == 7`` never answered (it times out until it is dead-lettered), ``n % 10 ==
5`` nacked on its first delivery, every other job acked. Answers go back as one ``share_ack``
per fetch answer. Members keep working through the liveness phase; the run ends once every
partition of ``jobs`` has no lag and nothing in flight at its leader. A member whose node
restarted starts afresh under a new member id (what it held comes back after its timeout).
``meshq.testing.shared_checks.SharedChecker`` checks what the members see.
"""

from __future__ import annotations

import random
import struct
from typing import TYPE_CHECKING, Any

from meshq.config import TopicConfig
from meshq.core import batch as batch_format
from meshq.core.events import CreateTopic, ProduceCommand, Resolve, ShareAck, ShareFetch
from meshq.core.shared_state import DELIVER_AT_HEADER, PRIORITY_HEADER, record_deliver_at
from meshq.testing.shared_checks import SharedChecker
from meshq.testing.sim.options import WALL_BASE_MS

if TYPE_CHECKING:
    from meshq.testing.sim.simulation import Simulation

JOBS = "jobs"
GROUP = "workers"
MAX_DELIVERIES = 3
ACK_TIMEOUT_MS = 1000
_INDEX = struct.Struct(">qi")
_ANSWER = struct.Struct(">qBI")


class _JobsWaiter:
    """The waiter of one produce of jobs: remembers where each acknowledged job was stored."""

    def __init__(self, workload: SharedWorkload, names: list[str]) -> None:
        self.workload = workload
        self.names = names

    def settle(self, indexes, records, topic, partition, base_offset, error) -> None:
        for j, i in enumerate(indexes):
            if error is None and base_offset >= 0:
                self.workload.jobs[self.names[i]] = (partition, base_offset + j)


class SharedMember:
    """One member of the shared group on a client node (see the module docstring)."""

    def __init__(self, workload: SharedWorkload, client: str, number: int) -> None:
        self.workload = workload
        self.client = client
        self.number = number
        self.incarnation = -1
        self.busy: set[int] = set()
        self.member = ""

    def step(self) -> None:
        sim = self.workload.sim
        node = sim.nodes[self.client]
        if node.core is None:
            return
        if node.incarnation != self.incarnation:  # a (re)started node: a new member
            self.incarnation = node.incarnation
            self.busy = set()
            self.member = f"{self.client}/{self.number}/{node.incarnation}"
        for partition in range(sim.options.partitions):
            if partition in self.busy:
                continue
            self.busy.add(partition)
            sim.feed(node, ShareFetch(GROUP, JOBS, partition, self.member, 5, 0.2, ACK_TIMEOUT_MS, MAX_DELIVERIES,
                                      deadline_s=sim.now_s + 2.0,
                                      waiter=lambda effect, p=partition, inc=node.incarnation: self._fetched(
                                          effect, p, inc)))

    def _fetched(self, effect: Any, partition: int, incarnation: int) -> None:
        if incarnation != self.incarnation:
            return
        self.busy.discard(partition)
        if not isinstance(effect, Resolve):
            return
        index, data = effect.result
        if not index:
            return
        workload = self.workload
        sim = workload.sim
        wall_ms = WALL_BASE_MS + int(sim.now_s * 1000)
        entries = list(_INDEX.iter_unpack(index))
        records = batch_format.decode_records(data, JOBS, partition)
        answers = []
        acked: dict[int, int] = {}
        for (offset, count), record in zip(entries, records):
            workload.checker.on_delivery(partition, offset, count, record_deliver_at(record.headers), wall_ms)
            name = record.value.decode()
            n = int(name[1:])
            sim.log(f"shared {self.member} got {name} {partition}/{offset} #{count}")
            if n % 10 == 3:
                workload.rejected.add(name)
                answers.append(_ANSWER.pack(offset, 2, 0))
            elif n % 10 == 7:
                continue
            elif n % 10 == 5 and count == 1:
                answers.append(_ANSWER.pack(offset, 1, 0))
            else:
                answers.append(_ANSWER.pack(offset, 0, 0))
                acked[offset] = count
                workload.answered.add((partition, offset))
        if not answers:
            return
        node = sim.nodes[self.client]

        def confirmed(effect: Any) -> None:
            if not isinstance(effect, Resolve):
                return  # unknown fate: the ack may or may not have been committed
            stale = {o for (o,) in struct.iter_unpack(">q", effect.result)}
            for offset, count in acked.items():
                if offset not in stale:
                    workload.checker.on_confirmed(partition, offset, count)

        sim.feed(node, ShareAck(GROUP, JOBS, partition, self.member, b"".join(answers), deadline_s=sim.now_s + 2.0,
                                waiter=confirmed))


class SharedWorkload:
    """Jobs produced during the faults, members on every client, and the checks' inputs."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.rng = random.Random(f"shared-{sim.options.seed}")  # a stream of its own
        self.checker = SharedChecker(sim, MAX_DELIVERIES)
        self.created = "no"  # no | pending | yes
        self.produced = 0
        self.jobs: dict[str, tuple[int, int]] = {}  # acknowledged: name -> (partition, offset)
        self.answered: set[tuple[int, int]] = set()  # acked by a member (confirmed or not)
        self.rejected: set[str] = set()
        self.members = [SharedMember(self, client, number) for client in sorted(
            n for n, node in sim.nodes.items() if node.role == "client") for number in (1, 2)]

    def step(self, fault_end: float) -> None:
        sim = self.sim
        if self.created != "yes":
            self._create()
            return
        if sim.now_s < fault_end:
            self._produce()
        for member in self.members:
            member.step()

    def _create(self) -> None:
        sim = self.sim
        node = sim.nodes["c1"]
        if self.created == "pending" or node.core is None:
            return
        self.created = "pending"

        def created(effect: Any) -> None:
            self.created = "yes" if isinstance(effect, Resolve) else "no"

        sim.feed(node, CreateTopic(TopicConfig(JOBS, sim.options.partitions, 3), True, sim.now_s + 2.0, created))

    def _produce(self) -> None:
        sim = self.sim
        clients = sorted(n for n, node in sim.nodes.items() if node.role == "client" and node.up)
        if not clients:
            return
        client = sim.nodes[self.rng.choice(clients)]
        names, records = [], []
        wall_ms = WALL_BASE_MS + int(sim.now_s * 1000)
        for _ in range(self.rng.randrange(1, 3)):
            self.produced += 1
            name = f"j{self.produced}"
            headers: dict[str, bytes] = {}
            if self.rng.random() < 0.2:
                headers[DELIVER_AT_HEADER] = str(wall_ms + self.rng.randrange(200, 2000)).encode()
            if self.rng.random() < 0.3:
                headers[PRIORITY_HEADER] = str(self.rng.randrange(10)).encode()
            names.append(name)
            records.append((None, name.encode(), headers or None, wall_ms))
        sim.feed(client, ProduceCommand(JOBS, records, _JobsWaiter(self, names), None, "quorum", sim.now_s + 3.0))

    def _leader(self, partition: int) -> Any:
        return next((n for n in self.sim.nodes.values() if n.core is not None and (JOBS, partition) in
                     n.core.partitions and n.core.partitions[(JOBS, partition)].replica.is_leader), None)

    def finished(self) -> bool:
        """Every partition of ``jobs``: its leader's group has scanned everything and holds nothing in
        flight, ready or being dead-lettered; what still waits is due later on the leader's own clock
        (a clock jumped back keeps delayed jobs waiting, as documented)."""
        sim = self.sim
        if self.created != "yes":
            return False
        for partition in range(sim.options.partitions):
            leader = self._leader(partition)
            if leader is None:
                return False
            state = leader.core.partitions[(JOBS, partition)]
            group = leader.core.shared.states.get((JOBS, partition), {}).get(GROUP)
            if group is None:
                if state.high_watermark > 0:
                    return False
                continue
            now_ms = leader.core.wall_clock_ms()
            if (group.scanned_to < state.high_watermark or group.in_flight or group.ready_count
                    or group.dead_pending or state.high_watermark < state.log.end_offset
                    or any(due <= now_ms for due in group.waiting.values())):
                return False
        return True

    def at_end(self) -> None:
        waiting = set()  # jobs still delayed at their leader (its clock is behind): not lost
        for partition in range(self.sim.options.partitions):
            leader = self._leader(partition)
            group = leader.core.shared.states.get((JOBS, partition), {}).get(GROUP) if leader else None
            if group is not None:
                waiting.update((partition, offset) for offset in group.waiting)
        self.checker.at_end(self.jobs, self.answered | waiting, self.rejected)
