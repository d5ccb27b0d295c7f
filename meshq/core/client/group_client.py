"""The ``group_client`` room: this node's consumer-group members, kept alive by the core.

Theory of operation
-------------------
``JoinGroup`` makes a member (``meshq.core.client.group_member.GroupMember``) with a fresh
id (``<node id>-<8 hex digits>``) and answers with it at once; from then on the room, not the
consumer's poll loop, sends the member's ``join_group`` and ``group_heartbeat`` to the
group's coordinator (the leader of its ``__consumer_offsets`` partition), one at a time,
each waiting at most ``ATTEMPT_S``. A timer of kind ``group_member`` (keyed by member id)
fires at the member's next deadline: its next request, or the end of its session.

The consumer waits on the member with ``WatchGroup`` (answered with the member's
``GroupView`` once its version changes), lets go of its partitions with ``ReleaseGroup``
after a rebalance began (having committed), and ends with ``LeaveGroup`` (one
``leave_group`` to the coordinator, so the others rebalance at once).

A retriable failure other than a rebalance drops the cached metadata of the offsets topic, so
the next attempt finds the coordinator afresh.
"""

from __future__ import annotations

from typing import Any

from meshq.config import validate_topic_name
from meshq.core import wire
from meshq.core.client.group_member import GroupMember, GroupView
from meshq.core.cluster.agreement import OFFSETS_TOPIC
from meshq.core.events import Fail, JoinGroup, LeaveGroup, ReleaseGroup, Resolve, WatchGroup
from meshq.core.hashing import stable_hash64
from meshq.core.partitions.coordinator import SESSION_MARGIN_S
from meshq.core.room import Room
from meshq.errors import MeshqError, NodeStoppedError, NotLeaderError, RebalanceError, UsageError

ATTEMPT_S = 1.5  # one join/heartbeat/leave waits at most this long for its answer
MAX_MEMBERS = 1_000  # members one node may run at once


