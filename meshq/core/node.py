"""NodeCore: the sans-I/O heart of a meshq node, a root that composes rooms.

Theory of operation
-------------------
A runtime (the real ``meshq.io.runtime.Runtime`` or the simulator) owns the clock and the
sockets. It calls ``handle(event, now_s)`` for every input and ``on_timer(now_s)`` when
``next_deadline()`` has passed, and executes the effects each call returns. The core keeps
no reference to time or randomness except what is passed in (``rng`` at construction,
``now_s`` on every call), so a run is reproducible from its inputs.

The root only builds the rooms and dispatches to them; each room owns one concern's state
(``meshq.core.room``):

=================  ==========================================================================
``out``            effects, timers, pending requests, connections (``outbox.Outbox``)
``mesh``           membership, liveness, gossip, seeds (``mesh.gossip.Mesh``)
``adverts``        what each node offers the mesh: interest, services (``mesh.adverts``)
``formation``      joining, forming or merging the metadata group (``cluster.formation``)
``agreement``      the metadata Raft group and its applied state (``cluster.agreement``)
``leave``          ``meshq leave``: drain, then leave the membership (``cluster.leave``)
``catalog``        topic metadata served and created (``cluster.catalog``)
``access``         permissions per client key: checks, grants changed and listed (``cluster.access``)
``space``          storage full: refuse new records until space returns (``partitions.space``)
``host``           the local partition replicas and rebalancing (``partitions.host``)
``server``         produce / fetch / list_offsets on partitions led here (``partitions.server``)
``repair``         scrub local replicas, repair damaged batches from a peer (``partitions.repair``)
``groups``         consumer-group offsets (``partitions.groups``)
``coordinator``    consumer-group membership, generations, assignment (``partitions.coordinator``)
``shared``         shared (work-queue) subscriptions on partitions led here (``partitions.shared``)
``client``         topic metadata for this node's own API calls (``client.metadata``)
``producer``       the idempotent producer (``client.producer``)
``requests``       the other local API calls (``client.requests``)
``group_client``   this node's consumer-group members: join, heartbeat, rejoin (``client.group_client``)
``rpc``            request/reply: services offered here, requests sent from here (``rpc.room``)
``status``         this node's view, and the merge of several (``status``)
``pubsub``         pub/sub subscriptions, every node's interest, routing (``pubsub.room``)
=================  ==========================================================================

Each room declares the request types it serves (``SERVES``), the local commands it carries
out (``COMMANDS``), the events it takes from peers' PUB sockets (``EVENTS``) and its timer
kinds (``TIMERS``); the root registers them, so a new
capability is a new room listed in ``__init__``, never new code in the dispatch. The one
duty the root keeps is the heartbeat: every ``heartbeat_interval_s`` it runs each room's
periodic step in a fixed order (``_heartbeat``).

When a room addresses this very node it does not encode anything: the request goes straight
to ``serve`` and the reply comes back through the outbox's local inbox, drained at the end of
each call (no recursion, no sockets).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from meshq.config import NodeConfig, TopicConfig
from meshq.core import wire
from meshq.core.client.group_client import GroupClient
from meshq.core.client.metadata import ClientMetadata
from meshq.core.client.producer import Producer
from meshq.core.client.requests import Requests
from meshq.core.cluster.access import Access
from meshq.core.cluster.agreement import Agreement
from meshq.core.cluster.catalog import Catalog
from meshq.core.cluster.formation import Formation
from meshq.core.cluster.leave import Leave
from meshq.core.events import (
    BadRequest,
    EventReceived,
    LogsSynced,
    PeerDisconnected,
    PeerDiscovered,
    ReplyReceived,
    RequestReceived,
)
from meshq.core.membership import MemberTable
from meshq.core.mesh.adverts import Adverts
from meshq.core.mesh.gossip import Mesh
from meshq.core.metadata import MetadataState
from meshq.core.outbox import Outbox
from meshq.core.partition import PartitionState
from meshq.core.partitions.coordinator import GroupCoordinator
from meshq.core.partitions.groups import Groups
from meshq.core.partitions.host import PartitionHost
from meshq.core.partitions.repair import Repair
from meshq.core.partitions.server import PartitionServer
from meshq.core.partitions.shared import Shared
from meshq.core.partitions.space import StorageSpace
from meshq.core.ports import Storage
from meshq.core.pubsub.room import PubSub
from meshq.core.raft import RaftNode
from meshq.core.room import Room
from meshq.core.rpc.room import Rpc
from meshq.core.status import Status
from meshq.errors import MeshqError, NodeStoppedError, ProtocolError, UsageError

log = logging.getLogger("meshq.core")

MAX_INVALID_PEERS = 256  # peers whose invalid frames are counted apart (status "invalid_frames")


class NodeCore:
    """Pure protocol state of one node: the root that builds and dispatches to its rooms."""

    def __init__(self, config: NodeConfig, node_id: str, storage: Storage, rng: random.Random,
                 wall_clock_ms: Callable[[], int]) -> None:
        self.config = config
        self.node_id = node_id
        self.storage = storage
        self.rng = rng
        # Deadlines use the monotonic ``now_s`` handed to every call; only record timestamps,
        # retention and the incarnation number use wall time, read through this function.
        self.wall_clock_ms = wall_clock_ms
        self.endpoint = ""  # set by start(): the ROUTER endpoint peers connect to
        self.pub_endpoint = ""
        self.public_key = ""  # set by start()
        self.incarnation = 0
        self.stopped = False
        self.started_s = 0.0
        self.now_s = 0.0  # the time of the call being handled
        # who sent the request being served (meshq.core.acl): set only while a peer's request is served
        self.caller: str | None = None
        self.counters: dict[str, int] = {
            "frames_invalid": 0,
            "records_produced": 0,
            "batches_produced": 0,
            "records_fetched_bytes": 0,
            "duplicates_dropped": 0,
            "produces_parked": 0,  # produces held while their partition's leadership moved (PartitionServer)
        }
        # invalid frames by peer (see note_invalid_frame): bounded, a hostile host cannot grow it
        self.invalid_by_peer: dict[str, int] = {}
        self.out = Outbox(config.cluster, node_id, self.serve)
        self.mesh = Mesh(self)
        self.adverts = Adverts(self)
        self.formation = Formation(self)
        self.agreement = Agreement(self)
        self.leave = Leave(self)
        self.catalog = Catalog(self)
        self.access = Access(self)
        self.space = StorageSpace(self)
        self.host = PartitionHost(self)
        self.server = PartitionServer(self)
        self.repair = Repair(self)
        self.groups = Groups(self)
        self.coordinator = GroupCoordinator(self)
        self.shared = Shared(self)
        self.client = ClientMetadata(self)
        self.producer = Producer(self)  # draws its producer ids from rng
        self.requests = Requests(self)
        self.group_client = GroupClient(self)
        self.rpc = Rpc(self)
        self.status = Status(self)
        self.pubsub = PubSub(self)
        self._servers: dict[str, Callable[[Any, wire.Message, float], None]] = {}
        self._commands: dict[type, Callable[[Any, float], None]] = {}
        self._events: dict[str, Callable[[wire.Message, float], None]] = {}
        self._timers: dict[str, Callable[[Any, float], None]] = {
            "request": lambda request_id, now_s: self.out.expire(request_id),
            "requests": self.out.expire_batch,
            "heartbeat": self._heartbeat,
        }
        for room in (self.mesh, self.adverts, self.formation, self.agreement, self.leave, self.catalog, self.access,
                     self.space,
                     self.host, self.server, self.repair, self.groups, self.coordinator, self.shared, self.client,
                     self.producer, self.requests, self.group_client, self.status, self.pubsub, self.rpc):
            self.register(room)

    def register(self, room: Room) -> None:
        """Route the request types, commands, events and timer kinds ``room`` declares to its methods."""
        tables = ((self._servers, room.SERVES), (self._commands, room.COMMANDS), (self._events, room.EVENTS),
                  (self._timers, room.TIMERS))
        for table, names in tables:  # all checked first: a refused room registers nothing
            for key in names:
                if key in table:
                    raise UsageError(f"{key!r} is already handled by another room")
        for table, names in tables:
            for key, name in names.items():
                table[key] = getattr(room, name)

    # ------------------------------------------------------------------ lifecycle
    def start(self, endpoint: str, now_s: float, pub_endpoint: str = "", public_key: str = "") -> list:
        """Open storage state, connect to seeds. Returns the first effects. ``public_key``: the CURVE key a
        client node listens with (gossiped in its member info), "" without keys."""
        self.endpoint = endpoint
        self.public_key = public_key
        self.pub_endpoint = pub_endpoint or endpoint
        self.incarnation = self.wall_clock_ms()
        self.started_s = now_s
        self.now_s = now_s
        self.mesh.start()
        self.access.start(now_s)  # a keyed client node starts asking for the peer grants
        if self.is_storage:
            self.agreement.start(now_s)
            self.space.start(now_s)
            self.host.start(now_s)
            self.repair.start(now_s)
        self.out.schedule(now_s, "heartbeat", None)
        self.mesh.greet_seeds(now_s)
        self.formation.tick(now_s)
        return self.out.take()

    def stop(self, now_s: float) -> list:
        """Fail everything still waiting, say goodbye; returns final effects (including a last fsync)."""
        self.stopped = True
        error = NodeStoppedError("the node was stopped before the operation completed")
        self.out.fail_all(error)
        self.producer.stop(error)
        self.client.stop(error)
        self.group_client.stop(error)
        self.rpc.stop(error)
        self.access.stop(error)
        self.mesh.say_goodbye()
        self.host.stop()
        return self.out.take()

    # ------------------------------------------------------------------ runtime interface
    def handle(self, event: Any, now_s: float) -> list:
        """Feed one input; returns the effects to execute."""
        self.now_s = now_s
        kind = type(event)
        if kind is RequestReceived:
            self.mesh.hear(event.message.sender, now_s)
            self.caller = event.caller
            try:
                self.serve(event.route, event.message, now_s)
            finally:
                self.caller = None
        elif kind is ReplyReceived:
            self.mesh.hear(event.message.sender, now_s)
            self.out.on_reply(event.message, now_s)
        elif kind in self._commands:
            self._commands[kind](event, now_s)
        elif kind is EventReceived:
            on_event = self._events.get(event.message.type)
            if on_event is None:
                self.count_invalid(event.message.sender)  # a request or reply type published: drop, count
            else:
                on_event(event.message, now_s)
        elif kind is PeerDiscovered:
            self.mesh.learn(event.info, now_s)
        elif kind is PeerDisconnected:
            self.out.fail_requests_to(event.peer, "disconnected")
        elif kind is LogsSynced:
            self.host.on_synced(event.keys)
        elif kind is BadRequest:
            self.note_invalid_frame(event.error, getattr(event.error, "sender", "") or "unknown")
            self.out.reply_error(event.route, event.request_id, event.error)
        else:
            raise UsageError(f"NodeCore cannot handle {kind.__name__}")
        self.out.drain_local(now_s)
        return self.out.take()

    def serve(self, route: Any, message: wire.Message, now_s: float) -> None:
        """Answer one request with the room registered for its type (an error reply if it raises)."""
        handler = self._servers.get(message.type)
        if handler is None:
            # A reply or event type sent as a request: the peer is confused; count it, and tell
            # it so if it gave a request id (every request with an id gets one answer).
            self.count_invalid(message.sender)
            self.out.reply_error(route, message.request_id, ProtocolError(
                f"{message.type} is not a request this node answers"))
            return
        try:
            self.access.check_node(message.type)
            handler(route, message, now_s)
        except MeshqError as exc:
            self.out.reply_error(route, message.request_id, exc)

    def note_invalid_frame(self, error: ProtocolError, peer: str = "unknown") -> None:
        """Count a frame the runtime could not decode (it was dropped; nothing changed)."""
        self.count_invalid(peer)
        log.debug("dropped invalid frame from %s: %s", peer, error)

    def count_invalid(self, peer: str) -> None:
        """Count one dropped frame, in total and for ``peer``: the sender's address when the frame
        did not decode, the node id it names (a claim) when it did. At most ``MAX_INVALID_PEERS``
        peers are kept apart; the rest are counted under ``"other"``."""
        self.counters["frames_invalid"] += 1
        self.blame(peer)

    def blame(self, peer: str) -> None:
        """Count one invalid frame for ``peer`` only (its total is counted elsewhere: pub/sub data)."""
        by_peer = self.invalid_by_peer
        if peer not in by_peer and len(by_peer) >= MAX_INVALID_PEERS:
            peer = "other"
        by_peer[peer] = by_peer.get(peer, 0) + 1

    def invalid_frames(self) -> dict:
        """``{"total": N, "by_peer": {peer: n}}``: frames dropped as invalid (wire and pub/sub data)."""
        by_peer = dict(self.invalid_by_peer)
        return {"total": self.counters["frames_invalid"] + self.pubsub.counters["frames_invalid"],
                "by_peer": by_peer}

    def next_deadline(self) -> float | None:
        deadline = self.out.next_deadline()
        for candidate in (self.agreement.next_deadline(), self.host.next_deadline()):
            if candidate is not None and (deadline is None or candidate < deadline):
                deadline = candidate
        return deadline

    def on_timer(self, now_s: float) -> list:
        self.now_s = now_s
        self.space.survive(self.agreement.on_timer, now_s)
        self.host.on_timer(now_s)  # each replica's step survives a full disk on its own
        for kind, key in self.out.due(now_s):
            self.space.survive(self._timers[kind], key, now_s)
        self.out.drain_local(now_s)
        return self.out.take()

    def _heartbeat(self, key: Any, now_s: float) -> None:
        """Every ``heartbeat_interval_s``: each room's periodic step, in this order."""
        try:
            self.mesh.tick(now_s)  # publish our heartbeat, age the member table, fall back to seeds
            self.formation.tick(now_s)
            self.agreement.admit_next(now_s)
            self.agreement.remove_silent_members(now_s)
            self.agreement.rebuild_lost(now_s)
            self.leave.finish_leaves(now_s)
            self.leave.check_left(now_s)
            self.host.rebalance_tick(now_s)
        finally:  # a step that found the disk full must not stop the heartbeat
            self.out.schedule(now_s + self.config.heartbeat_interval_s, "heartbeat", None)

    # ------------------------------------------------------------------ read-only views
    @property
    def is_storage(self) -> bool:
        return self.config.role == "storage"

    @property
    def topics(self) -> dict[str, TopicConfig]:
        return self.agreement.meta.topics

    @property
    def meta(self) -> MetadataState:
        return self.agreement.meta

    @property
    def raft(self) -> RaftNode | None:
        return self.agreement.raft

    @property
    def members(self) -> MemberTable | None:
        return self.mesh.members

    @property
    def partitions(self) -> dict[tuple[str, int], PartitionState]:
        return self.host.partitions

    @property
    def metadata(self) -> dict[str, dict]:
        return self.client.metadata

    @property
    def peer_endpoints(self) -> dict[str, str]:
        return self.out.peer_endpoints

    @property
    def has_left(self) -> bool:
        return self.leave.has_left
