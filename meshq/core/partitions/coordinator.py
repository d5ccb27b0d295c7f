"""Consumer-group membership at the group's coordinator: members, generations, assignment.

Theory of operation
-------------------
The coordinator of group G is the leader of the ``__consumer_offsets`` partition that
stores G's offsets (``meshq.core.partitions.groups``). Next to the offsets it keeps, in
memory only, G's *members*: each one a consumer (``node.consumer(topic, group=G)``) with a
member id it chose, the topic it reads, and a *session deadline* that every join and
heartbeat pushes ``session_timeout_s`` (the node's ``failure_timeout_s`` + ``SESSION_MARGIN_S``)
into the future. A member whose deadline passes is evicted (its node died or was cut off).

The protocol is eager. A group is ``empty``, ``rebalancing`` or ``stable``; its *generation*
numbers its assignments. Any change of membership (a new member joins, one leaves, one is
evicted) starts a rebalance: the generation does not change yet, the last assignment stays
valid, and every member learns of the rebalance at its next heartbeat. A member then stops
fetching all its partitions, commits its positions (commits with the current generation are
still accepted), and joins again. Only when every member has joined since the rebalance
began (or was evicted: a member that does not rejoin within ``session_timeout_s`` of the
start is removed) does the generation move on and a new assignment go out — so no partition
is held by two members at once: each one held under the old generation was let go first.
A join counts as that proof only if the member was sent it after it let go: joins carry the
member's count of joins sent (``seq``), and a member that was handed partitions of the current
generation rejoins only with a join numbered above the one whose answer handed them out. An
earlier join delayed on the wire (held by a paused coordinator, simulator seed 241) or a
duplicate is answered ``rebalancing`` but ends nothing (``_let_go``).

A member's own rule completes this (``meshq.core.client.group_member``): it lets go of its
partitions by itself once ``session_timeout_s`` passed since the send time of the last
heartbeat the coordinator answered, which is never later than the coordinator's eviction.
A coordinator that lost its lease (it may be deposed) answers nothing, and a new coordinator
starts with no members: it completes no rebalance before ``session_timeout_s`` after it took
over (``fence_until_s``), by which time every member of the old coordinator has let go.
Generations start at ``leader epoch * GENERATIONS_PER_EPOCH``, so they only grow across
coordinators. Members of the old coordinator learn it from ``unknown_member`` and join again;
committed offsets are in the replicated log and survive the move.

Commits carrying a member and a generation are refused (``stale_generation``,
``unknown_member``: retriable, the member rejoins) unless the generation is the group's and
the member holds each committed partition in it.

Assignment is *range* over the sorted member ids, per topic: member i of m gets the
partitions ``[i*n//m, (i+1)*n//m)``; n is the largest partition count a member reported.

Transitions of ``GroupMembership`` (h11-style; ``*`` is any state)::

    state        event                          condition                   next
    ----------   ----------------------------   -------------------------   ---------------------
    empty        join (new member)              -                           rebalancing -> complete?
    stable       join (new member, or topic     -                           rebalancing
                 or partition count changed)
    stable       join (known member)            -                           stable (its assignment)
    rebalancing  join                           -                           rebalancing -> complete?
    *            heartbeat (known member)       -                           same (deadline pushed)
    *            heartbeat / commit (unknown)   -                           same (unknown_member)
    stable       leave / session expired        members remain              rebalancing
    rebalancing  leave / session expired /      -                           rebalancing -> complete?
                 rebalance deadline passed
    *            leave / expiry                 no member remains           empty

``complete?``: once every member has rejoined and the fence has passed, the generation moves
on, the new assignment is computed and the group is ``stable``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshq.core import wire
from meshq.core.cluster.agreement import OFFSETS_TOPIC
from meshq.core.room import Room
from meshq.errors import StaleGenerationError, UnknownMemberError

SESSION_MARGIN_S = 1.0  # a member's session outlives the failure timeout by this much
GENERATIONS_PER_EPOCH = 1_000_000  # generation = leader epoch * this + rebalances under that leader
MAX_MEMBERS = 10_000  # per group: joins beyond are refused (a bound on the coordinator's memory)


@dataclass(slots=True)
class Member:
    """One member of a group, as its coordinator sees it."""

    member_id: str
    topic: str
    partition_count: int
    deadline_s: float  # its session ends then unless a join or heartbeat comes first
    rejoined: bool  # joined since the current rebalance began (with a join that shows it let go)
    # the highest ``seq`` of its joins answered with its (non-empty) partitions of the current
    # generation; None: none handed out to it in this generation (it holds nothing of it)
    handed_seq: int | None = None


@dataclass(frozen=True, slots=True)
class JoinAnswer:
    """What a join is answered: while ``rebalancing`` no partitions (ask again); once ``stable``,
    the member's partitions in ``generation``."""

    state: str
    generation: int
    partitions: list[int]


