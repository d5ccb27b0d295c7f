"""Consumer-group members in the simulator: joining, leaving and crashing while the faults run.

Theory of operation
-------------------
Two client nodes of their own, ``g1`` and ``g2`` (no producer or calling thread runs there,
so a crash of one touches nothing else), run the members of group ``sim-members`` on the
topic. Each ``SimMember`` is the shell half of ``meshq.Consumer`` in a group: it joins
through its node's core (``JoinGroup``; the core's ``group_client`` room joins, heartbeats
and rejoins), waits on ``WatchGroup``, and acts as the real consumer does: on an assignment
it starts the partitions at the group's committed offsets; on a rebalance it commits its
positions (naming its member id and generation), drops every partition, then releases
(``ReleaseGroup``). It fetches with the real ``ConsumerState``, hands every fetched record out
at once and commits every second.

The plan is drawn from a random stream of its own (``seed``-derived), so the rest of the run
draws as before: ``m1`` on g1 and ``m2`` on g2 from the start; ``m3`` on g1 joins during the
faults and later leaves (``LeaveGroup``); g2 is killed during the faults in most runs and
restarted a little later, with a new member ``m4`` (its old one is evicted by the coordinator
when its session ends). The checker (``meshq.testing.group_checks``) reads the members' states.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from meshq.core.client.consumer import ConsumerState, FetchSpec
from meshq.core.events import (
    CommitOffsets,
    Fetch,
    FetchCommitted,
    JoinGroup,
    LeaveGroup,
    ReleaseGroup,
    Resolve,
    WatchGroup,
)
from meshq.errors import MeshqError
from meshq.testing.sim.options import TOPIC

if TYPE_CHECKING:
    from meshq.testing.sim.simulation import Simulation

GROUP = "sim-members"
NODES = ("g1", "g2")
STEP_S = 0.1


class SimMember:
    """One consumer of the group (the shell half of ``meshq.Consumer``, see the module docstring)."""

    def __init__(self, group: SimGroup, name: str, node_id: str, index: int) -> None:
        self.group = group
        self.sim = group.sim
        self.name = name
        self.node_id = node_id
        self.index = index
        self.incarnation = self.sim.nodes[node_id].incarnation
        self.member_id: str | None = None
        self.joining = False
        self.watching = False
        self.version = 0
        self.assigned_version = -1
        self.generation = -1
        self.state = ConsumerState(TOPIC, [])
        self.unstarted: list[int] = []
        self.starting = False
        self.letting_go = False
        self.episode = 0  # bumps at each assignment: the order checker keys a member's reads by it
        self.next_commit_s = 0.0
        self.gone = False  # left, or its node crashed
        self.leaving = False

    @property
    def alive(self) -> bool:
        node = self.sim.nodes[self.node_id]
        return not self.gone and node.core is not None and node.incarnation == self.incarnation

    def feed(self, command: Any) -> None:
        self.sim.feed(self.sim.nodes[self.node_id], command)

    def step(self) -> None:
        sim = self.sim
        if not self.alive:
            self.gone = True
            return
        if self.member_id is None:
            if not self.joining:
                self.joining = True
                self.feed(JoinGroup(GROUP, TOPIC, sim.options.partitions, sim.now_s + 2.0, self._joined))
            return
        if not self.watching:
            self.watching = True
            self.feed(WatchGroup(self.member_id, self.version, None, self._on_view))
        if self.unstarted and not self.starting:
            self._start_assigned()
        if self.letting_go:
            return
        for spec in self.state.fetches_due(sim.now_s):
            self.feed(Fetch(TOPIC, spec.partition, spec.offset, max_wait_s=0.2, deadline_s=sim.now_s + 2.0,
                            waiter=lambda effect, spec=spec: self._on_fetch(spec, effect)))
        if sim.now_s >= self.next_commit_s and not self.letting_go:
            self.next_commit_s = sim.now_s + 1.0
            self._commit(None)

    def leave(self) -> None:
        """Close: commit, then tell the coordinator (the others rebalance at once)."""
        if not self.alive or self.member_id is None:
            self.gone = True
            return
        self.sim.log(f"group: {self.name} ({self.member_id}) leaves")
        self.leaving = True
        member_id = self.member_id

        def close(_effect: Any) -> None:
            self.state.revoke(list(self.state.partitions))
            self.gone = True
            self.feed(LeaveGroup(member_id, self.sim.now_s + 2.0, lambda effect: None))

        self._commit(close)

    # ------------------------------------------------------------------ the member's answers
    def _joined(self, effect: Any) -> None:
        self.joining = False
        if isinstance(effect, Resolve):
            self.member_id = effect.result
            self.sim.log(f"group: {self.name} is {self.member_id} on {self.node_id}")

    def _on_view(self, effect: Any) -> None:
        self.watching = False
        if not isinstance(effect, Resolve) or self.gone:
            return
        view = effect.result
        self.version = view.version
        if view.state in ("revoking", "left"):
            self._let_go(view.generation)
        elif view.state == "assigned" and view.version != self.assigned_version:
            self.assigned_version = view.version  # each new "assigned" version is a new assignment
            self.generation = view.generation
            self.episode += 1
            self.state.assign(list(view.partitions))
            self.unstarted = list(view.partitions)
            self.sim.log(f"group: {self.name} holds {list(view.partitions)} in generation {view.generation}")
            self.group.checker.on_assigned(self, view.generation, view.partitions)

    def _let_go(self, generation: int) -> None:
        """A rebalance: commit, drop every partition, then let the member rejoin (as ``meshq.Consumer``)."""
        if self.letting_go:
            return
        self.letting_go = True
        self.sim.log(f"group: {self.name} lets go of {self.state.partitions} (generation {generation})")

        def release(_effect: Any) -> None:
            self.letting_go = False
            self.state.revoke(list(self.state.partitions))
            self.unstarted = []
            if self.alive and self.member_id is not None:
                self.feed(ReleaseGroup(self.member_id, generation, self.sim.now_s + 2.0, lambda effect: None))

        self._commit(release)

    def _commit(self, then: Any) -> None:
        changed = self.state.to_commit()
        if not changed or self.member_id is None:
            if then is not None:
                then(None)
            return
        generation = self.generation

        def committed(effect: Any) -> None:
            if isinstance(effect, Resolve) and generation == self.generation:
                self.state.on_committed(changed)
            if then is not None:
                then(effect)

        self.feed(CommitOffsets(GROUP, {(TOPIC, p): o for p, o in changed.items()}, self.sim.now_s + 2.0,
                                committed, member=self.member_id, generation=generation))

    def _start_assigned(self) -> None:
        self.starting = True
        generation = self.generation

        def started(effect: Any) -> None:
            self.starting = False
            if not isinstance(effect, Resolve) or generation != self.generation:
                return
            committed = {p: o for (_t, p), o in effect.result.items()}
            for partition in list(self.unstarted):
                if partition in self.state.partitions:
                    self.state.start_at(partition, committed.get(partition, 0), committed=partition in committed)
            self.unstarted = []

        self.feed(FetchCommitted(GROUP, TOPIC, self.sim.now_s + 2.0, started))

    def _on_fetch(self, spec: FetchSpec, effect: Any) -> None:
        if self.gone or self.letting_go:
            return  # (the real consumer is inside its commit before the revoke: it hands nothing out)
        if not isinstance(effect, Resolve):
            try:
                if self.state.on_fetch_failed(spec, effect.error, self.sim.now_s):
                    # the earliest offset: a rebuilt partition's start (the lost offsets are reported), else 0
                    start = self.sim.checker.rebuilt_start(spec.partition, spec.offset,
                                                           100_000 * self.index + self.episode)
                    if start is None and self.sim.checker.power_window():
                        # committed records were lost within the fsync window (documented): reading again
                        # from the earliest offset is a new run for the order checker, as a restart is
                        self.episode += 1
                    self.state.reset(spec.partition, start or 0)
            except MeshqError as exc:  # not retriable: the real consumer raises it; here it drops the partition
                self.sim.log(f"group: {self.name}: {type(exc).__name__}: {exc}")
                self.state.seek(spec.partition, self.state.position(spec.partition))
            return
        records = self.state.on_fetched(spec, effect.result.data)
        if not records:
            return
        self.state.take(len(self.state.buffer))  # handed out at once: the positions move past them
        self.group.checker.on_handed_out(self, spec.offset, records)


class SimGroup:
    """The group's members and their plan (see the module docstring)."""

    def __init__(self, sim: Simulation) -> None:
        from meshq.testing.group_checks import GroupChecker

        self.sim = sim
        self.rng = random.Random(sim.options.seed * 7919 + 14)
        self.members: list[SimMember] = []
        self.checker = GroupChecker(sim, self)
        fault_s = sim.options.fault_s
        # (when, action, node, member name)
        self.plan: list[tuple[float, str, str, str]] = [(2.0, "start", "g1", "m1"), (2.0, "start", "g2", "m2")]
        join_s = round(self.rng.uniform(3.0, max(3.5, fault_s - 5.0)), 3)
        self.plan.append((join_s, "start", "g1", "m3"))
        self.plan.append((round(join_s + self.rng.uniform(1.0, 4.0), 3), "leave", "g1", "m3"))
        if self.rng.random() < 0.7:
            self.plan.append((round(self.rng.uniform(3.0, max(3.5, fault_s - 2.0)), 3), "kill", "g2", ""))
        self.plan.sort()
        self.down_s = self.rng.uniform(0.5, 3.0)

    def step(self) -> None:
        """Every ``STEP_S``: carry out the plan, then drive every member."""
        sim = self.sim
        while self.plan and self.plan[0][0] <= sim.now_s:
            _when, action, node_id, name = self.plan.pop(0)
            if action == "start":
                self._start(node_id, name)
            elif action == "leave":
                for member in self.members:
                    if member.name == name and not member.gone:
                        member.leave()
            elif action == "kill" and sim.faulting:
                self._kill(sim.nodes[node_id])
        for member in self.members:
            if not member.gone and not member.leaving:
                member.step()

    def _start(self, node_id: str, name: str) -> None:
        if self.sim.nodes[node_id].core is None:
            return
        self.members.append(SimMember(self, name, node_id, len(self.members) + 1))
        self.sim.log(f"group: {name} starts on {node_id}")

    def _kill(self, node: Any) -> None:
        """kill -9 of a member's node: its members stop at once; it restarts later with a new one."""
        sim = self.sim
        if node.core is None:
            return
        node.core = None
        node.timer_at_s = float("inf")
        sim.stats["kills"] += 1
        sim.log(f"kill {node.node_id}")
        for member in self.members:
            if member.node_id == node.node_id:
                member.gone = True
        restart_s = sim.now_s + self.down_s
        sim.at(restart_s, "restart", (node.node_id, node.incarnation))
        self.plan.append((restart_s + 0.05, "start", node.node_id, "m4"))
        self.plan.sort()

    def live_members(self) -> list[SimMember]:
        return [m for m in self.members if m.alive and not m.leaving]
