"""Checkers of consumer groups in the simulator (issue #14): exclusive partitions and progress.

Definitions
-----------
A member *holds* partition p from the moment its node's core takes an assignment containing
p (``assigned`` in ``meshq.core.client.group_member``) until it lets go, or until its session
as the member itself counts it is over (``session_end_s``: the send time of the last heartbeat
the coordinator answered + the session timeout - a safety margin), whichever comes first; a
member whose node crashed holds nothing. Then:

* **exclusive** (safety, after every event): no partition is held by two members of the group
  at the same instant — whatever their generations, so also across a rebalance and across a
  change of coordinator;
* **handed out under a hold** (safety, at each hand-out): a member hands a record of p to its
  user only while it holds p; and a member's reads of p within one assignment have no gap and
  no repeat;
* **the group makes progress** (liveness, after convergence): every partition is held by
  exactly one live member, and every partition's records up to its high watermark have been
  handed out by its holder;
* **a consumer makes progress after any leader change** (liveness, after convergence): the
  all-partitions consumer (``SimConsumer``) reads every partition up to its high watermark.

The liveness checks are what the run waits for before it ends (``waiting_for``); still
unmet at the end of the liveness window, they are violations. A partition where a bit flip
damaged a stored batch is exempt from the read-to-the-end part: a damaged batch is not yet
repaired from another replica (docs/guarantees.md, "Not yet"), so nobody reads past it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshq.testing.checks import Violation
from meshq.testing.sim.options import TOPIC

if TYPE_CHECKING:
    from meshq.testing.sim.group import SimGroup, SimMember
    from meshq.testing.sim.simulation import Simulation


class GroupChecker:
    """The group checks of one run (see the module docstring)."""

    def __init__(self, sim: Simulation, group: SimGroup) -> None:
        self.sim = sim
        self.group = group
        self.counts = {"assignments": 0, "handed_out": 0}

    def holders(self) -> dict[int, list[str]]:
        """partition -> the members holding it now (see the module docstring)."""
        from meshq.testing.sim.group import GROUP, NODES

        held: dict[int, list[str]] = {}
        for node_id in NODES if self.sim.options.group_members else ():
            core = self.sim.nodes[node_id].core
            if core is None:
                continue
            for member_id, (group, topic, generation, partitions) in core.group_client.holding(self.sim.now_s).items():
                if group == GROUP and topic == TOPIC:
                    for partition in partitions:
                        held.setdefault(partition, []).append(f"{member_id} (generation {generation})")
        return held

    # ------------------------------------------------------------------ safety
    def after_event(self) -> None:
        for partition, members in sorted(self.holders().items()):
            if len(members) > 1:
                raise Violation(f"group members overlap: {TOPIC}/{partition} is held by {' and '.join(members)} "
                                "at once")

    def on_assigned(self, member: SimMember, generation: int, partitions: tuple[int, ...]) -> None:
        self.counts["assignments"] += 1

    def on_handed_out(self, member: SimMember, offset: int, records: list) -> None:
        core = self.sim.nodes[member.node_id].core
        holding = core.group_client.holding(self.sim.now_s).get(member.member_id) if core is not None else None
        partition = records[0].partition
        if holding is None or partition not in holding[3]:
            raise Violation(f"group member {member.name} ({member.member_id}) handed out {TOPIC}/{partition} "
                            f"offsets {records[0].offset}-{records[-1].offset} without holding it "
                            f"(it holds {holding[3] if holding else 'nothing'})")
        self.counts["handed_out"] += len(records)
        self.sim.checker.on_consumed(partition, offset, records, member=100_000 * member.index + member.episode)

    # ------------------------------------------------------------------ liveness
    def high_watermarks(self) -> dict[int, int] | None:
        out = {}
        for partition in range(self.sim.options.partitions):
            leader = self.sim.checker._partition_leader(TOPIC, partition)
            if leader is None:
                return None
            out[partition] = leader.core.partitions[(TOPIC, partition)].high_watermark
        return out

    def waiting_for(self) -> str | None:
        """What the group and the consumer have not reached yet, or None (see the module docstring)."""
        marks = self.high_watermarks()
        if marks is None:
            return "a partition has no leader"
        holders = self.holders()
        live = {m.member_id: m for m in self.group.live_members() if m.member_id is not None}
        damaged = self.sim.checker.damaged_partitions
        for partition in sorted(marks) if self.sim.options.group_members else ():
            members = holders.get(partition, [])
            if len(members) != 1:
                return f"{TOPIC}/{partition} is held by {len(members)} members of the group"
            holder = next((m for m in live.values() if partition in m.state.partitions
                           and members[0].startswith(m.member_id + " ")), None)
            if holder is None:
                return f"{TOPIC}/{partition} is held by {members[0]}, which is not a live member"
            position = holder.state.positions.get(partition)
            if partition not in damaged and (position is None or position < marks[partition]):
                return (f"the group has read {TOPIC}/{partition} up to {position} of {marks[partition]} "
                        f"({holder.name})")
        consumer = self.sim.consumer.state
        if consumer is None:
            return "the consumer is restarting"
        for partition in sorted(set(marks) - damaged):
            position = consumer.positions.get(partition)
            if position is None or position < marks[partition]:
                return f"the consumer has read {TOPIC}/{partition} up to {position} of {marks[partition]}"
        return None

    def summary(self) -> dict[str, Any]:
        return {"group_" + k: v for k, v in self.counts.items()}