@dataclass
class GroupMembership:
    """One group's members, generation and assignment (see the module docstring)."""

    group: str
    session_timeout_s: float
    generation: int = 0
    fence_until_s: float = 0.0  # no rebalance completes before (a new coordinator's wait)
    state: str = "empty"  # empty | rebalancing | stable
    members: dict[str, Member] = field(default_factory=dict)
    # member -> partitions of ``generation`` (kept while rebalancing: still held until let go)
    assignment: dict[str, list[int]] = field(default_factory=dict)
    rebalance_deadline_s: float = 0.0  # members that have not rejoined by then are removed

    # ------------------------------------------------------------------ events
    def join(self, member_id: str, topic: str, partition_count: int, now_s: float,
             seq: int | None = None) -> JoinAnswer:
        """A join (``seq``: the member's count of joins sent, growing; None from a member that names no
        order). During a rebalance it counts as the member's rejoin only if it shows that the member
        holds nothing of the current generation (``_let_go``)."""
        member = self.members.get(member_id)
        if member is None:
            if len(self.members) >= MAX_MEMBERS:
                raise UnknownMemberError(f"group {self.group!r} already has {MAX_MEMBERS} members; "
                                         "close some consumers and retry")
            self.members[member_id] = Member(member_id, topic, partition_count, now_s + self.session_timeout_s, False)
            self._begin_rebalance(now_s)
        else:
            member.deadline_s = now_s + self.session_timeout_s
            if member.topic != topic or member.partition_count != partition_count:
                member.topic, member.partition_count = topic, partition_count
                if self.state == "stable":
                    self._begin_rebalance(now_s)
        member = self.members[member_id]
        if self.state == "rebalancing" and _let_go(member, seq):
            member.rejoined = True
            self._maybe_complete(now_s)
        if self.state == "stable":
            partitions = list(self.assignment.get(member_id, []))
            if partitions:  # from now on the member may hold them (if this answer reaches it in time)
                member.handed_seq = max(-1 if member.handed_seq is None else member.handed_seq,
                                        -1 if seq is None else seq)
            return JoinAnswer("stable", self.generation, partitions)
        return JoinAnswer("rebalancing", self.generation, [])

    def heartbeat(self, member_id: str, now_s: float) -> tuple[str, int]:
        """Push the member's deadline; returns (state, generation): a member holding partitions of
        another generation, or hearing ``rebalancing``, lets them go and joins again."""
        member = self._known(member_id)
        member.deadline_s = now_s + self.session_timeout_s
        return self.state, self.generation

    def leave(self, member_id: str, now_s: float) -> bool:
        """The member closed: the others rebalance at once. False if it was not a member."""
        if self.members.pop(member_id, None) is None:
            return False
        self._after_removal(now_s)
        return True

    def expire(self, now_s: float) -> list[str]:
        """Evict members whose session ended (and, past the rebalance deadline, those that did
        not rejoin); complete a rebalance whose fence has passed. Returns the evicted ids."""
        evicted = [m for m, member in sorted(self.members.items()) if member.deadline_s <= now_s]
        if self.state == "rebalancing" and now_s >= self.rebalance_deadline_s:
            evicted += [m for m, member in sorted(self.members.items())
                        if not member.rejoined and m not in evicted]
        for member_id in evicted:
            del self.members[member_id]
        if evicted:
            self._after_removal(now_s)
        elif self.state == "rebalancing":
            self._maybe_complete(now_s)
        return evicted

    def check_commit(self, member_id: str, generation: int, offsets: list[tuple[str, int]]) -> None:
        """Refuse a commit of ``offsets`` ((topic, partition) pairs) unless ``member_id`` holds each
        of them in ``generation``, the group's current one."""
        member = self._known(member_id)
        if generation != self.generation:
            raise StaleGenerationError(
                f"group {self.group!r} is at generation {self.generation}, the commit of {member_id} was made in "
                f"{generation}: its partitions may have moved; the member rejoins and the records since its "
                "last commit are read again")
        held = set(self.assignment.get(member_id, ()))
        for topic, partition in offsets:
            if topic != member.topic or partition not in held:
                raise StaleGenerationError(
                    f"{member_id} does not hold {topic}/{partition} in generation {generation} of group "
                    f"{self.group!r} (it holds {member.topic} {sorted(held)}); the member rejoins")

    # ------------------------------------------------------------------ views
    def next_deadline(self) -> float | None:
        deadlines = [member.deadline_s for member in self.members.values()]
        if self.state == "rebalancing":
            deadlines.append(self.fence_until_s if self._all_rejoined() else self.rebalance_deadline_s)
        return min(deadlines) if deadlines else None

    def report(self) -> dict:
        """The group as ``status`` shows it."""
        return {"generation": self.generation, "state": self.state,
                "members": [{"member": m, "topic": member.topic,
                             "partitions": list(self.assignment.get(m, [])) if self.state == "stable" else []}
                            for m, member in sorted(self.members.items())]}

    # ------------------------------------------------------------------ transitions
    def _known(self, member_id: str) -> Member:
        member = self.members.get(member_id)
        if member is None:
            raise UnknownMemberError(
                f"{member_id} is not a member of group {self.group!r} at this coordinator (its session ended, "
                "or the coordinator moved); the member joins again")
        return member

    def _begin_rebalance(self, now_s: float) -> None:
        if self.state != "rebalancing":
            self.state = "rebalancing"
            self.rebalance_deadline_s = now_s + self.session_timeout_s
            for member in self.members.values():
                member.rejoined = False

    def _after_removal(self, now_s: float) -> None:
        for member_id in [m for m in self.assignment if m not in self.members]:
            del self.assignment[member_id]  # an evicted member has let go by itself (its session rule)
        if not self.members:
            self.state = "empty"
            self.assignment = {}
            return
        self._begin_rebalance(now_s)
        self._maybe_complete(now_s)

    def _all_rejoined(self) -> bool:
        return all(member.rejoined for member in self.members.values())

    def _maybe_complete(self, now_s: float) -> None:
        if self.state != "rebalancing" or not self._all_rejoined() or now_s < self.fence_until_s:
            return
        self.generation += 1
        self.assignment = assign_range(self.members)
        for member in self.members.values():
            member.handed_seq = None  # nothing of the new generation is handed out yet
        self.state = "stable" if self.members else "empty"


