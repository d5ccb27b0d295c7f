"""Requests: the local API calls other than produce, sent to whichever node can answer.

Theory of operation
-------------------
Each command (a typed record of ``meshq.core.events``, with a waiter the runtime resolves)
becomes a request to a
storage node: ``metadata`` and ``create_topic`` to any storage peer, ``fetch`` and
``list_offsets`` to the partition's leader, ``commit`` and ``committed`` to the group's
coordinator (the leader of its ``__consumer_offsets`` partition), ``status`` to every live
storage node (merged: each partition as its leader sees it), ``leave`` to the node that
should leave. A request routed to a leader (``RoutedCall``) retries while leadership moves
(no leader known, not_leader, not enough replicas, a silent leader): it refreshes metadata
and sends again after ``METADATA_RETRY_S``, until the command's deadline. A command that
needs a node this one does not know yet (a fresh client) is tried again every 50 ms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from meshq.config import TopicConfig, refuse_reserved_topic, validate_group_name
from meshq.core import wire
from meshq.core.client.metadata import METADATA_RETRY_S
from meshq.core.cluster.agreement import OFFSETS_TOPIC
from meshq.core.events import (
    AskLeave,
    Command,
    CommitOffsets,
    CreateTopic,
    Fail,
    Fetch,
    FetchCommitted,
    GetMetadata,
    GetStatus,
    ListOffsets,
    Resolve,
    ShareAck,
    ShareFetch,
    WaitReady,
)
from meshq.core.hashing import stable_hash64
from meshq.core.room import Room
from meshq.core.status import merge_pubsub, merge_status
from meshq.errors import (
    MeshqError,
    NodeStoppedError,
    NotLeaderError,
    RebalanceError,
    TimeoutError,
    UsageError,
)


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What a fetch returned: raw batches plus the partition's bounds."""

    topic: str
    partition: int
    data: bytes
    high_watermark: int
    log_start_offset: int


@dataclass(slots=True)
class RoutedCall:
    """A command on its way to a partition's leader, retried while leadership moves."""

    command: Command
    topic: str
    partition_of: Callable[[], int]
    type: str
    body: dict
    convert: Callable[[wire.Message], Any]
    auto_create: bool
    retry: bool
    deadline_s: float
    ready: Callable[[MeshqError | None], None] | None = None  # bound to this call once built
    payloads: tuple = ()