class GroupClient(Room):
    """This node's consumer-group members (see the module docstring)."""

    COMMANDS = {JoinGroup: "_cmd_join", WatchGroup: "_cmd_watch", ReleaseGroup: "_cmd_release",
                LeaveGroup: "_cmd_leave"}
    TIMERS = {"group_member": "_on_timer"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.members: dict[str, GroupMember] = {}
        self._watchers: dict[str, list[tuple[int, Any]]] = {}  # member -> (version known, waiter)
        self._armed: dict[str, float] = {}  # member -> deadline its timer is set for

    # ------------------------------------------------------------------ commands
    def _cmd_join(self, command: JoinGroup, now_s: float) -> None:
        try:
            validate_topic_name(command.group)
            validate_topic_name(command.topic)
            if len(self.members) >= MAX_MEMBERS:
                raise UsageError(f"this node already runs {MAX_MEMBERS} group members; close some consumers")
        except MeshqError as exc:
            self.out.emit(Fail(command.waiter, exc))
            return
        member_id = f"{self.node_id}-{self.core.rng.getrandbits(32):08x}"
        while member_id in self.members:
            member_id = f"{self.node_id}-{self.core.rng.getrandbits(32):08x}"
        self.members[member_id] = GroupMember(
            command.group, command.topic, member_id, command.partitions, self.config.heartbeat_interval_s,
            self.config.failure_timeout_s + SESSION_MARGIN_S, now_s)
        self.out.emit(Resolve(command.waiter, member_id))
        self._step(member_id, now_s)

    def _cmd_watch(self, command: WatchGroup, now_s: float) -> None:
        member = self.members.get(command.member)
        if member is None:
            self.out.emit(Fail(command.waiter, UsageError(f"group member {command.member} has left")))
        elif member.version != command.version:
            self.out.emit(Resolve(command.waiter, member.view()))
        else:
            self._watchers.setdefault(command.member, []).append((command.version, command.waiter))

    def _cmd_release(self, command: ReleaseGroup, now_s: float) -> None:
        member = self.members.get(command.member)
        if member is not None:
            member.release(command.generation, now_s)
            self._step(command.member, now_s)
        self.out.emit(Resolve(command.waiter, None))

    def _cmd_leave(self, command: LeaveGroup, now_s: float) -> None:
        member = self.members.pop(command.member, None)
        self._armed.pop(command.member, None)
        if member is None:
            self.out.emit(Resolve(command.waiter, False))
            return
        member.leave()
        self._notify(command.member, member)
        self._watchers.pop(command.member, None)
        body = {"group": member.group, "member": member.member_id}
        self._send(member, "leave_group", body, now_s,
                   lambda message: self.out.emit(Resolve(command.waiter, True)),
                   lambda error: self.out.emit(Resolve(command.waiter, False)))

    def stop(self, error: NodeStoppedError) -> None:
        for watchers in self._watchers.values():
            for _version, waiter in watchers:
                self.out.emit(Fail(waiter, error))
        self._watchers.clear()

    def view(self, member_id: str) -> GroupView | None:
        member = self.members.get(member_id)
        return member.view() if member is not None else None

    def holding(self, now_s: float) -> dict[str, tuple[str, str, int, tuple[int, ...]]]:
        """member id -> (group, topic, generation, partitions) of each member that holds partitions
        now: assigned, and its session (as the member itself counts it) not over."""
        return {member_id: (m.group, m.topic, m.generation, m.partitions)
                for member_id, m in sorted(self.members.items())
                if m.state == "assigned" and now_s <= m.session_end_s()}

    # ------------------------------------------------------------------ the member's requests
    def _on_timer(self, member_id: str, now_s: float) -> None:
        if self._armed.get(member_id, float("inf")) > now_s:
            return  # the member left, or this is an earlier timer since moved
        del self._armed[member_id]
        self._step(member_id, now_s)

    def _step(self, member_id: str, now_s: float) -> None:
        """Check the member's session, send what is due, tell the consumer, arm the next timer."""
        member = self.members.get(member_id)
        if member is None:
            return
        member.check_session(now_s)
        kind = member.next_request(now_s)
        if kind == "join":
            body = {"group": member.group, "topic": member.topic, "member": member_id,
                    "partitions": member.partition_count, "seq": member.join_seq}
            self._send(member, "join_group", body, now_s,
                       lambda m, sent_s=now_s: member.on_join_answer(
                           m.body["state"], m.body["generation"], m.body["partitions"],
                           m.body["session_timeout_ms"] / 1000, sent_s, self.core.now_s),
                       lambda e: member.on_failed(e, self.core.now_s), then=member_id)
        elif kind == "heartbeat":
            body = {"group": member.group, "member": member_id, "generation": member.generation}
            self._send(member, "group_heartbeat", body, now_s,
                       lambda m, sent_s=now_s: member.on_heartbeat_answer(
                           m.body["state"], m.body["generation"], sent_s, self.core.now_s),
                       lambda e: member.on_failed(e, self.core.now_s), then=member_id)
        self._notify(member_id, member)
        deadline_s = member.next_deadline()
        if deadline_s is not None:
            armed = self._armed.get(member_id)
            if armed is None or deadline_s < armed:
                self._armed[member_id] = deadline_s
                self.out.schedule(deadline_s, "group_member", member_id)

    def _notify(self, member_id: str, member: GroupMember) -> None:
        watchers = self._watchers.get(member_id)
        if not watchers:
            return
        waiting = []
        for version, waiter in watchers:
            if version != member.version:
                self.out.emit(Resolve(waiter, member.view()))
            else:
                waiting.append((version, waiter))
        self._watchers[member_id] = waiting

    def _send(self, member: GroupMember, type_: str, body: dict, now_s: float, on_reply: Any, on_error: Any,
              then: str | None = None) -> None:
        """Send ``type_`` to the group's coordinator (one attempt); ``then``: step that member after."""

        def after() -> None:
            if then is not None:
                self._step(then, self.core.now_s)

        def reply(message: wire.Message) -> None:
            on_reply(message)
            after()

        def error(exc: MeshqError) -> None:
            if exc.retriable and not isinstance(exc, RebalanceError):
                self.core.client.forget(OFFSETS_TOPIC)  # the coordinator moved: find it afresh next time
            on_error(exc)
            after()

        def ready(exc: MeshqError | None) -> None:
            if exc is not None:
                error(exc)
                return
            meta = self.core.client.metadata.get(OFFSETS_TOPIC)
            if meta is None:
                error(NotLeaderError("the metadata of the offsets topic was dropped meanwhile"))
                return
            partition = stable_hash64(member.group.encode()) % meta["config"].partitions
            leader = self.core.client.leader_of(OFFSETS_TOPIC, partition)
            if leader is None:
                error(NotLeaderError(f"no coordinator known for group {member.group!r} (an election may be under way)"))
                return
            self.out.request(leader, type_, body, (), self.core.now_s, ATTEMPT_S, reply, error)

        self.core.client.with_metadata(OFFSETS_TOPIC, now_s, now_s + ATTEMPT_S, ready, False)