def _let_go(member: Member, seq: int | None) -> bool:
    """Does a join of ``member`` numbered ``seq`` show that it holds nothing of the current generation?

    Yes if none of its partitions of this generation was handed out to it. Otherwise only a join
    the member sent *after* the one whose answer handed them out: a member sends one join at a
    time and sends none while it holds partitions, so such a join was sent after it let go of
    them (or gave up waiting for that answer, which it then drops as late). An earlier join
    delayed on the wire or duplicated (its ``seq`` is not higher), or one that names no order,
    shows nothing: the member may still hold its partitions and be fetching.
    """
    if member.handed_seq is None:
        return True
    return seq is not None and seq > member.handed_seq


def assign_range(members: dict[str, Member]) -> dict[str, list[int]]:
    """Range assignment per topic over the sorted member ids (deterministic: same members, same answer)."""
    assignment: dict[str, list[int]] = {m: [] for m in sorted(members)}
    by_topic: dict[str, list[str]] = {}
    for member_id, member in sorted(members.items()):
        by_topic.setdefault(member.topic, []).append(member_id)
    for _topic, ids in sorted(by_topic.items()):
        count = max(members[m].partition_count for m in ids)
        for i, member_id in enumerate(ids):
            assignment[member_id] = list(range(i * count // len(ids), (i + 1) * count // len(ids)))
    return assignment


class GroupCoordinator(Room):
    """Group membership at the coordinator, in memory only (see the module docstring)."""

    SERVES = {"join_group": "serve_join", "group_heartbeat": "serve_heartbeat", "leave_group": "serve_leave"}
    TIMERS = {"group_session": "_on_session_timer"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.groups: dict[str, GroupMembership] = {}
        self._armed: dict[str, float] = {}  # group -> the deadline its ``group_session`` timer is set for
        self._leading_since_s: dict[int, float] = {}  # offsets partition -> when this node began leading it
        # group -> its last generation here, kept after the group emptied (and was dropped), so a
        # generation is never handed out twice by this coordinator
        self._last_generation: dict[str, int] = {}

    @property
    def session_timeout_s(self) -> float:
        return self.config.failure_timeout_s + SESSION_MARGIN_S

    # ------------------------------------------------------------------ requests
    def serve_join(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        self.core.access.check("consume", body["topic"])
        group = self._group(body["group"], now_s)
        answer = group.join(body["member"], body["topic"], body["partitions"], now_s, body.get("seq"))
        self._arm(group)
        self.out.reply(route, message.request_id, "join_group_ok", {
            "state": answer.state, "generation": answer.generation, "partitions": answer.partitions,
            "session_timeout_ms": int(self.session_timeout_s * 1000)})

    def serve_heartbeat(self, route: Any, message: wire.Message, now_s: float) -> None:
        group = self._group(message.body["group"], now_s)
        state, generation = group.heartbeat(message.body["member"], now_s)
        self.out.reply(route, message.request_id, "group_heartbeat_ok", {"state": state, "generation": generation})

    def serve_leave(self, route: Any, message: wire.Message, now_s: float) -> None:
        group = self._group(message.body["group"], now_s)
        left = group.leave(message.body["member"], now_s)
        self._arm(group)
        self.out.reply(route, message.request_id, "leave_group_ok", {"left": left})

    def check_commit(self, group_name: str, member_id: str, generation: int, offsets: list[tuple[str, int]]) -> None:
        """Called by the offsets room before it stores a member's commit (this node leads the partition)."""
        group = self.groups.get(group_name)
        if group is None:
            raise UnknownMemberError(
                f"{member_id} is not a member of group {group_name!r} at this coordinator (it may have just "
                "taken over); the member joins again")
        group.check_commit(member_id, generation, offsets)

    # ------------------------------------------------------------------ leadership and timers
    def on_leadership(self, partition: int, gained: bool, now_s: float) -> None:
        """This node began or stopped leading offsets partition ``partition``: membership starts empty
        (and fenced) or is dropped."""
        if gained:
            self._leading_since_s[partition] = now_s
            return
        self._leading_since_s.pop(partition, None)
        for name in [g for g in self.groups if self.core.groups.offsets_partition(g) == partition]:
            del self.groups[name]
            self._armed.pop(name, None)
        for name in [g for g in self._last_generation if self.core.groups.offsets_partition(g) == partition]:
            del self._last_generation[name]  # a later leadership starts from its own (higher) epoch

    def _group(self, name: str, now_s: float) -> GroupMembership:
        """The group, created on first use; only the coordinator with a valid lease answers."""
        partition = self.core.groups.offsets_partition(name)
        state = self.core.server.leader_state(OFFSETS_TOPIC, partition)
        self.core.server.check_lease(state, now_s)  # a possibly deposed coordinator renews no session
        group = self.groups.get(name)
        if group is None:
            since_s = self._leading_since_s.setdefault(partition, now_s)
            epoch = state.replica.epoch
            # The first leader of the partition (epoch 1) had no predecessor whose members to wait for.
            generation = max(epoch * GENERATIONS_PER_EPOCH, self._last_generation.get(name, 0))
            group = GroupMembership(name, self.session_timeout_s, generation=generation,
                                    fence_until_s=since_s + self.session_timeout_s if epoch > 1 else 0.0)
            self.groups[name] = group
        return group

    def _arm(self, group: GroupMembership) -> None:
        deadline_s = group.next_deadline()
        if deadline_s is None:
            return
        armed = self._armed.get(group.group)
        if armed is None or deadline_s < armed:
            self._armed[group.group] = deadline_s
            self.out.schedule(deadline_s, "group_session", group.group)

    def _on_session_timer(self, name: str, now_s: float) -> None:
        group = self.groups.get(name)
        if group is None or self._armed.get(name, float("inf")) > now_s:
            return  # dropped, or an earlier timer of a deadline since moved later (a later one is armed)
        del self._armed[name]
        evicted = group.expire(now_s)
        if evicted:
            self.core.counters["group_members_evicted"] = self.core.counters.get("group_members_evicted", 0) + len(evicted)
        if not group.members and group.state == "empty":
            self._last_generation[name] = group.generation
            del self.groups[name]
            return
        self._arm(group)

    def report(self) -> dict[str, dict]:
        """group -> its membership as ``status`` shows it."""
        return {name: group.report() for name, group in sorted(self.groups.items())}