class Requests(Room):
    """Local API calls other than produce (see the module docstring)."""

    # command type -> method (each runs through ``run``: refused once the node stops, errors fail it)
    KINDS = {GetMetadata: "_cmd_metadata", WaitReady: "_cmd_wait_ready", CreateTopic: "_cmd_create_topic",
             Fetch: "_cmd_fetch", ListOffsets: "_cmd_list_offsets", CommitOffsets: "_cmd_commit",
             FetchCommitted: "_cmd_committed", GetStatus: "_cmd_status", AskLeave: "_cmd_leave",
             ShareFetch: "_cmd_share_fetch", ShareAck: "_cmd_share_ack"}
    COMMANDS = dict.fromkeys(KINDS, "run")
    TIMERS = {"command_retry": "_retry_command", "wait_ready": "_retry_wait_ready", "routed_retry": "_routed_resume"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self._commit_seq = 0  # commits asked so far: each carries its number (offset_commit ``seq``)

    def run(self, command: Command, now_s: float) -> None:
        name = self.KINDS.get(type(command))
        if name is None:
            raise UsageError(f"unknown command {type(command).__name__}")
        if self.core.stopped:
            self.out.emit(Fail(command.waiter, NodeStoppedError("the node is stopped")))
            return
        if command.deadline_s is None:  # once: a command run again keeps its deadline
            extra_s = command.max_wait_s if isinstance(command, (Fetch, ShareFetch)) else 0.0
            command.deadline_s = now_s + extra_s + self.config.request_timeout_s
        try:
            getattr(self, name)(command, now_s)
        except MeshqError as exc:
            self.out.emit(Fail(command.waiter, exc))

    def _simple_request(self, command: Command, peer: str | None, type_: str, body: dict, now_s: float,
                        convert: Callable[[wire.Message], Any]) -> None:
        deadline_s = command.deadline_s
        if peer is None and now_s + 0.05 < deadline_s:
            self.out.schedule(now_s + 0.05, "command_retry", command)
            return
        if peer is None:
            self.out.emit(Fail(command.waiter, TimeoutError(
                "no storage node is reachable: check --seed / mDNS, and that a `meshq node` is running")))
            return
        self.out.request(peer, type_, body, (), now_s, max(0.001, deadline_s - now_s),
                         lambda m: self.out.emit(Resolve(command.waiter, convert(m))),
                         lambda e: self.out.emit(Fail(command.waiter, e)))

    def _cmd_metadata(self, command: Command, now_s: float) -> None:
        topic = command.topic
        deadline_s = command.deadline_s
        if topic is None:
            def keep(message: wire.Message) -> dict:
                self.core.client.absorb_metadata(message.body)
                return message.body

            self._simple_request(command, self.core.client.any_storage_peer(), "metadata",
                                 {"topics": None, "auto_create": False}, now_s, keep)
            return
        if command.refresh:
            self.core.client.forget(topic)

        def ready(error: MeshqError | None) -> None:
            if error is not None:
                self.out.emit(Fail(command.waiter, error))
            elif topic not in self.core.client.metadata:
                # An earlier waiter of the same answer dropped it again (a produce that then
                # found no connected leader forgets it): wait again, as the producer does.
                self.core.client.with_metadata(topic, self.core.now_s, deadline_s, ready, command.auto_create)
            else:
                self.out.emit(Resolve(command.waiter, self.core.client.metadata[topic]))

        self.core.client.with_metadata(topic, now_s, deadline_s, ready, command.auto_create)

    def _cmd_wait_ready(self, command: Command, now_s: float) -> None:
        """Resolve once at least one storage node (maybe this one) answers requests."""
        deadline_s = command.deadline_s
        if self.core.client.any_storage_peer() is not None:
            self.out.emit(Resolve(command.waiter, True))
        elif now_s >= deadline_s:
            self.out.emit(Fail(command.waiter, TimeoutError(
                "no storage node answered: check --seed / mDNS, and that a `meshq node` is running")))
        else:
            self.out.schedule(min(deadline_s, now_s + 0.02), "wait_ready", command)

    def _cmd_create_topic(self, command: Command, now_s: float) -> None:
        config: TopicConfig = command.config
        refuse_reserved_topic(config.name)

        def convert(message: wire.Message) -> TopicConfig:
            self.core.client.absorb_metadata({"members": [], "topics": [message.body["topic"]]})
            return TopicConfig.from_wire(message.body["topic"]["config"])

        self._simple_request(command, self.core.client.any_storage_peer(), "create_topic",
                             {"config": config.to_wire(), "if_not_exists": command.if_not_exists},
                             now_s, convert)

    def _partition_command(self, command: Command, now_s: float, type_: str, body: dict,
                           convert: Callable[[wire.Message], Any], retry: bool = True) -> None:
        topic, partition = command.topic, command.partition
        self._routed_command(command, now_s, topic, lambda: partition, type_, body, convert, False, retry)

    def _routed_command(self, command: Command, now_s: float, topic: str, partition_of: Callable[[], int],
                        type_: str, body: dict, convert: Callable[[wire.Message], Any], auto_create: bool,
                        retry: bool, payloads: tuple = ()) -> None:
        """Send ``type_`` to the leader of ``topic``/``partition_of()``; while leadership moves (no leader
        known, not_leader, not enough replicas, a silent leader) refresh metadata and retry until the
        command's deadline."""
        deadline_s = command.deadline_s
        call = RoutedCall(command, topic, partition_of, type_, body, convert, auto_create, retry, deadline_s,
                          payloads=payloads)
        call.ready = partial(self._routed_ready, call)
        self.core.client.with_metadata(topic, now_s, deadline_s, call.ready, auto_create)

    def _routed_ready(self, call: RoutedCall, error: MeshqError | None) -> None:
        """Metadata for ``call``'s topic is known (or an error): send it to the partition's leader."""
        if error is not None:
            self.out.emit(Fail(call.command.waiter, error))
            return
        topic = call.topic
        if topic not in self.core.client.metadata:
            self.core.client.with_metadata(topic, self.core.now_s, call.deadline_s, call.ready, call.auto_create)
            return
        partition = call.partition_of()
        leader = self.core.client.leader_of(topic, partition)
        if leader is None:
            self._routed_retry_or_fail(call, NotLeaderError(
                f"no leader known for {topic}/{partition} (an election may be under way)"))
            return
        now = self.core.now_s
        # One attempt waits at most half the failure timeout (a live leader answers in
        # milliseconds), so a leader that just died costs one attempt, not the whole deadline.
        attempt_s = call.deadline_s - now if not call.retry else min(call.deadline_s - now,
                                                                     max(0.5, self.config.failure_timeout_s / 2))
        self.out.request(leader, call.type, call.body, call.payloads, now, max(0.001, attempt_s),
                         lambda m: self.out.emit(Resolve(call.command.waiter, call.convert(m))),
                         partial(self._routed_retry_or_fail, call))

    def _routed_retry_or_fail(self, call: RoutedCall, error: MeshqError) -> None:
        now = self.core.now_s
        if isinstance(error, RebalanceError):
            # The coordinator answered: this member's generation is over. Sending it again cannot
            # help (the member rejoins), so it fails at once.
            self.out.emit(Fail(call.command.waiter, error))
            return
        if error.retriable:
            # The leader moved, died or is unknown: whoever asks next (this call's retry, or the
            # caller's own, as a consumer's) starts from fresh metadata.
            self.core.client.forget(call.topic)
        if (not call.retry or not error.retriable or self.core.stopped
                or now + METADATA_RETRY_S >= call.deadline_s):
            self.out.emit(Fail(call.command.waiter, error))
            return
        self.out.schedule(now + METADATA_RETRY_S, "routed_retry", call)

    def _routed_resume(self, call: RoutedCall, now_s: float) -> None:
        """The ``routed_retry`` timer: ask for fresh metadata, then send ``call`` again."""
        self.core.client.with_metadata(call.topic, now_s, call.deadline_s, call.ready, call.auto_create)

    def _retry_command(self, command: Command, now_s: float) -> None:
        """The ``command_retry`` timer: run ``command`` again (the node it needs may be known now)."""
        self.run(command, now_s)

    def _retry_wait_ready(self, command: Command, now_s: float) -> None:
        self._cmd_wait_ready(command, now_s)

    def _cmd_fetch(self, command: Command, now_s: float) -> None:
        body = {"topic": command.topic, "partition": command.partition, "offset": command.offset,
                "max_bytes": command.max_bytes, "max_wait_ms": int(command.max_wait_s * 1000)}

        def convert(message: wire.Message) -> FetchResult:
            b = message.body
            return FetchResult(b["topic"], b["partition"], message.payloads[0] if message.payloads else b"",
                               b["high_watermark"], b["log_start_offset"])

        # The consumer retries failed fetches itself (between its polls).
        self._partition_command(command, now_s, "fetch", body, convert, retry=False)

    def _cmd_share_fetch(self, command: ShareFetch, now_s: float) -> None:
        body = {"group": command.group, "topic": command.topic, "partition": command.partition,
                "member": command.member, "max_records": command.max_records,
                "max_wait_ms": int(command.max_wait_s * 1000), "ack_timeout_ms": command.ack_timeout_ms,
                "max_deliveries": command.max_deliveries}
        # (index, batch): the shared consumer decodes them (meshq.core.client.shared)
        self._partition_command(command, now_s, "share_fetch", body,
                                lambda m: (m.body["index"], m.payloads[0] if m.payloads else b""), retry=False)

    def _cmd_share_ack(self, command: ShareAck, now_s: float) -> None:
        body = {"group": command.group, "topic": command.topic, "partition": command.partition,
                "member": command.member}
        self._routed_command(command, now_s, command.topic, lambda: command.partition, "share_ack", body,
                             lambda m: m.body["stale"], False, True, payloads=(command.acks,))  # packed >q offsets

    def _cmd_list_offsets(self, command: Command, now_s: float) -> None:
        body = {"topic": command.topic, "partition": command.partition, "timestamp_ms": command.timestamp_ms}
        self._partition_command(command, now_s, "list_offsets", body, lambda m: m.body["offset"])

    def _coordinator_command(self, command: Command, now_s: float, type_: str, body: dict,
                             convert: Callable[[wire.Message], Any]) -> None:
        group = command.group
        validate_group_name(group)

        def partition_of() -> int:
            return stable_hash64(group.encode()) % self.core.client.metadata[OFFSETS_TOPIC]["config"].partitions

        self._routed_command(command, now_s, OFFSETS_TOPIC, partition_of, type_, body, convert, False, True)

    def _cmd_commit(self, command: Command, now_s: float) -> None:
        offsets = [{"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(command.offsets.items())]
        if command.seq < 0:  # once per command: every attempt (and a command run again) carries it
            self._commit_seq += 1
            command.seq = self._commit_seq
        # (this incarnation, its order): an attempt delayed past a later commit is not applied after it
        body = {"group": command.group, "offsets": offsets, "session": self.core.incarnation, "seq": command.seq}
        if command.member is not None:  # a group member's commit: the coordinator checks it holds them
            body.update(member=command.member, generation=command.generation)
        self._coordinator_command(command, now_s, "offset_commit", body, lambda m: None)

    def _cmd_committed(self, command: Command, now_s: float) -> None:
        self._coordinator_command(
            command, now_s, "offset_fetch", {"group": command.group, "topic": command.topic},
            lambda m: {(e["topic"], e["partition"]): e["offset"] for e in m.body["offsets"]})

    def _cmd_status(self, command: Command, now_s: float) -> None:
        """Ask every live storage node for its local view and merge them (leaders know their partitions).

        With ``node_id`` set, return that one node's own view, unmerged.
        """
        peers = self.core.client.storage_peers()
        only = command.node_id
        deadline_s = command.deadline_s
        if (not peers or (only is not None and only not in self.out.peer_endpoints and only != self.node_id)) \
                and now_s + 0.05 < deadline_s:
            self.out.schedule(now_s + 0.05, "command_retry", command)
            return
        if only is not None:
            if only == self.node_id and self.core.is_storage:
                self.out.emit(Resolve(command.waiter, self.core.status.local_status()))
                return
            if only not in self.out.peer_endpoints:
                self.out.emit(Fail(command.waiter, UsageError(
                    f"node {only!r} is not known here; known storage nodes: {', '.join(peers) or 'none'}")))
                return
            peers = [only]
        if not peers:
            self.out.emit(Fail(command.waiter, TimeoutError(
                "no storage node is reachable: check --seed / mDNS, and that a `meshq node` is running")))
            return
        reports: dict[str, dict] = {}
        # client nodes with pub/sub subscriptions add their part of the ``pubsub`` section only
        subscribers = [] if only is not None else [
            node for node in self.core.pubsub.interested_nodes() if node not in peers and node in self.out.peer_endpoints]
        pubsub_reports: list[dict] = [] if only is not None or self.core.is_storage else [
            {"pubsub": {"nodes": [self.core.pubsub.report()]}}]
        remaining = set(peers) | set(subscribers)

        def finish(peer: str, report: dict | None) -> None:
            remaining.discard(peer)
            if report is not None:
                if peer in subscribers:
                    pubsub_reports.append(report)
                else:
                    reports[peer] = report
            if remaining:
                return
            if not reports:
                self.out.emit(Fail(command.waiter, TimeoutError("no storage node answered the status request")))
            elif only is not None:
                self.out.emit(Resolve(command.waiter, reports[only]))
            else:
                preferred = self.node_id if self.node_id in reports else sorted(reports)[0]
                merged = merge_status(reports, preferred)
                merged["pubsub"] = merge_pubsub([*reports.values(), *pubsub_reports])
                self.out.emit(Resolve(command.waiter, merged))

        timeout_s = max(0.05, min(2.0, deadline_s - now_s))
        for peer in [*peers, *subscribers]:
            self.out.request(peer, "status", {}, (), now_s, timeout_s,
                             lambda m, p=peer: finish(p, m.body["status"]), lambda e, p=peer: finish(p, None))

    def _cmd_leave(self, command: Command, now_s: float) -> None:
        """Ask storage node ``node_id`` (maybe this one) to leave the cluster (``meshq leave``); resolves
        with its ``leave_ok`` body ``{"state": "draining"|"left", "assigned": N}``. Ask again until ``left``."""
        target = command.node_id
        deadline_s = command.deadline_s
        if target != self.node_id and target not in self.out.peer_endpoints:
            if now_s + 0.05 < deadline_s:  # a fresh client learns the members from its seeds' gossip
                self.out.schedule(now_s + 0.05, "command_retry", command)
                return
            raise UsageError(f"node {target!r} is not known here; known storage nodes: "
                             f"{', '.join(self.core.client.storage_peers()) or 'none'}")
        self._simple_request(command, target, "leave", {"node_id": target}, now_s, lambda m: dict(m.body))
