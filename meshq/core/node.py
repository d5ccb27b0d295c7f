"""NodeCore: the sans-I/O heart of a meshq node.

Theory of operation
-------------------
A runtime (the real ``meshq.io.runtime.Runtime`` or the simulator) owns the clock and the
sockets. It calls ``handle(event, now_s)`` for every input and ``on_timer(now_s)`` when
``next_deadline()`` has passed, and executes the effects each call returns. The core keeps
no reference to time or randomness except what is passed in (``rng`` at construction,
``now_s`` on every call), so a run is reproducible from its inputs.

The core has two halves that talk only through messages:

* the *server half* answers requests that arrive on the ROUTER: it owns the topic registry
  and the partitions this node leads (``PartitionState``), appends verified batches,
  serves fetches (parking them until data arrives or ``max_wait_ms`` passes), and
  stores consumer-group offsets in the internal ``__consumer_offsets`` topic;
* the *client half* carries out local API calls: it keeps cluster metadata, groups
  records into per-partition batches with idempotent sequence numbers, keeps at most
  ``max_in_flight_per_partition`` batches in flight per partition, retries retriable
  failures with the same sequence (the leader dedupes), and resolves waiters.

When the client half addresses this very node it does not encode anything: the request
goes straight to the server half and the reply comes back through ``_local_inbox``,
drained at the end of each ``handle`` call (no recursion, no sockets).

The *cluster layer* joins them into a mesh:

* liveness (``MemberTable``): heartbeats published on PUB every ``heartbeat_interval_s``
  carry this node's member info and the members it knows (gossip), so one seed is enough;
* agreement (``RaftNode`` + ``MetadataState``, storage nodes only): the storage membership,
  topic configurations and partition assignments are commands in a Raft log. A fresh node
  joins a formed cluster by asking its leader (``raft_join``); when no formed cluster is
  known after ``bootstrap_wait_s``, the lowest node id among the unformed storage nodes it
  knows forms a one-member cluster and the others join it. A member silent for
  ``member_timeout_s`` is removed by the leader.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from meshq.config import NodeConfig, TopicConfig, parse_host_port, validate_topic_name
from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.events import (
    Command,
    Connect,
    Disconnect,
    EventReceived,
    Fail,
    LogsSynced,
    PeerDiscovered,
    ProduceCommand,
    Publish,
    Reply,
    ReplyReceived,
    RequestReceived,
    Resolve,
    ResolveProduce,
    Send,
    Subscribe,
    SyncLogs,
    Unsubscribe,
)
from meshq.core.hashing import partition_for_key, stable_hash64
from meshq.core.membership import DEAD, LEFT, Member, MemberTable
from meshq.core.metadata import MetadataState, next_step
from meshq.core.partition import PRODUCER_WINDOW, AckWaiter, ParkedFetch, PartitionState
from meshq.core.raft import LEADER, RaftNode
from meshq.core.replica import Replica, persisted_name
from meshq.errors import (
    CorruptLogError,
    InvalidTopicError,
    MeshqError,
    MessageTooLargeError,
    NodeStoppedError,
    NotEnoughReplicasError,
    NotLeaderError,
    OffsetOutOfRangeError,
    ProtocolError,
    TimeoutError,
    UnknownTopicError,
    UsageError,
    error_code,
    error_from_code,
)

log = logging.getLogger("meshq.core")

OFFSETS_TOPIC = "__consumer_offsets"
META_TOPIC = "__meta"
MAX_PARKED_FETCHES = 1024  # per partition; more long polls are answered at once (empty)
MAX_FETCH_WAIT_MS = 30_000
EARLIEST = -2
LATEST = -1
_METADATA_RETRY_S = 0.2
# A client that knows no live storage node asks its seeds again after this long, doubling up to
# the cap (each wait jittered by ±25% with the core's rng, so clients cut off together spread out).
_SEED_RETRY_MIN_S = 0.5
_SEED_RETRY_MAX_S = 4.0


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """Reply handle for a request the client half sent to this node's own server half."""

    request_id: int


@dataclass(slots=True)
class PendingRequest:
    request_id: int
    peer: str
    type: str
    deadline_s: float
    on_reply: Callable[[wire.Message], None]
    on_error: Callable[[MeshqError], None]


@dataclass(slots=True)
class OutBatch:
    """A batch the client half is producing: kept until acknowledged or failed."""

    topic: str
    partition: int
    records: list
    indexes: Any  # Sequence[int]: positions of these records in the command's record list
    waiter: Any
    acks: str
    deadline_s: float
    base_sequence: int
    data: bytes = b""
    attempts: int = 0
    settled: bool = False


@dataclass(slots=True)
class ProducerPartition:
    next_sequence: int = 0
    next_at_most_once: int = 0
    queue: deque = field(default_factory=deque)
    in_flight: int = 0  # requests awaiting a reply
    # Sequenced batches in first-send order, from the oldest one not yet settled (acknowledged or
    # failed) on. The leader remembers a producer's last PRODUCER_WINDOW batches, so new sends
    # stop while this holds that many: a retry always falls inside the leader's dedupe window.
    sent_log: deque = field(default_factory=deque)


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What a fetch returned: raw batches plus the partition's bounds."""

    topic: str
    partition: int
    data: bytes
    high_watermark: int
    log_start_offset: int


class NodeCore:
    """Pure protocol state of one node. See the module docstring."""

    def __init__(self, config: NodeConfig, node_id: str, storage: Any, rng: random.Random,
                 wall_clock_ms: Callable[[], int]) -> None:
        self.config = config
        # Deadlines use the monotonic ``now_s`` handed to every call; only record timestamps,
        # retention and the incarnation number use wall time, read through this function.
        self.wall_clock_ms = wall_clock_ms
        self.node_id = node_id
        self.storage = storage
        self.rng = rng
        self.endpoint = ""  # set by start(): the ROUTER endpoint peers connect to
        self.pub_endpoint = ""
        self.incarnation = 0
        self.stopped = False
        # cluster layer
        self.members: MemberTable | None = None
        self.meta = MetadataState()
        self.raft: RaftNode | None = None
        self.peer_clusters: dict[str, dict] = {}  # node_id -> {"formed", "leader"} from heartbeats
        self._started_s = 0.0
        self._next_join_s = 0.0
        # a joiner: how many join candidates it moved past, none of them answering, and since when
        # it has asked the current one (see _pick_join_target)
        self._join_skipped = 0
        self._join_asked_since_s: float | None = None
        self._apply_waiters: list[tuple[int, int, Callable[[], None]]] = []
        self._join_queue: dict[str, dict] = {}  # leader only: storage nodes waiting to be added
        self._seeds_answered: set[str] = set()
        self._seed_hellos: set[str] = set()  # seeds a fallback hello is waiting on (no retry loop)
        self._seed_retry_s = _SEED_RETRY_MIN_S  # the next fallback wait (see _fall_back_to_seeds)
        self._next_seed_hello_s = 0.0
        self._leaderless_since_s: float | None = None
        self._introduced_s: dict[str, float] = {}  # peer -> earliest time to introduce ourselves again
        self._now_s = 0.0
        self._subscribed: set[str] = set()
        # server half
        # every partition replicated here; ``state.replica`` runs its replication protocol
        self.partitions: dict[tuple[str, int], PartitionState] = {}
        # (topic, partition) -> (epoch, node): leaders announced in heartbeats, for routing
        self.leader_hints: dict[tuple[str, int], tuple[int, str]] = {}
        self._leading: set[tuple[str, int]] = set()  # partitions whose leadership we have acted on
        # partition -> time before which we propose no other reassignment step for it
        self._reassigning: dict[tuple[str, int], float] = {}
        self.leaving = False  # ``meshq leave`` asked this node to hand its partitions over and go
        self.has_left = False  # ... and it has: the runtime stops the node
        self._next_leave_check_s = 0.0
        self.group_offsets: dict[tuple[str, str, int], int] = {}
        # client half
        self.peer_endpoints: dict[str, str] = {}
        self.metadata: dict[str, dict] = {}  # topic -> {"config": TopicConfig, "leaders": [node_id|None]}
        self.awaiting_metadata: dict[str, list[tuple[float, Callable[[MeshqError | None], None]]]] = {}
        self.pending: dict[int, PendingRequest] = {}
        self.producer_id = rng.getrandbits(62)
        self.producer_epoch = 0
        self.at_most_once_id = rng.getrandbits(62)
        self.producer_partitions: dict[tuple[str, int], ProducerPartition] = {}
        self.sticky: dict[str, int] = {}
        self._next_request_id = 1
        self._timers: list[tuple[float, int, str, Any]] = []
        self._timer_seq = 0
        self._effects: list = []
        self._local_inbox: deque = deque()
        self._dirty_logs: set[tuple[str, int]] = set()
        self.counters: dict[str, int] = {
            "frames_invalid": 0,
            "records_produced": 0,
            "batches_produced": 0,
            "records_fetched_bytes": 0,
            "duplicates_dropped": 0,
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self, endpoint: str, now_s: float, pub_endpoint: str = "") -> list:
        """Open storage state, connect to seeds. Returns the first effects."""
        self.endpoint = endpoint
        self.pub_endpoint = pub_endpoint or endpoint
        self.incarnation = self.wall_clock_ms()
        self._started_s = now_s
        self._now_s = now_s
        me = Member(self.node_id, self.endpoint, self.pub_endpoint, self.config.role, self.incarnation)
        self.members = MemberTable(me, self.config.failure_timeout_s, self.config.member_timeout_s)
        if self.is_storage:
            self.raft = RaftNode(
                self.node_id, self.storage.open_log(META_TOPIC, 0), self.storage.read_meta("raft"), self.rng,
                self._raft_send, self._apply_meta, lambda state: self.storage.write_meta("raft", state),
                election_timeout_s=self.config.election_timeout_s,
                heartbeat_interval_s=self.config.raft_heartbeat_interval_s,
            )
            self.raft.start(now_s)
            self._schedule(now_s + self.config.retention_check_interval_s, "retention", None)
            if self.config.fsync == "interval":
                self._schedule(now_s + self.config.fsync_interval_s, "fsync", None)
        self._schedule(now_s, "heartbeat", None)
        for seed in self.config.seeds:
            host, port = parse_host_port(seed)
            self._connect(f"seed:{host}:{port}", f"tcp://{host}:{port}")
            self._hello(f"seed:{host}:{port}", now_s)
        self._formation_tick(now_s)
        return self._take_effects()

    def stop(self, now_s: float) -> list:
        """Fail everything still waiting, say goodbye; returns final effects (including a last fsync)."""
        self.stopped = True
        error = NodeStoppedError("the node was stopped before the operation completed")
        for request in list(self.pending.values()):
            request.on_error(error)
        self.pending.clear()
        for pp in self.producer_partitions.values():
            while pp.queue:
                self._fail_batch(pp.queue.popleft(), error, restart=False)
        for waiters in self.awaiting_metadata.values():
            for _deadline, callback in waiters:
                callback(error)
        self.awaiting_metadata.clear()
        if self.members is not None:
            self._effects.append(Publish(wire.encode(self.config.cluster, self.node_id, "goodbye", 0,
                                                     {"node_id": self.node_id, "incarnation": self.incarnation})))
        if self.partitions:
            self._effects.append(SyncLogs(frozenset(self.partitions)))
        return self._take_effects()

    @property
    def is_storage(self) -> bool:
        return self.config.role == "storage"

    @property
    def topics(self) -> dict[str, TopicConfig]:
        return self.meta.topics

    # ------------------------------------------------------------------ runtime interface
    def handle(self, event: Any, now_s: float) -> list:
        """Feed one input; returns the effects to execute."""
        self._now_s = now_s
        if isinstance(event, RequestReceived):
            self._hear(event.message.sender, now_s)
            self._serve(event.route, event.message, now_s)
        elif isinstance(event, ReplyReceived):
            self._hear(event.message.sender, now_s)
            self._on_reply(event.message, now_s)
        elif isinstance(event, ProduceCommand):
            self._produce(event, now_s)
        elif isinstance(event, Command):
            self._command(event, now_s)
        elif isinstance(event, EventReceived):
            self._on_event(event.message, now_s)
        elif isinstance(event, PeerDiscovered):
            self._learn(event.info, now_s)
        elif isinstance(event, LogsSynced):
            self._on_synced(event.keys)
        else:
            raise UsageError(f"NodeCore cannot handle {type(event).__name__}")
        self._drain_local(now_s)
        return self._take_effects()

    def note_invalid_frame(self, error: ProtocolError) -> None:
        """Count a frame the runtime could not decode (it was dropped; nothing changed)."""
        self.counters["frames_invalid"] += 1
        log.debug("dropped invalid frame: %s", error)

    def next_deadline(self) -> float | None:
        deadline = self._timers[0][0] if self._timers else None
        if self.raft is not None:
            raft_deadline = self.raft.next_deadline()
            if deadline is None or raft_deadline < deadline:
                deadline = raft_deadline
        for state in self.partitions.values():
            replica_deadline = state.replica.next_deadline()
            if deadline is None or replica_deadline < deadline:
                deadline = replica_deadline
        return deadline

    def on_timer(self, now_s: float) -> list:
        self._now_s = now_s
        if self.raft is not None and self.raft.next_deadline() <= now_s:
            self.raft.on_timer(now_s)
        for _key, state in sorted(self.partitions.items()):
            if state.replica.next_deadline() <= now_s:
                state.replica.on_timer(now_s)
        while self._timers and self._timers[0][0] <= now_s:
            _deadline, _seq, kind, key = heapq.heappop(self._timers)
            if kind == "request":
                request = self.pending.pop(key, None)
                if request is not None:
                    request.on_error(TimeoutError(f"no reply from {request.peer} to {request.type} in time"))
            elif kind == "fetch":
                self._expire_parked(key, now_s)
            elif kind == "acks":
                state = self.partitions.get(key)
                if state is not None:
                    self._check_waiters(state, now_s)
            elif kind == "heartbeat":
                self._heartbeat(now_s)
                self._schedule(now_s + self.config.heartbeat_interval_s, "heartbeat", None)
            elif kind == "fsync":
                if self._dirty_logs:
                    self._effects.append(SyncLogs(frozenset(self._dirty_logs)))
                    self._dirty_logs.clear()
                self._schedule(now_s + self.config.fsync_interval_s, "fsync", None)
            elif kind == "retention":
                self._apply_retention(now_s)
                self._schedule(now_s + self.config.retention_check_interval_s, "retention", None)
            elif kind == "retry":
                key(now_s)
        self._drain_local(now_s)
        return self._take_effects()

    # ------------------------------------------------------------------ helpers
    def _take_effects(self) -> list:
        effects, self._effects = self._effects, []
        return effects

    def _schedule(self, deadline_s: float, kind: str, key: Any) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline_s, self._timer_seq, kind, key))

    def _connect(self, peer: str, endpoint: str) -> None:
        if self.peer_endpoints.get(peer) != endpoint:
            self.peer_endpoints[peer] = endpoint
            self._effects.append(Connect(peer, endpoint))

    def _request(self, peer: str, type_: str, body: dict, payloads: tuple, now_s: float, timeout_s: float,
                 on_reply: Callable[[wire.Message], None], on_error: Callable[[MeshqError], None]) -> None:
        request_id = self._next_request_id
        self._next_request_id += 1
        self.pending[request_id] = PendingRequest(request_id, peer, type_, now_s + timeout_s, on_reply, on_error)
        self._schedule(now_s + timeout_s, "request", request_id)
        if peer == self.node_id:
            self._serve(LocalRoute(request_id), wire.Message(type_, self.node_id, request_id, body, payloads), now_s)
        else:
            frames = wire.encode(self.config.cluster, self.node_id, type_, request_id, body, payloads)
            self._effects.append(Send(peer, frames))

    def _send_oneway(self, peer: str, type_: str, body: dict, payloads: tuple, now_s: float) -> None:
        """A request nobody waits for (acks=none, Raft); request id 0 means 'do not reply'."""
        if peer == self.node_id:
            self._serve(LocalRoute(0), wire.Message(type_, self.node_id, 0, body, payloads), now_s)
        else:
            self._effects.append(Send(peer, wire.encode(self.config.cluster, self.node_id, type_, 0, body, payloads)))

    def _on_reply(self, message: wire.Message, now_s: float) -> None:
        request = self.pending.pop(message.request_id, None)
        if request is None:
            return  # late reply after a timeout: the request was already failed or retried
        if message.type == "error":
            body = message.body
            request.on_error(error_from_code(body["code"], body["message"]))
        else:
            try:
                request.on_reply(message)
            except MeshqError as exc:
                request.on_error(exc)

    def _reply(self, route: Any, request_id: int, type_: str, body: dict, payloads: tuple = ()) -> None:
        if request_id == 0:
            return
        if isinstance(route, LocalRoute):
            self._local_inbox.append(wire.Message(type_, self.node_id, request_id, body, payloads))
        else:
            frames = wire.encode(self.config.cluster, self.node_id, type_, request_id, body, payloads)
            self._effects.append(Reply(route, frames))

    def _answer(self, route: Any, request_id: int, type_: str, body: dict) -> Callable[[MeshqError | None], None]:
        """A callback that replies ``type_``/``body`` on success, or the error it is given."""

        def answer(error: MeshqError | None) -> None:
            if error is None:
                self._reply(route, request_id, type_, body)
            else:
                self._reply_error(route, request_id, error)

        return answer

    def _reply_error(self, route: Any, request_id: int, error: MeshqError) -> None:
        self._reply(route, request_id, "error",
                    {"code": error_code(error), "message": str(error)[:4096], "retriable": error.retriable})

    def _drain_local(self, now_s: float) -> None:
        while self._local_inbox:
            self._on_reply(self._local_inbox.popleft(), now_s)

    # ================================================================== cluster layer
    def _self_info(self) -> dict:
        assert self.members is not None
        return self.members.members[self.node_id].to_wire()

    def _hear(self, sender: str, now_s: float) -> None:
        if self.members is not None and self.members.heard_id(sender, now_s):
            log.info("member %s is alive", sender)

    def _learn(self, info: dict, now_s: float) -> None:
        """Know of a node (discovery, gossip, hello): connect to it if it is new."""
        if info["node_id"] == self.node_id or self.members is None:
            return
        member = self.members.learn(info, now_s)
        if member is not None:
            self._link(member)
            self._hello(member.node_id, now_s)

    def _link(self, member: Member) -> None:
        self._connect(member.node_id, member.address)
        if member.pub_address not in self._subscribed:
            self._subscribed.add(member.pub_address)
            self._effects.append(Subscribe(member.pub_address))

    def _unlink(self, node_id: str, pub_address: str | None) -> None:
        if self.peer_endpoints.pop(node_id, None) is not None:
            self._effects.append(Disconnect(node_id))
        if pub_address and pub_address in self._subscribed:
            self._subscribed.discard(pub_address)
            self._effects.append(Unsubscribe(pub_address))

    def _cluster_summary(self) -> dict:
        """What this node tells others about its metadata group (formation and merging use it)."""
        raft = self.raft
        formed = raft is not None and raft.formed and raft.is_member
        return {"formed": formed, "leader": raft.leader if raft is not None else None,
                "size": len(raft.voters) if formed else 0, "trivial": formed and self._trivial_cluster(),
                "can_form": raft is not None and not formed and not self._waiting_for_seeds()}

    def _waiting_for_seeds(self) -> bool:
        """True while a configured seed has not answered (such a node never forms a cluster)."""
        wanted = {f"seed:{host}:{port}" for host, port in map(parse_host_port, self.config.seeds)}
        return not wanted <= self._seeds_answered

    def _trivial_cluster(self) -> bool:
        """A one-member cluster that holds no topic: abandoning it loses nothing."""
        raft = self.raft
        return (raft is not None and list(raft.voters) == [self.node_id] and not self.meta.topics
                and not any(command.get("op") == "create_topic" for _term, command in raft.entries))

    def _publish_heartbeat(self) -> None:
        assert self.members is not None
        body = {"member": self._self_info(), "members": self.members.gossip(), **self._cluster_summary(),
                "term": self.raft.term if self.raft is not None else 0, "leads": self._leads()}
        self._effects.append(Publish(wire.encode(self.config.cluster, self.node_id, "heartbeat", 0, body)))

    def _heartbeat(self, now_s: float) -> None:
        assert self.members is not None
        self._publish_heartbeat()
        before = {m.node_id: m.pub_address for m in self.members.members.values()}
        for node_id, state in self.members.tick(now_s):
            if state == "forgotten":
                self._unlink(node_id, before.get(node_id))
                self.peer_clusters.pop(node_id, None)
            else:
                log.info("member %s is %s", node_id, state)
                if state in ("suspect", "dead"):
                    self._fail_requests_to(node_id, state)
        self._fall_back_to_seeds(now_s)
        self._formation_tick(now_s)
        self._admit_next(now_s)
        self._remove_silent_members(now_s)
        self._finish_leaves(now_s)
        self._check_left(now_s)
        self._rebalance_tick(now_s)

    def _fail_requests_to(self, peer: str, state: str) -> None:
        """A peer went silent: fail what waits on it with a retriable error, so callers go elsewhere
        (a produce retries with the same sequence numbers, so nothing is stored twice)."""
        for request_id in sorted(rid for rid, request in self.pending.items() if request.peer == peer):
            request = self.pending.pop(request_id)
            request.on_error(NotLeaderError(f"{peer} is {state} (silent); {request.type} is retried elsewhere"))

    def _on_event(self, message: wire.Message, now_s: float) -> None:
        assert self.members is not None
        if message.type == "heartbeat":
            body = message.body
            if body["member"]["node_id"] != message.sender:
                self.counters["frames_invalid"] += 1
                return
            self._heard_from(body["member"], body, now_s)
            self._note_leads(message.sender, body["leads"])
            if (not any(info["node_id"] == self.node_id for info in body["members"])
                    and now_s >= self._introduced_s.get(message.sender, 0.0)):
                # The sender does not know us (it restarted since we met): introduce ourselves.
                self._introduced_s[message.sender] = now_s + 1.0
                self._hello(message.sender, now_s)
            self._formation_tick(now_s)
        elif message.type == "goodbye":
            if self.members.leave(message.body["node_id"], message.body["incarnation"], now_s):
                log.info("member %s left", message.body["node_id"])
        else:
            self.counters["frames_invalid"] += 1

    def _note_leads(self, sender: str, leads: list) -> None:
        """Remember which partitions ``sender`` says it leads (routing hints; the leader decides)."""
        for topic, partition, epoch in leads:
            known = self.leader_hints.get((topic, partition))
            if known is None or epoch >= known[0]:
                self.leader_hints[(topic, partition)] = (epoch, sender)

    def _heard_from(self, info: dict, summary: dict | None, now_s: float) -> None:
        """A node spoke to us directly: mark it alive, link it if new, and take in what it says
        about its metadata group (``summary``: a heartbeat or hello_ok body) and its gossip."""
        assert self.members is not None
        learned, changed = self.members.heard(info, now_s)
        if learned is not None:
            self._link(learned)
        if changed:
            log.info("member %s is alive", info["node_id"])
        if summary is None:
            return
        self.peer_clusters[info["node_id"]] = {
            "role": info["role"],
            **{field: summary[field] for field in ("formed", "leader", "size", "trivial", "can_form")},
        }
        for other in summary["members"]:
            self._learn(other, now_s)

    def _hello(self, peer: str, now_s: float, retry: bool = True) -> None:
        """Introduce ourselves to ``peer`` (a member, or ``seed:host:port``). A seed that does not
        answer is asked again every 0.5 s, unless ``retry`` is off: then the caller decides when."""
        def on_reply(message: wire.Message) -> None:
            assert self.members is not None
            info = message.body["member"]
            if peer.startswith("seed:"):
                self.peer_endpoints.pop(peer, None)
                self._effects.append(Disconnect(peer))
                self._seeds_answered.add(peer)
                self._seed_hellos.discard(peer)
            if info["node_id"] == self.node_id:
                self._formation_tick(self._now_s)
                return
            self._heard_from(info, message.body, self._now_s)
            self._formation_tick(self._now_s)

        def on_error(error: MeshqError) -> None:
            if self.stopped or not peer.startswith("seed:"):
                return  # known members are reached by heartbeats anyway
            if not retry:
                self._seed_hellos.discard(peer)
                if self.peer_endpoints.pop(peer, None) is not None:
                    self._effects.append(Disconnect(peer))
                return
            log.info("seed %s did not answer hello (%s); retrying", peer[5:], error)
            self._schedule(self._now_s + 0.5, "retry", lambda t: self._hello(peer, t))

        self._request(peer, "hello", {"member": self._self_info()}, (), now_s, 2.0, on_reply, on_error)

    def _hello_seeds_again(self, now_s: float) -> bool:
        """Ask every seed that answered before (and has no fallback hello pending) again: its answer
        brings back its view of the members and of the metadata group. Seeds that never answered
        are still being asked by their first hello's retry loop. False if none was asked."""
        asked = False
        for seed in self.config.seeds:
            host, port = parse_host_port(seed)
            peer = f"seed:{host}:{port}"
            if peer not in self._seeds_answered or peer in self._seed_hellos:
                continue
            self._seed_hellos.add(peer)
            self._connect(peer, f"tcp://{host}:{port}")
            self._hello(peer, now_s, retry=False)
            asked = True
        return asked

    def _fall_back_to_seeds(self, now_s: float) -> None:
        """A client that knows no live storage node asks its seeds again, with capped exponential
        backoff. Cut off for longer than ``member_timeout_s``, it has forgotten every member and
        they have forgotten it, so without this nobody would ever contact anybody again."""
        if self.is_storage or self.stopped or not self.config.seeds:
            return
        assert self.members is not None
        if self.members.alive_ids("storage"):
            self._seed_retry_s = _SEED_RETRY_MIN_S
            return
        if now_s < self._next_seed_hello_s or not self._hello_seeds_again(now_s):
            return
        log.info("%s knows no live storage node; asking its seeds again", self.node_id)
        self._next_seed_hello_s = now_s + self._seed_retry_s * (0.75 + 0.5 * self.rng.random())
        self._seed_retry_s = min(2 * self._seed_retry_s, _SEED_RETRY_MAX_S)

    def _serve_hello(self, route: Any, message: wire.Message, now_s: float) -> None:
        assert self.members is not None
        info = message.body["member"]
        if info["node_id"] != self.node_id:
            self._heard_from(info, None, now_s)
        self._reply(route, message.request_id, "hello_ok", {
            "member": self._self_info(), "members": self.members.gossip(), **self._cluster_summary(),
        })

    # ------------------------------------------------------------------ agreement (metadata Raft)
    def _raft_send(self, peer: str, type_: str, body: dict) -> None:
        self._send_to_member(peer, type_, body)

    def _send_to_member(self, peer: str, type_: str, body: dict, payloads: tuple = ()) -> None:
        """A one-way message to a storage member, connecting first if we have not yet (its address
        comes from the metadata group, else from the member table); dropped if it is unknown."""
        if peer not in self.peer_endpoints:
            info = self.raft.voters.get(peer) if self.raft is not None else None
            if info is None:
                info = self.meta.members.get(peer)
            if info is None:
                member = self.members.get(peer) if self.members is not None else None
                info = {"address": member.address} if member is not None else None
            if info is None:
                return
            self._connect(peer, info["address"])
        self._effects.append(Send(peer, wire.encode(self.config.cluster, self.node_id, type_, 0, body, payloads)))

    def _serve_raft(self, route: Any, message: wire.Message, now_s: float) -> None:
        if self.raft is None:
            raise NotLeaderError(f"node {self.node_id} is a client and takes no part in the metadata group")
        self.raft.handle(message.sender, message.type, message.body, now_s)
        if self.raft.learners and message.type == "raft_append_ok":
            self._admit_next(now_s)

    def _formation_tick(self, now_s: float) -> None:
        """Join a formed cluster, form one, or give up a trivial one (see the module docstring)."""
        raft = self.raft
        if raft is None or self.stopped or self.leaving:
            return  # a leaving node never asks to be admitted again (a restart may: it is a new start)
        assert self.members is not None
        if raft.is_member:
            self._join_skipped, self._join_asked_since_s = 0, None
            self._maybe_merge(now_s)
            self._ask_readmission(now_s)
            return
        formed_peers = sorted(p for p, c in self.peer_clusters.items() if c["formed"])
        # A term means a formed cluster reached us (a node outside any configuration never
        # campaigns): keep asking to join it, even once every peer of it has been forgotten,
        # and never form a second cluster (nor bootstrap over that term).
        if raft.formed or formed_peers or raft.term > 0:
            if now_s < self._next_join_s:
                return
            self._next_join_s = now_s + 0.3
            target = self._pick_join_target(formed_peers, now_s)
            if target is not None:
                self._raft_send(target, "raft_join", {"member": self._self_info()})
            return
        if self.config.seeds:
            if self._waiting_for_seeds():
                return  # never form a cluster while a seed is silent: it may be the cluster
        elif self.config.mdns and now_s - self._started_s < self.config.bootstrap_wait_s:
            return
        unformed_storage = [p for p, c in self.peer_clusters.items() if c["role"] == "storage" and not c["formed"]
                            and c["can_form"] and p in self.members.alive_ids()]
        if all(self.node_id < other for other in unformed_storage):
            log.info("no formed cluster found; %s forms cluster %r", self.node_id, self.config.cluster)
            raft.bootstrap(now_s, {"address": self.endpoint, "pub_address": self.pub_endpoint})
            self._publish_heartbeat()  # tell waiting peers at once, not at the next heartbeat

    def _join_candidates(self, formed_peers: list[str]) -> list[str]:
        """Whom a joiner may ask to admit it, best first: the leader it last followed, the leader
        the first formed peer names (else that peer), the leaders other formed peers name, those
        peers, the voters its log names, then any live storage node (a follower forwards a join
        to its leader). Members known to be gone come only when there is nobody else."""
        raft = self.raft
        assert raft is not None and self.members is not None
        first = (self.peer_clusters[formed_peers[0]]["leader"] or formed_peers[0]) if formed_peers else None
        ordered = [raft.leader, first, *(self.peer_clusters[p]["leader"] for p in formed_peers), *formed_peers,
                   *sorted(raft.voters), *self.members.alive_ids("storage")]
        candidates: list[str] = []
        for peer in ordered:
            if peer and peer != self.node_id and peer not in candidates:
                candidates.append(peer)
        members = self.members
        reachable = [peer for peer in candidates
                     if peer not in members or members.members[peer].state not in (DEAD, LEFT)]
        return reachable or candidates

    def _pick_join_target(self, formed_peers: list[str], now_s: float) -> str | None:
        """The peer a joiner sends ``raft_join`` to now.

        While a leader appends to us we are being admitted: ask that leader. Otherwise ask the
        best of ``_join_candidates``; each time ``2 × election_timeout_s`` pass without a leader
        answering, move one candidate further (round robin), so a peer that died or left never
        holds a joiner up. After a full round the seeds are asked again: their answers name the
        current leader.
        """
        raft = self.raft
        assert raft is not None
        patience_s = 2 * self.config.election_timeout_s
        if raft.leader and raft.leader != self.node_id and now_s - raft.last_leader_contact_s < patience_s:
            self._join_skipped, self._join_asked_since_s = 0, None
            return raft.leader
        candidates = self._join_candidates(formed_peers)
        if not candidates:
            return None
        if self._join_asked_since_s is None:
            self._join_asked_since_s = now_s
        elif now_s - self._join_asked_since_s >= patience_s:
            silent = candidates[self._join_skipped % len(candidates)]
            self._join_skipped += 1
            self._join_asked_since_s = now_s
            if self._join_skipped % len(candidates) == 0:
                self._hello_seeds_again(now_s)
            log.info("%s: no leader answered its join through %s; asking %s", self.node_id, silent,
                     candidates[self._join_skipped % len(candidates)])
        return candidates[self._join_skipped % len(candidates)]

    def _ask_readmission(self, now_s: float) -> None:
        """A node whose own log says it is a voter, but that hears no leader while heartbeats name
        one elsewhere, may hold an uncommitted config entry the cluster dropped: the leader then
        does not replicate to it and its log is never repaired. Ask that leader to admit it again
        (it comes back as a learner, its log is repaired, and it is promoted)."""
        raft = self.raft
        assert raft is not None
        if raft.role == LEADER or raft.leader is not None:
            self._leaderless_since_s = None
            return
        if self._leaderless_since_s is None:
            self._leaderless_since_s = now_s
            return
        if now_s - self._leaderless_since_s < 3 * self.config.election_timeout_s or now_s < self._next_join_s:
            return
        leaders = sorted({c["leader"] for c in self.peer_clusters.values()
                          if c["formed"] and c["leader"] and c["leader"] != self.node_id})
        if leaders:
            self._next_join_s = now_s + 1.0
            self._raft_send(leaders[0], "raft_join", {"member": self._self_info()})

    def _maybe_merge(self, now_s: float) -> None:
        """A trivial cluster that meets another formed cluster of the same name gives itself up.

        Only a one-member cluster without topics yields (it has nothing to lose); when both
        are trivial, the one whose leader id is higher yields, so exactly one side moves.
        """
        raft = self.raft
        if raft is None or not self._trivial_cluster():
            return
        for peer, cluster in sorted(self.peer_clusters.items()):
            other_leader = cluster["leader"]
            if not cluster["formed"] or other_leader in (None, self.node_id) or peer in raft.voters:
                continue
            if cluster["trivial"] and other_leader > self.node_id:
                continue
            log.warning("%s formed a separate cluster %r alone; giving it up to join %s's",
                        self.node_id, self.config.cluster, other_leader)
            self._reset_metadata(now_s)
            return

    def _reset_metadata(self, now_s: float) -> None:
        assert self.raft is not None
        self.storage.delete_log(META_TOPIC, 0)
        self.storage.write_meta("raft", {})
        self.meta = MetadataState()
        self.raft = RaftNode(
            self.node_id, self.storage.open_log(META_TOPIC, 0), {}, self.rng, self._raft_send, self._apply_meta,
            lambda state: self.storage.write_meta("raft", state),
            election_timeout_s=self.config.election_timeout_s,
            heartbeat_interval_s=self.config.raft_heartbeat_interval_s,
        )
        self.raft.start(now_s)
        self._next_join_s = 0.0
        self._publish_heartbeat()

    def _serve_raft_join(self, route: Any, message: wire.Message, now_s: float) -> None:
        raft = self.raft
        if raft is None:
            return
        info = message.body["member"]
        if info["role"] != "storage":
            return
        if raft.role != LEADER:
            if raft.leader and raft.leader != self.node_id and raft.leader != message.sender:
                self._raft_send(raft.leader, "raft_join", message.body)
            return
        if info["node_id"] not in raft.voters:
            self._join_queue[info["node_id"]] = info
        self._admit_next(now_s)

    def _admit_next(self, now_s: float) -> None:
        """Leader: joiners become learners at once; a caught-up learner becomes a voter.

        One configuration change at a time, each right after the previous one commits.
        """
        raft = self.raft
        if raft is None or raft.role != LEADER:
            self._join_queue.clear()
            return
        for node_id in sorted(self._join_queue):
            info = self._join_queue.pop(node_id)
            if raft.add_learner(node_id, {"address": info["address"], "pub_address": info["pub_address"]}, now_s):
                log.info("%s joins as a learner (catching up on the metadata log)", node_id)
        for node_id in raft.drop_stale_learners(now_s, 10 * self.config.election_timeout_s):
            log.warning("%s did not catch up as a learner; dropped (it may ask to join again)", node_id)
        ready = raft.caught_up_learners()
        if ready and raft.can_change_config():
            node_id = ready[0]
            members = dict(raft.voters)
            members[node_id] = raft.learners[node_id]
            # The next admission runs from a timer, never re-entering Raft from its own apply loop.
            if raft.propose({"op": "config", "members": members}, now_s,
                            lambda ok: self._schedule(self._now_s, "retry", self._admit_next)):
                log.info("adding %s to the storage membership (%d members)", node_id, len(members))

    def _remove_silent_members(self, now_s: float) -> None:
        raft = self.raft
        if raft is None or raft.role != LEADER or not raft.can_change_config():
            return
        for peer in raft.silent_voters(now_s, self.config.member_timeout_s):
            members = {k: v for k, v in raft.voters.items() if k != peer}
            if raft.propose({"op": "config", "members": members}, now_s, lambda ok: None):
                log.warning("removing %s from the storage membership: silent for more than %.0f s",
                            peer, self.config.member_timeout_s)
            return

    def _finish_leaves(self, now_s: float) -> None:
        """Metadata leader: a leaving member that no partition names any more is removed for good."""
        raft = self.raft
        if raft is None or raft.role != LEADER or not raft.can_change_config():
            return
        for peer, info in sorted(raft.voters.items()):
            if info.get("leaving") and self.meta.assigned_to(peer) == 0 and len(raft.voters) > 1:
                members = {k: v for k, v in raft.voters.items() if k != peer}
                if raft.propose({"op": "config", "members": members}, now_s, lambda ok: None):
                    log.info("%s left: all its partitions moved away; removed from the storage membership", peer)
                return

    def _leave_state(self, node_id: str, now_s: float) -> dict:
        """Metadata leader: mark ``node_id`` leaving (once) and say how far it got."""
        raft = self.raft
        assert raft is not None and raft.role == LEADER
        if node_id not in raft.voters:
            return {"state": "left", "assigned": 0}
        if not self._mark_leaving(node_id, now_s):
            raise NotLeaderError("the metadata group is busy with a membership change; retry")
        return {"state": "draining", "assigned": self.meta.assigned_to(node_id)}

    def _serve_leave(self, route: Any, message: wire.Message, now_s: float) -> None:
        """``meshq leave``: hand every partition over, then leave the storage membership for good.

        Idempotent: the caller asks again until the answer is ``left``; the node then stops.
        """
        self._require_storage()
        if message.body["node_id"] != self.node_id:
            raise UsageError(f"this is node {self.node_id}, not {message.body['node_id']}: "
                             f"send meshq leave to the node that should leave")
        raft = self.raft
        assert raft is not None
        self.leaving = True
        if raft.role == LEADER:
            answer = self._leave_state(self.node_id, now_s)
            self.has_left = answer["state"] == "left"
            self._reply(route, message.request_id, "leave_ok", answer)
            return
        if self.has_left:
            self._reply(route, message.request_id, "leave_ok", {"state": "left", "assigned": 0})
            return
        if not self._ask_leave(now_s, lambda body: self._reply(route, message.request_id, "leave_ok", body),
                               lambda error: self._reply_error(route, message.request_id, error)):
            raise NotLeaderError("the metadata group has no leader right now; retry")

    def _check_left(self, now_s: float) -> None:
        """A leaving node asks the metadata leader, once a second, whether it is out yet, so it
        stops even if nobody asks ``leave`` again. It cannot tell by itself: the leader stops
        replicating the metadata log to a member it removed, so the node may never apply the
        last steps that drained it. (A metadata leader that leaves steps down once its own
        removal commits, and then asks like any other node.)"""
        raft = self.raft
        if not self.leaving or self.has_left or raft is None or raft.role == LEADER or now_s < self._next_leave_check_s:
            return
        self._next_leave_check_s = now_s + 1.0
        self._ask_leave(now_s, lambda body: None, lambda error: None)

    def _ask_leave(self, now_s: float, answered: Callable[[dict], None],
                   failed: Callable[[MeshqError], None]) -> bool:
        """Ask the metadata leader (ours, else the one peers name) how far our leave got; a ``left``
        answer sets ``has_left``. False when no leader is known."""
        raft = self.raft
        assert raft is not None
        ours = raft.leader if raft.leader not in (None, self.node_id) else None
        leader = ours
        if leader is not None and now_s - raft.last_leader_contact_s > 2 * self.config.election_timeout_s:
            # A leader we no longer hear from (a node left out of the group keeps the last one it
            # knew): ask the one the peers name, if any.
            leader = None
        if leader is None:
            hinted = sorted({c["leader"] for c in self.peer_clusters.values()
                             if c["formed"] and c["leader"] and c["leader"] != self.node_id})
            leader = hinted[0] if hinted else ours
        if leader is None:
            return False

        def on_reply(reply: wire.Message) -> None:
            if reply.type != "leave_ok":
                failed(ProtocolError(f"unexpected {reply.type} to leave"))
                return
            if reply.body["state"] == "left" and not self.has_left:
                log.info("%s: every partition moved away and the membership let it go; leaving the cluster",
                         self.node_id)
                self.has_left = True
            answered(reply.body)

        packed = msgpack.packb({"op": "leave", "node_id": self.node_id}, use_bin_type=True)
        self._request(leader, "raft_propose", {"command": packed}, (), now_s, self.config.request_timeout_s,
                      on_reply, failed)
        return True

    def _mark_leaving(self, node_id: str, now_s: float) -> bool:
        """Metadata leader: take ``node_id`` out of the placement ring (it stays a voter until its
        partitions have moved). False if the metadata group cannot change its configuration now."""
        raft = self.raft
        assert raft is not None
        if node_id not in raft.voters:
            return True  # already gone
        if raft.voters[node_id].get("leaving"):
            return True
        if not raft.can_change_config():
            return False
        members = {k: dict(v) for k, v in raft.voters.items()}
        members[node_id]["leaving"] = True
        if raft.propose({"op": "config", "members": members}, now_s, lambda ok: None):
            log.info("%s is leaving: its partitions move to the other members", node_id)
            return True
        return False

    def _apply_meta(self, index: int, command: dict) -> None:
        changed = self.meta.apply(index, command)
        if isinstance(changed, str) and self.is_storage:
            self._open_partitions(self.meta.topics[changed])
            log.info("topic %s (%d partitions) is agreed", changed, self.meta.topics[changed].partitions)
        elif isinstance(changed, tuple) and self.is_storage:
            self._reconfigure_partition(changed)
        if command.get("op") == "config":
            for node_id, info in sorted(self.meta.members.items()):
                if node_id != self.node_id and self.members is not None and node_id not in self.members:
                    # A restarted node may know its fellow voters only from the log: meet them.
                    self._learn({"node_id": node_id, "address": info["address"],
                                 "pub_address": info["pub_address"], "role": "storage", "incarnation": 0},
                                self._now_s)
        while self._apply_waiters and self._apply_waiters[0][0] <= index:
            _index, _seq, callback = heapq.heappop(self._apply_waiters)
            callback()

    def _propose(self, command: dict, now_s: float, deadline_s: float,
                 done: Callable[[MeshqError | None], None]) -> None:
        """Commit ``command`` through the metadata leader; ``done`` runs once it is applied here."""
        raft = self.raft
        if raft is None:
            done(NotLeaderError(f"node {self.node_id} is a client"))
            return
        if raft.role == LEADER:
            if command.get("op") == "leave":
                done(None if self._mark_leaving(command["node_id"], now_s) else NotLeaderError(
                    "the metadata group is busy with a membership change; retry"))
                return
            if command.get("op") == "create_topic" and command.get("assignment") is None:
                config = TopicConfig.from_wire(command["config"])
                command = {**command, "assignment": self.meta.assign(config)}
            accepted = raft.propose(command, now_s, lambda ok: done(None if ok else NotLeaderError(
                "the metadata leader changed before the change committed; retry")))
            if not accepted:
                done(NotLeaderError("the metadata group is busy with a membership change; retry"))
            return
        leader = raft.leader
        if leader is None or leader == self.node_id:
            done(NotLeaderError("the metadata group has no leader yet; retry"))
            return

        def on_reply(message: wire.Message) -> None:
            index = message.body["index"]
            if self.meta.applied_index >= index:
                done(None)
            else:
                self._timer_seq += 1
                heapq.heappush(self._apply_waiters, (index, self._timer_seq, lambda: done(None)))

        packed = msgpack.packb(command, use_bin_type=True)
        self._request(leader, "raft_propose", {"command": packed}, (), now_s, max(0.05, deadline_s - now_s),
                      on_reply, done)

    def _serve_raft_propose(self, route: Any, message: wire.Message, now_s: float) -> None:
        raft = self.raft
        if raft is None or raft.role != LEADER:
            raise NotLeaderError(f"{self.node_id} is not the metadata leader (leader: {raft.leader if raft else None})")
        try:
            command = msgpack.unpackb(message.body["command"], raw=False, strict_map_key=True, max_ext_len=0)
        except Exception:  # msgpack raises several unrelated exception types
            raise ProtocolError("raft_propose command does not decode") from None
        op = command.get("op") if isinstance(command, dict) else None
        if op == "reassign":
            self._propose_for_peer(route, message.request_id, wire.REASSIGN(command, "command"), now_s)
            return
        if op == "leave":
            if wire.NODE(command.get("node_id"), "command.node_id") != message.sender:
                raise ProtocolError("a node may only ask for itself to leave")
            self._reply(route, message.request_id, "leave_ok", self._leave_state(message.sender, now_s))
            return
        if op != "create_topic":
            raise ProtocolError("a peer may propose only create_topic, reassign or leave")
        config = TopicConfig.from_wire(wire.TOPIC_CONFIG(command.get("config"), "command.config"))
        if config.name == OFFSETS_TOPIC:
            config = self._offsets_topic_config()  # internal: its configuration is ours, never a peer's
        elif config.name.startswith("__"):
            raise InvalidTopicError(f"topic names starting with '__' are reserved for meshq ({config.name!r})")
        existing = self.meta.topics.get(config.name)
        if existing is not None:
            self._reply(route, message.request_id, "raft_propose_ok", {"index": self.meta.applied_index})
            return
        command = {"op": "create_topic", "config": config.to_wire(), "assignment": self.meta.assign(config)}
        self._propose_for_peer(route, message.request_id, command, now_s)

    def _propose_for_peer(self, route: Any, request_id: int, command: dict, now_s: float) -> None:
        """Metadata leader: append a peer's command; answer with its index once committed."""
        raft = self.raft
        assert raft is not None
        reply_index = raft.last_index + 1

        def on_done(ok: bool) -> None:
            if ok:
                self._reply(route, request_id, "raft_propose_ok", {"index": reply_index})
            else:
                self._reply_error(route, request_id, NotLeaderError("metadata leader changed; retry"))

        if not raft.propose(command, now_s, on_done):
            raise NotLeaderError("the metadata group cannot take a change right now; retry")

    # ================================================================== server half
    def _serve(self, route: Any, message: wire.Message, now_s: float) -> None:
        name = _SERVERS.get(message.type)
        if name is None:
            # A reply type sent as a request: the peer is confused; drop and count it.
            self.counters["frames_invalid"] += 1
            return
        try:
            getattr(self, name)(route, message, now_s)
        except MeshqError as exc:
            self._reply_error(route, message.request_id, exc)

    def _serve_metadata(self, route: Any, message: wire.Message, now_s: float) -> None:
        self._require_storage()
        names = message.body["topics"]
        if names is None:
            names = sorted(name for name in self.meta.topics if not name.startswith("__"))
        missing = [name for name in names if name not in self.meta.topics
                   and (name == OFFSETS_TOPIC or (message.body["auto_create"] and self.config.auto_create_topics))]
        if missing:
            name = missing[0]
            config = self._offsets_topic_config() if name == OFFSETS_TOPIC else self._default_topic_config(name)

            def created(error: MeshqError | None) -> None:
                if error is not None:
                    self._reply_error(route, message.request_id, error)
                else:
                    self._serve_metadata(route, message, self._now_s)

            self._propose({"op": "create_topic", "config": config.to_wire()}, now_s,
                          now_s + self.config.request_timeout_s, created)
            return
        topics = [self._topic_meta(self.meta.topics[name]) for name in names if name in self.meta.topics]
        self._reply(route, message.request_id, "metadata_ok", {"members": self._member_list(), "topics": topics})

    def _serve_create_topic(self, route: Any, message: wire.Message, now_s: float) -> None:
        self._require_storage()
        config = TopicConfig.from_wire(message.body["config"])
        if config.name.startswith("__"):
            raise InvalidTopicError(f"topic names starting with '__' are reserved for meshq ({config.name!r})")
        existing = self.meta.topics.get(config.name)
        if existing is not None:
            if not message.body["if_not_exists"]:
                raise InvalidTopicError(f"topic {config.name!r} already exists")
            self._reply(route, message.request_id, "create_topic_ok",
                        {"topic": self._topic_meta(existing), "created": False})
            return

        def created(error: MeshqError | None) -> None:
            if error is not None:
                self._reply_error(route, message.request_id, error)
                return
            self._reply(route, message.request_id, "create_topic_ok",
                        {"topic": self._topic_meta(self.meta.topics[config.name]), "created": True})

        self._propose({"op": "create_topic", "config": config.to_wire()}, now_s,
                      now_s + self.config.request_timeout_s, created)

    def _serve_produce(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        state = self._leader_state(body["topic"], body["partition"])
        self._check_lease(state, now_s)
        data = message.payloads[0]
        header = batch_format.verify_batch(data, self.config.batch_max_bytes * 2)
        base_offset, duplicate = state.append(data, header, self.wall_clock_ms())
        if duplicate:
            self.counters["duplicates_dropped"] += header.record_count
        else:
            self.counters["records_produced"] += header.record_count
            self.counters["batches_produced"] += 1
            self._on_appended(state, now_s)
        if body["acks"] == "none":
            return
        reply = {"topic": state.topic, "partition": state.partition, "base_offset": base_offset, "duplicate": duplicate}
        # A retry of a stored batch waits like the original: its records may not have reached
        # the acks level yet (the first attempt's answer may have been lost before they did).
        needed = base_offset + header.record_count
        timeout_s = min(body["timeout_ms"] / 1000.0, self.config.request_timeout_s) if body["timeout_ms"] else \
            self.config.request_timeout_s

        self._wait_for_acks(state, needed, body["acks"], now_s + timeout_s,
                            self._answer(route, message.request_id, "produce_ok", reply))

    def _wait_for_acks(self, state: PartitionState, needed: int, acks: str, deadline_s: float,
                       callback: Callable[[MeshqError | None], None]) -> None:
        """Run ``callback(None)`` once the records below ``needed`` reach ``acks``, else an error."""
        replica = state.replica
        if replica.reached(acks, needed, self._now_s):
            callback(None)
            return
        state.waiters.append(AckWaiter(needed, acks, deadline_s, callback))
        self._schedule(deadline_s, "acks", state.key)

    def _check_waiters(self, state: PartitionState, now_s: float) -> None:
        """Answer the waiters whose records reached their level, failed or timed out."""
        if not state.waiters:
            return
        replica = state.replica
        keep = []
        for waiter in state.waiters:
            if not replica.is_leader:
                waiter.callback(NotLeaderError(
                    f"{self.node_id} stopped leading {state.topic}/{state.partition} before the records reached "
                    f"acks={waiter.acks}; retry (the idempotent producer does not store them twice)"))
            elif replica.reached(waiter.acks, waiter.needed, now_s):
                waiter.callback(None)
            elif waiter.deadline_s <= now_s:
                in_sync = replica.in_sync(now_s)
                if len(in_sync) < replica.quorum:
                    waiter.callback(NotEnoughReplicasError(
                        f"acks={waiter.acks} on {state.topic}/{state.partition} needs {replica.quorum} of the "
                        f"replicas {', '.join(replica.replicas)}; only {', '.join(in_sync)} answered in time"))
                else:
                    waiter.callback(TimeoutError(
                        f"records on {state.topic}/{state.partition} did not reach acks={waiter.acks} in time"))
            else:
                keep.append(waiter)
        state.waiters = keep

    def _serve_fetch(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        state = self._leader_state(body["topic"], body["partition"])
        if (body["offset"] >= state.high_watermark and body["max_wait_ms"] > 0
                and len(state.parked_fetches) < MAX_PARKED_FETCHES):
            deadline = now_s + min(body["max_wait_ms"], MAX_FETCH_WAIT_MS) / 1000.0
            state.parked_fetches.append(ParkedFetch(route, message.request_id, body, deadline))
            self._schedule(deadline, "fetch", state.key)
            return
        self._answer_fetch(state, route, message.request_id, body)

    def _check_lease(self, state: PartitionState, now_s: float) -> None:
        """Refuse (before any state change) a write this leader cannot vouch for.

        A leader whose lease lapsed (a majority of its replica set has not answered within the
        election timeout: it is cut off, or was paused) may already be deposed, so it takes no
        write at any acks level: a stale leader never acknowledges anything.
        """
        replica = state.replica
        if replica.handing_off(now_s):
            raise NotLeaderError(f"{self.node_id} is handing leadership of {state.topic}/{state.partition} to "
                                 f"{replica.replicas[0]}; refresh metadata and retry")
        if not replica.lease_valid(now_s):
            raise NotEnoughReplicasError(
                f"{self.node_id} leads {state.topic}/{state.partition} but has not heard from a majority of its "
                f"replicas ({', '.join(replica.replicas)}) recently; it refuses writes rather than diverge. "
                f"Retry: a leader on the majority side takes over")

    def _answer_fetch(self, state: PartitionState, route: Any, request_id: int, body: dict) -> None:
        offset = body["offset"]
        high_watermark = state.high_watermark
        data = b""
        if offset < high_watermark:
            data = state.log.read(offset, body["max_bytes"])
            if high_watermark < state.log.end_offset:  # only then can the read hold uncommitted batches
                data = _cut_at_offset(data, high_watermark)
            self.counters["records_fetched_bytes"] += len(data)
        elif offset > state.log.end_offset:
            raise OffsetOutOfRangeError(
                f"offset {offset} is past the end {state.log.end_offset} of {state.topic}/{state.partition}"
            )
        reply = {"topic": state.topic, "partition": state.partition, "high_watermark": high_watermark,
                 "log_start_offset": state.log.start_offset}
        self._reply(route, request_id, "fetch_ok", reply, (data,) if data else ())

    def _on_appended(self, state: PartitionState, now_s: float) -> None:
        """The leader stored a batch: replicate it (its readers wait for the high watermark)."""
        self._dirty_logs.add(state.key)
        if self.config.fsync == "always":
            self._effects.append(SyncLogs(frozenset([state.key])))
        state.replica.on_local_append(now_s)

    def _answer_parked(self, state: PartitionState, fetch: ParkedFetch) -> None:
        try:
            if not state.replica.is_leader:
                raise NotLeaderError(f"{self.node_id} no longer leads {state.topic}/{state.partition}; "
                                     f"refresh metadata")
            self._answer_fetch(state, fetch.route, fetch.request_id, fetch.body)
        except MeshqError as exc:
            self._reply_error(fetch.route, fetch.request_id, exc)

    def _expire_parked(self, key: tuple[str, int], now_s: float) -> None:
        state = self.partitions.get(key)
        if state is None:
            return
        keep = []
        for fetch in state.parked_fetches:
            if fetch.deadline_s <= now_s:
                self._answer_parked(state, fetch)
            else:
                keep.append(fetch)
        state.parked_fetches = keep

    def _on_synced(self, keys: frozenset) -> None:
        for key in sorted(keys):
            state = self.partitions.get(key)
            if state is not None:
                state.replica.on_synced(self._now_s)
                self._on_replica_change(key)

    def _on_replica_change(self, key: tuple[str, int]) -> None:
        """Leadership or the high watermark of a local replica changed: answer who waits on it."""
        state = self.partitions.get(key)
        if state is None:
            return
        replica = state.replica
        was_leader = key in self._leading
        if replica.is_leader and not was_leader:
            self._leading.add(key)
            if key[0] == OFFSETS_TOPIC:
                self._replay_group_offsets(key)
        elif not replica.is_leader and was_leader:
            self._leading.discard(key)
            if key[0] == OFFSETS_TOPIC:
                for group_key in [k for k in self.group_offsets if self._offsets_partition(k[0]) == key[1]]:
                    del self.group_offsets[group_key]
        self._check_waiters(state, self._now_s)
        if state.parked_fetches:
            high_watermark = state.high_watermark
            keep = []
            for fetch in state.parked_fetches:  # the high watermark moved (or leadership went): answer now
                if not replica.is_leader or fetch.body["offset"] < high_watermark:
                    self._answer_parked(state, fetch)
                else:
                    keep.append(fetch)
            state.parked_fetches = keep

    def _serve_list_offsets(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        state = self._leader_state(body["topic"], body["partition"])
        timestamp_ms = body["timestamp_ms"]
        if timestamp_ms == EARLIEST:
            offset = state.log.start_offset
        elif timestamp_ms == LATEST:
            offset = state.high_watermark
        else:
            offset = min(state.log.offset_for_timestamp(timestamp_ms), state.high_watermark)
        self._reply(route, message.request_id, "list_offsets_ok", {"offset": offset})

    def _serve_offset_commit(self, route: Any, message: wire.Message, now_s: float) -> None:
        group = message.body["group"]
        state = self._leader_state(OFFSETS_TOPIC, self._offsets_partition(group))
        records = []
        now_ms = self.wall_clock_ms()
        for entry in message.body["offsets"]:
            key = msgpack.packb([group, entry["topic"], entry["partition"]])
            records.append((key, msgpack.packb(entry["offset"]), None, now_ms))
        if not records:
            self._reply(route, message.request_id, "offset_commit_ok", {})
            return
        self._check_lease(state, now_s)
        data = batch_format.encode_batch(records)
        state.append(data, batch_format.parse_header(data), now_ms)
        self._on_appended(state, now_s)
        for entry in message.body["offsets"]:
            self.group_offsets[(group, entry["topic"], entry["partition"])] = entry["offset"]

        # Committed offsets are as durable as acks=quorum records: a failover cannot rewind a group.
        self._wait_for_acks(state, state.log.end_offset, "quorum", now_s + self.config.request_timeout_s,
                            self._answer(route, message.request_id, "offset_commit_ok", {}))

    def _serve_offset_fetch(self, route: Any, message: wire.Message, now_s: float) -> None:
        group, topic = message.body["group"], message.body["topic"]
        self._leader_state(OFFSETS_TOPIC, self._offsets_partition(group))
        offsets = [
            {"topic": t, "partition": p, "offset": o}
            for (g, t, p), o in sorted(self.group_offsets.items())
            if g == group and t == topic
        ]
        self._reply(route, message.request_id, "offset_fetch_ok", {"offsets": offsets})

    def _serve_status(self, route: Any, message: wire.Message, now_s: float) -> None:
        self._reply(route, message.request_id, "status_ok", {"status": self.local_status()})

    # ------------------------------------------------------------------ server helpers
    def _require_storage(self) -> None:
        if not self.is_storage:
            raise NotLeaderError(f"node {self.node_id} is a client and holds no partitions")

    def _leader_state(self, topic: str, partition: int) -> PartitionState:
        state = self.partitions.get((topic, partition))
        if state is not None and state.replica.is_leader:
            return state
        validate_topic_name(topic)
        if not self.is_storage:
            raise NotLeaderError(f"node {self.node_id} is a client and leads no partition")
        config = self.meta.topics.get(topic)
        if config is None:
            raise UnknownTopicError(f"topic {topic!r} does not exist (as far as {self.node_id} knows)")
        if not 0 <= partition < config.partitions:
            raise UnknownTopicError(f"topic {topic!r} has {config.partitions} partitions; {partition} does not exist")
        leader = self._current_leader(topic, partition)
        raise NotLeaderError(f"{self.node_id} does not lead {topic}/{partition}; its leader is "
                             f"{leader or 'being elected'} (refresh metadata)")

    def _default_topic_config(self, name: str) -> TopicConfig:
        validate_topic_name(name)
        if name.startswith("__"):
            raise InvalidTopicError(f"topic names starting with '__' are reserved for meshq ({name!r})")
        return TopicConfig(name=name, partitions=self.config.partitions,
                           replication_factor=self.config.replication_factor)

    def _offsets_topic_config(self) -> TopicConfig:
        return TopicConfig(name=OFFSETS_TOPIC, partitions=self.config.partitions,
                           replication_factor=self.config.replication_factor, retention_ms=None,
                           cleanup_policy="compact")

    def _offsets_partition(self, group: str) -> int:
        config = self.topics.get(OFFSETS_TOPIC) or self._offsets_topic_config()
        return stable_hash64(group.encode()) % config.partitions

    def _open_partitions(self, config: TopicConfig) -> None:
        """Open the replicas this node holds of ``config``'s partitions and start replicating."""
        for partition in range(config.partitions):
            voters, learners, _version = self.meta.partition_config(config.name, partition)
            if self.node_id in voters or self.node_id in learners:
                self._open_partition((config.name, partition))

    def _open_partition(self, key: tuple[str, int]) -> None:
        if key in self.partitions:
            return
        topic, partition = key
        voters, learners, version = self.meta.partition_config(topic, partition)
        state = PartitionState(topic, partition, self.storage.open_log(topic, partition))
        self.partitions[key] = state
        name = persisted_name(topic, partition)
        replica = Replica(
            self.node_id, state, voters, self.storage.read_meta(name), self.rng,
            send=self._send_to_member,
            save=lambda value, name=name: self.storage.write_meta(name, value),
            request_sync=lambda key=key: self._effects.append(SyncLogs(frozenset([key]))),
            on_change=lambda key=key: self._on_replica_change(key),
            on_follower_append=lambda key=key: self._dirty_logs.add(key),
            wall_clock_ms=self.wall_clock_ms,
            election_timeout_s=self.config.election_timeout_s,
            heartbeat_interval_s=self.config.raft_heartbeat_interval_s,
            replica_lag_s=self.config.failure_timeout_s,
            fsync_always=self.config.fsync == "always",
            learners=learners, config_version=version,
        )
        replica.start(self._now_s)
        if replica.next_deadline() <= self._now_s:
            replica.on_timer(self._now_s)  # a sole or preferred replica campaigns at once

    def _reconfigure_partition(self, key: tuple[str, int]) -> None:
        """A reassignment step of ``key`` was agreed: adopt it, start copying it, or let it go."""
        self._reassigning.pop(key, None)
        voters, learners, version = self.meta.partition_config(*key)
        state = self.partitions.get(key)
        if state is not None and version <= state.replica.config_version:
            return  # replaying the metadata log: the replica already knew a newer configuration
        if self.node_id in voters or self.node_id in learners:
            if state is None:
                log.info("%s/%d: now a %s here; copying it from the leader", key[0], key[1],
                         "voter" if self.node_id in voters else "learner")
                self._open_partition(key)
            else:
                state.replica.set_config(voters, learners, version, self._now_s)
            return
        if state is None:
            return
        # Every step that drops a replica was proposed only once the target replicas confirmed a
        # checked copy of everything committed (metadata.next_step), so this copy may go.
        state.replica.set_config(voters, learners, version, self._now_s)  # a leader hands over first
        self._on_replica_change(key)
        del self.partitions[key]
        self._leading.discard(key)
        self._dirty_logs.discard(key)
        for fetch in state.parked_fetches:
            self._reply_error(fetch.route, fetch.request_id, NotLeaderError(
                f"{key[0]}/{key[1]} moved away from {self.node_id}; refresh metadata"))
        state.parked_fetches = []
        state.log.close()
        self.storage.delete_log(*key)
        self.storage.write_meta(persisted_name(*key), {})
        log.info("%s/%d: moved to %s; the copy here is deleted", key[0], key[1], ", ".join(voters))

    def _rebalance_tick(self, now_s: float) -> None:
        """Partition leader: propose the next step towards the ring placement (metadata.next_step)."""
        if not self.is_storage or self.raft is None or not self.meta.members:
            return
        for key, state in sorted(self.partitions.items()):
            replica = state.replica
            if (not replica.is_leader or self._reassigning.get(key, 0.0) > now_s
                    or not replica.lease_valid(now_s) or not replica.config_established()):
                continue
            topic, partition = key
            voters, learners, version = self.meta.partition_config(topic, partition)
            if version != replica.config_version:
                continue  # applied metadata and the replica disagree only within one call
            step = next_step(voters, learners, self.meta.target(topic, partition), self.meta.members,
                             replica.caught_up(now_s), replica.in_contact(now_s), self.node_id)
            if step is None:
                continue
            command = {"op": "reassign", "topic": topic, "partition": partition, "version": version,
                       "replicas": step[0], "learners": step[1]}
            deadline = now_s + self.config.request_timeout_s
            self._reassigning[key] = deadline
            log.info("%s/%d: proposing replicas %s, learners %s (from %s, %s)", topic, partition,
                     step[0], step[1], voters, learners)
            # Applied (as a step, or refused by the compare-and-set) or failed: free to propose again.
            self._propose(command, now_s, deadline, lambda error, key=key: self._reassigning.pop(key, None))

    def _serve_replica(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        state = self.partitions.get((body["topic"], body["partition"]))
        if state is None:
            return  # not (yet) a replica here: the sender retries on its next heartbeat
        state.replica.handle(message.sender, message.type, body, message.payloads, now_s)

    def _current_leader(self, topic: str, partition: int) -> str | None:
        """Best knowledge of a partition's leader: our own replica's, else the heartbeats'."""
        state = self.partitions.get((topic, partition))
        if state is not None and state.replica.leader is not None and not self._known_dead(state.replica.leader):
            return state.replica.leader
        hint = self.leader_hints.get((topic, partition))
        if hint is not None and self._liveness(hint[1]) == "alive":
            return hint[1]
        return None

    def _known_dead(self, node_id: str) -> bool:
        return self._liveness(node_id) == "gone"

    def _liveness(self, node_id: str) -> str:
        """``alive`` (ourselves, or alive or suspect in the member table), ``gone`` (dead, left,
        joining) or ``unknown`` (not in the member table)."""
        if node_id == self.node_id:
            return "alive"
        member = self.members.get(node_id) if self.members is not None else None
        if member is None:
            return "unknown"
        return "alive" if member.state in ("alive", "suspect") else "gone"

    def _replay_group_offsets(self, only: tuple[str, int] | None = None) -> None:
        for (topic, partition), state in sorted(self.partitions.items()):
            if topic != OFFSETS_TOPIC or (only is not None and (topic, partition) != only):
                continue
            offset = state.log.start_offset
            while offset < state.log.end_offset:
                try:
                    data = state.log.read(offset, 16 * 1024 * 1024)
                except CorruptLogError as exc:
                    log.error("%s/%d: committed offsets replayed only up to offset %d: %s",
                              topic, partition, offset, exc)
                    break
                if not data:
                    break
                for record in batch_format.decode_records(data, topic, partition, offset):
                    group, t, p = msgpack.unpackb(record.key)
                    self.group_offsets[(group, t, p)] = msgpack.unpackb(record.value)
                    offset = record.offset + 1

    def _apply_retention(self, now_s: float) -> None:
        now_ms = self.wall_clock_ms()
        for (topic, _partition), state in sorted(self.partitions.items()):
            config = self.topics[topic]
            if config.cleanup_policy != "delete":
                continue
            removed = state.log.apply_retention(now_ms, config.retention_bytes, config.retention_ms)
            if removed:
                log.info("retention removed %d records from %s/%d", removed, topic, _partition)

    def _member_list(self) -> list[dict]:
        """Known nodes with their state; agreed storage members we never heard from show as unknown."""
        assert self.members is not None
        listed = {m["node_id"]: m for m in self.members.summaries()}
        for node_id, info in self.meta.members.items():
            if node_id not in listed:
                listed[node_id] = {"node_id": node_id, "address": info["address"], "role": "storage",
                                   "state": "unknown"}
        return [listed[node_id] for node_id in sorted(listed)]

    def _topic_meta(self, config: TopicConfig) -> dict:
        partitions = []
        for p, replicas in enumerate(self.meta.assignments.get(config.name, [])):
            state = self.partitions.get((config.name, p))
            replica = state.replica if state is not None else None
            _voters, learners, version = self.meta.partition_config(config.name, p)
            entry = {
                "partition": p,
                "leader": self._current_leader(config.name, p),
                "replicas": list(replicas),
                "in_sync": [],
                "high_watermark": replica.high_watermark if replica is not None else 0,
                # rebalancing: where the ring places it now; learners are copies being made
                "learners": list(learners),
                "target": self.meta.target(config.name, p) if len(self.meta.ring) else list(replicas),
                "config_version": version,
            }
            if replica is not None:
                # Only the leader knows who is in sync; merge_status prefers the leader's view.
                entry["in_sync"] = replica.in_sync(self._now_s)
                entry["epoch"] = replica.epoch
                entry["role"] = replica.role
                entry["end_offset"] = replica.log.end_offset
            partitions.append(entry)
        return {"config": config.to_wire(), "partitions": partitions}

    def handoffs(self) -> int:
        """Partitions not yet where the ring places them (copies being made or replicas leaving)."""
        if not len(self.meta.ring):
            return 0
        return sum(1 for topic, assignment in self.meta.assignments.items() for p, replicas in enumerate(assignment)
                   if self.meta.learners[topic][p] or replicas != self.meta.target(topic, p))

    def under_replicated(self) -> int:
        """Partitions led here whose in-sync replicas are fewer than their assigned replicas."""
        return sum(1 for state in self.partitions.values()
                   if state.replica.is_leader and len(state.replica.in_sync(self._now_s)) < len(state.replica.replicas))

    def _leads(self) -> list[list]:
        return [[topic, partition, state.replica.epoch] for (topic, partition), state in sorted(self.partitions.items())
                if state.replica.is_leader]

    def local_status(self) -> dict:
        """This node's view in the shape of ``meshq status --json``."""
        topics = []
        for name, config in sorted(self.topics.items()):
            meta = self._topic_meta(config)
            topics.append({"name": name, "config": meta["config"], "partitions": meta["partitions"]})
        groups: dict[str, dict] = {}
        for (group, topic, partition), committed in sorted(self.group_offsets.items()):
            state = self.partitions.get((topic, partition))
            high_watermark = state.high_watermark if state else committed
            entry = groups.setdefault(group, {"group": group, "partitions": []})
            entry["partitions"].append({
                "topic": topic, "partition": partition, "committed": committed,
                "high_watermark": high_watermark, "lag": max(0, high_watermark - committed),
            })
        status = {
            "cluster": self.config.cluster,
            "node_id": self.node_id,
            "members": self._member_list(),
            "topics": topics,
            "groups": list(groups.values()),
            "counters": dict(self.counters),
        }
        if self.raft is not None:
            status["metadata"] = {**self.raft.status(), "applied_index": self.meta.applied_index}
            status["ring"] = {"members": list(self.meta.ring.members), "vnodes": self.meta.ring.vnodes}
        return status

    # ================================================================== client half
    def storage_peers(self) -> list[str]:
        """Live storage members this node can send requests to (itself when it is in the cluster)."""
        assert self.members is not None
        peers = [node for node in self.members.alive_ids("storage") if node in self.peer_endpoints]
        if self.raft is not None and self.raft.is_member:
            peers.append(self.node_id)
        return sorted(peers)

    def _any_storage_peer(self) -> str | None:
        peers = self.storage_peers()
        if self.node_id in peers:
            return self.node_id
        return self.rng.choice(peers) if peers else None

    def _with_metadata(self, topic: str, now_s: float, deadline_s: float,
                       then: Callable[[MeshqError | None], None], auto_create: bool = True) -> None:
        """Run ``then(None)`` once metadata for ``topic`` is known, or ``then(error)`` at ``deadline_s``."""
        if topic in self.metadata:
            then(None)
            return
        waiters = self.awaiting_metadata.setdefault(topic, [])
        waiters.append((deadline_s, then))
        if len(waiters) == 1:
            self._refresh_metadata(topic, now_s, auto_create)

    def _refresh_metadata(self, topic: str, now_s: float, auto_create: bool) -> None:
        """One metadata request for every waiter of ``topic``; each waiter keeps its own deadline."""
        waiters = self.awaiting_metadata.get(topic, [])
        if not waiters:
            return
        deadline_s = max(deadline for deadline, _then in waiters)

        def finish(error: MeshqError | None) -> None:
            pending = self.awaiting_metadata.pop(topic, [])
            if error is None or self.stopped or not error.retriable:
                for _deadline, callback in pending:
                    callback(error)
                return
            now = self._now_s
            alive = [(d, c) for d, c in pending if now + _METADATA_RETRY_S < d]
            for deadline, callback in pending:
                if (deadline, callback) not in alive:
                    callback(error)
            if alive:
                self.awaiting_metadata[topic] = alive
                self._schedule(now + _METADATA_RETRY_S, "retry",
                               lambda t: self._refresh_metadata(topic, t, auto_create))

        peer = self._any_storage_peer()
        if peer is None:
            finish(TimeoutError(
                "no storage node is reachable yet: check --seed / mDNS, and that a `meshq node` is running"
            ))
            return

        def on_reply(message: wire.Message) -> None:
            self._absorb_metadata(message.body)
            if topic in self.metadata:
                finish(None)
            else:
                finish(UnknownTopicError(f"topic {topic!r} does not exist (and auto-creation is off)"))

        self._request(peer, "metadata", {"topics": [topic], "auto_create": auto_create}, (), now_s,
                      min(self.config.request_timeout_s, max(0.05, deadline_s - now_s)), on_reply, finish)

    def _absorb_metadata(self, body: dict) -> None:
        for member in body["members"]:
            node_id = member["node_id"]
            if node_id != self.node_id and member["role"] == "storage" and member["state"] in ("alive", "suspect"):
                self._connect(node_id, member["address"])
        for meta in body["topics"]:
            config = TopicConfig.from_wire(meta["config"])
            self.metadata[config.name] = {
                "config": config,
                "leaders": [p["leader"] for p in meta["partitions"]],
            }

    def _leader_of(self, topic: str, partition: int) -> str | None:
        meta = self.metadata.get(topic)
        if meta is None or partition >= len(meta["leaders"]):
            return None
        return meta["leaders"][partition]

    # ------------------------------------------------------------------ produce
    def _produce(self, command: ProduceCommand, now_s: float) -> None:
        if self.stopped:
            self._fail_records(command, NodeStoppedError("the node is stopped"))
            return
        try:
            validate_topic_name(command.topic)
        except MeshqError as exc:
            self._fail_records(command, exc)
            return

        def ready(error: MeshqError | None) -> None:
            if error is not None:
                self._fail_records(command, error)
                return
            if command.topic not in self.metadata:
                # Another waiter's retry dropped the metadata again before this one ran: wait again.
                self._with_metadata(command.topic, self._now_s, command.deadline_s, ready)
                return
            self._enqueue_records(command, self._now_s)

        self._with_metadata(command.topic, now_s, command.deadline_s, ready)

    def _fail_records(self, command: ProduceCommand, error: MeshqError) -> None:
        if command.waiter is not None:
            self._effects.append(ResolveProduce(command.waiter, range(len(command.records)), command.records,
                                                command.topic, -1, -1, error))

    def _enqueue_records(self, command: ProduceCommand, now_s: float) -> None:
        from operator import itemgetter  # local: only this function of node.py may change here

        get_key, get_value, get_headers = itemgetter(0), itemgetter(1), itemgetter(2)
        sizes: dict[int, int] = {}  # id(headers dict) -> estimated bytes (produce_batch shares one dict)

        def header_size(headers: Any) -> int:
            if not headers:
                return 0
            size = sizes.get(id(headers))
            if size is None:
                try:
                    size = sum(len(k.encode()) + len(v) + 10 for k, v in headers.items())
                except (AttributeError, TypeError):
                    size = 0  # not str -> bytes: encode_batch or the leader refuses the batch
                sizes[id(headers)] = size
            return size

        keyless = False
        config: TopicConfig = self.metadata[command.topic]["config"]
        records = command.records
        groups: dict[int, tuple[list, Any]]
        if command.partition is not None:
            if not 0 <= command.partition < config.partitions:
                self._fail_records(command, UsageError(
                    f"partition {command.partition} does not exist; {command.topic!r} has {config.partitions}"))
                return
            groups = {command.partition: (records, range(len(records)))}
        else:
            keyless_partition = self.sticky.get(command.topic)
            if keyless_partition is None:
                keyless_partition = self.rng.randrange(config.partitions)
            self.sticky[command.topic] = (keyless_partition + 1) % config.partitions
            if list(map(get_key, records)).count(None) == len(records):  # one pass at C speed
                keyless = True
                groups = {keyless_partition: (records, range(len(records)))}
            else:
                groups = {}
                for index, record in enumerate(records):
                    key = record[0]
                    partition = keyless_partition if key is None else partition_for_key(key, config.partitions)
                    group = groups.get(partition)
                    if group is None:
                        group = groups[partition] = ([], [])
                    group[0].append(record)
                    group[1].append(index)
        limit_records = self.config.batch_max_records
        limit_bytes = self.config.batch_max_bytes - 1024
        for partition, (part_records, part_indexes) in sorted(groups.items()):
            pp = self.producer_partitions.get((command.topic, partition))
            if pp is None:
                pp = self.producer_partitions[(command.topic, partition)] = ProducerPartition()
            start = 0
            total = len(part_records)
            # Size estimate per record: value + key + header bytes + 16 (msgpack framing). A whole
            # window is summed at C speed; the per-record loop runs only where a split is needed.
            while start < total:
                end = min(total, start + limit_records)
                window = part_records if (start, end) == (0, total) else part_records[start:end]
                size = sum(map(len, map(get_value, window))) + 16 * (end - start)
                if not keyless:
                    size += sum(map(len, filter(None, map(get_key, window))))
                with_headers = any(map(get_headers, window))
                if with_headers:
                    size += sum(map(header_size, map(get_headers, window)))
                if size > limit_bytes:
                    end, size = start, 0
                    while end < total and end - start < limit_records:
                        record = part_records[end]
                        size += (len(record[1]) + (len(record[0]) if record[0] else 0)
                                 + (header_size(record[2]) if with_headers else 0) + 16)
                        if size > limit_bytes and end > start:
                            break
                        end += 1
                chunk = part_records[start:end] if (start, end) != (0, total) else part_records
                if command.acks == "none":
                    # Fire and forget is never retried, so a lost batch must not leave a gap that
                    # blocks later ones: its own producer id and a gap-tolerant sequence.
                    out = OutBatch(command.topic, partition, chunk, part_indexes[start:end], command.waiter,
                                   command.acks, command.deadline_s, batch_format.NO_SEQUENCE)
                    out.data = batch_format.encode_batch(
                        chunk, producer_id=self.at_most_once_id, producer_epoch=0,
                        base_sequence=pp.next_at_most_once, attributes=batch_format.AT_MOST_ONCE)
                    pp.next_at_most_once += len(chunk)
                else:
                    out = OutBatch(command.topic, partition, chunk, part_indexes[start:end], command.waiter,
                                   command.acks, command.deadline_s, pp.next_sequence)
                    pp.next_sequence += len(chunk)
                    out.data = batch_format.encode_batch(
                        chunk, producer_id=self.producer_id, producer_epoch=self.producer_epoch,
                        base_sequence=out.base_sequence,
                    )
                if len(out.data) > self.config.batch_max_bytes * 2:
                    self._fail_batch(out, _too_large(len(out.data), self.config.batch_max_bytes * 2))
                else:
                    pp.queue.append(out)
                start = end
            self._pump((command.topic, partition), now_s)

    def _pump(self, key: tuple[str, int], now_s: float) -> None:
        pp = self.producer_partitions[key]
        window = min(self.config.max_in_flight_per_partition, PRODUCER_WINDOW)
        while pp.queue and pp.in_flight < window:
            out = pp.queue[0]
            if out.deadline_s <= now_s:
                pp.queue.popleft()
                self._fail_batch(out, TimeoutError(
                    f"produce to {out.topic}/{out.partition} did not complete before its deadline"))
                continue
            while pp.sent_log and pp.sent_log[0].settled:
                pp.sent_log.popleft()
            if out.attempts == 0 and out.acks != "none" and len(pp.sent_log) >= window:
                break  # never run more than the leader's dedupe window past an unsettled batch
            leader = self._leader_of(*key)
            if leader is None or (leader != self.node_id and leader not in self.peer_endpoints):
                self._retry_later(out, pp, NotLeaderError(f"no known leader for {key[0]}/{key[1]}"), now_s,
                                  requeue=False)
                return
            pp.queue.popleft()
            self._send_batch(out, leader, pp, now_s)

    def _send_batch(self, out: OutBatch, leader: str, pp: ProducerPartition, now_s: float) -> None:
        body = {"topic": out.topic, "partition": out.partition, "acks": out.acks,
                "timeout_ms": max(0, int((out.deadline_s - now_s) * 1000))}
        out.attempts += 1
        if out.acks == "none":
            self._send_oneway(leader, "produce", body, (out.data,), now_s)
            if out.waiter is not None:
                self._effects.append(ResolveProduce(out.waiter, out.indexes, out.records, out.topic,
                                                    out.partition, -1))
            return
        pp.in_flight += 1
        if out.attempts == 1:
            pp.sent_log.append(out)
        key = (out.topic, out.partition)

        def on_reply(message: wire.Message) -> None:
            pp.in_flight -= 1
            out.settled = True
            if out.waiter is not None:
                self._effects.append(ResolveProduce(out.waiter, out.indexes, out.records, out.topic,
                                                    out.partition, message.body["base_offset"]))
            self._pump(key, self._now_s)

        def on_error(error: MeshqError) -> None:
            pp.in_flight -= 1
            if self.stopped:
                self._fail_batch(out, error)
                return
            if error.retriable:
                # The leader may have moved (not_leader, silence, no majority): whatever happens
                # to this batch, the next send to this topic asks for fresh metadata first.
                self.metadata.pop(out.topic, None)
            if batch_format.parse_header(out.data).producer_epoch != self.producer_epoch:
                # Superseded by a newer epoch: a retry would only be fenced. Its fate is unknown.
                self._fail_batch(out, TimeoutError(
                    "the producer started a new epoch while this batch was unanswered; its fate is unknown "
                    "(it may or may not be stored)"), restart=False)
                self._pump(key, self._now_s)
                return
            self._retry_later(out, pp, error, self._now_s, requeue=True)

        timeout_s = max(0.001, min(self.config.request_timeout_s, out.deadline_s - now_s))
        self._request(leader, "produce", body, (out.data,), now_s, timeout_s, on_reply, on_error)

    def _retry_later(self, out: OutBatch, pp: ProducerPartition, error: MeshqError, now_s: float,
                     requeue: bool) -> None:
        """Retry a batch (same sequence numbers) after a metadata refresh, or fail it at its deadline."""
        retriable = produce_retriable(error)
        if not retriable or now_s + _METADATA_RETRY_S >= out.deadline_s:
            if not requeue:
                pp.queue.popleft()
            self._fail_batch(out, final_produce_error(out.topic, out.partition, out.attempts, error)
                             if retriable else error)
            self._pump((out.topic, out.partition), now_s)
            return
        if requeue:
            # keep the queue ordered by sequence so the leader sees no gap
            position = 0
            while position < len(pp.queue) and pp.queue[position].base_sequence < out.base_sequence:
                position += 1
            pp.queue.insert(position, out)
        self.metadata.pop(out.topic, None)
        key = (out.topic, out.partition)

        def resume(t: float) -> None:
            def after(error2: MeshqError | None) -> None:
                if key in self.producer_partitions:
                    if error2 is not None and not error2.retriable:
                        while pp.queue:
                            self._fail_batch(pp.queue.popleft(), error2, restart=False)
                        self._restart_sequences(pp)
                    else:
                        self._pump(key, t)

            self._with_metadata(out.topic, t, out.deadline_s, after)

        self._schedule(now_s + _METADATA_RETRY_S, "retry", resume)

    def _fail_batch(self, out: OutBatch, error: MeshqError, restart: bool = True) -> None:
        out.settled = True
        if out.waiter is not None:
            self._effects.append(ResolveProduce(out.waiter, out.indexes, out.records, out.topic,
                                                out.partition, -1, error))
        pp = self.producer_partitions.get((out.topic, out.partition))
        if restart and pp is not None and not self.stopped:
            self._restart_sequences(pp)

    def _restart_sequences(self, pp: ProducerPartition | None = None) -> None:
        """A batch failed for good, so its sequence range may or may not be stored: every later
        batch would meet a gap at the leader. Start a new producer epoch — leaders require a new
        epoch to start at sequence 0 and fence older epochs — and renumber, in every partition,
        what was never sent. Batches sent before under the old numbering have an unknown fate;
        renumbering them could store them twice, so they fail too (as in Kafka's KIP-360)."""
        self.producer_epoch += 1
        for _key, partition_state in sorted(self.producer_partitions.items()):
            keep: deque = deque()
            sequence = 0
            queued, partition_state.queue = partition_state.queue, deque()
            for out in queued:
                if out.base_sequence == batch_format.NO_SEQUENCE:
                    keep.append(out)  # acks=none: not sequenced
                    continue
                if out.attempts > 0:
                    self._fail_batch(out, TimeoutError(
                        "an earlier batch failed and the producer started a new epoch; this batch was sent "
                        "before and its fate is unknown (it may or may not be stored)"), restart=False)
                    continue
                out.base_sequence = sequence
                out.data = batch_format.encode_batch(out.records, producer_id=self.producer_id,
                                                     producer_epoch=self.producer_epoch, base_sequence=sequence)
                sequence += len(out.records)
                keep.append(out)
            partition_state.queue = keep
            partition_state.next_sequence = sequence

    # ------------------------------------------------------------------ other commands
    def _command(self, command: Command, now_s: float) -> None:
        name = _COMMANDS.get(command.kind)
        if name is None:
            raise UsageError(f"unknown command {command.kind!r}")
        if self.stopped:
            self._effects.append(Fail(command.waiter, NodeStoppedError("the node is stopped")))
            return
        try:
            getattr(self, name)(command, now_s)
        except MeshqError as exc:
            self._effects.append(Fail(command.waiter, exc))

    def _simple_request(self, command: Command, peer: str | None, type_: str, body: dict, now_s: float,
                        convert: Callable[[wire.Message], Any]) -> None:
        deadline_s = command.args.get("deadline_s", now_s + self.config.request_timeout_s)
        if peer is None and now_s + 0.05 < deadline_s:
            self._schedule(now_s + 0.05, "retry", lambda t: self._command(command, t))
            return
        if peer is None:
            self._effects.append(Fail(command.waiter, TimeoutError(
                "no storage node is reachable: check --seed / mDNS, and that a `meshq node` is running")))
            return
        self._request(peer, type_, body, (), now_s, max(0.001, deadline_s - now_s),
                      lambda m: self._effects.append(Resolve(command.waiter, convert(m))),
                      lambda e: self._effects.append(Fail(command.waiter, e)))

    def _cmd_metadata(self, command: Command, now_s: float) -> None:
        topic = command.args.get("topic")
        deadline_s = command.args.get("deadline_s", now_s + self.config.request_timeout_s)
        if topic is None:
            def keep(message: wire.Message) -> dict:
                self._absorb_metadata(message.body)
                return message.body

            self._simple_request(command, self._any_storage_peer(), "metadata",
                                 {"topics": None, "auto_create": False}, now_s, keep)
            return
        self.metadata.pop(topic, None) if command.args.get("refresh") else None

        def ready(error: MeshqError | None) -> None:
            if error is not None:
                self._effects.append(Fail(command.waiter, error))
            else:
                self._effects.append(Resolve(command.waiter, self.metadata[topic]))

        self._with_metadata(topic, now_s, deadline_s, ready, command.args.get("auto_create", True))

    def _cmd_wait_ready(self, command: Command, now_s: float) -> None:
        """Resolve once at least one storage node (maybe this one) answers requests."""
        deadline_s = command.args["deadline_s"]
        if self._any_storage_peer() is not None:
            self._effects.append(Resolve(command.waiter, True))
        elif now_s >= deadline_s:
            self._effects.append(Fail(command.waiter, TimeoutError(
                "no storage node answered: check --seed / mDNS, and that a `meshq node` is running")))
        else:
            self._schedule(min(deadline_s, now_s + 0.02), "retry", lambda t: self._cmd_wait_ready(command, t))

    def _cmd_create_topic(self, command: Command, now_s: float) -> None:
        config: TopicConfig = command.args["config"]
        if config.name.startswith("__"):
            raise InvalidTopicError(f"topic names starting with '__' are reserved for meshq ({config.name!r})")

        def convert(message: wire.Message) -> TopicConfig:
            self._absorb_metadata({"members": [], "topics": [message.body["topic"]]})
            return TopicConfig.from_wire(message.body["topic"]["config"])

        self._simple_request(command, self._any_storage_peer(), "create_topic",
                             {"config": config.to_wire(), "if_not_exists": command.args.get("if_not_exists", True)},
                             now_s, convert)

    def _partition_command(self, command: Command, now_s: float, type_: str, body: dict,
                           convert: Callable[[wire.Message], Any], retry: bool = True) -> None:
        topic, partition = command.args["topic"], command.args["partition"]
        self._routed_command(command, now_s, topic, lambda: partition, type_, body, convert,
                             command.args.get("auto_create", False), retry)

    def _routed_command(self, command: Command, now_s: float, topic: str, partition_of: Callable[[], int],
                        type_: str, body: dict, convert: Callable[[wire.Message], Any], auto_create: bool,
                        retry: bool) -> None:
        """Send ``type_`` to the leader of ``topic``/``partition_of()``; while leadership moves (no leader
        known, not_leader, not enough replicas, a silent leader) refresh metadata and retry until the
        command's deadline."""
        deadline_s = command.args.get("deadline_s", now_s + self.config.request_timeout_s)

        def fail(error: MeshqError) -> None:
            self._effects.append(Fail(command.waiter, error))

        def retry_or_fail(error: MeshqError) -> None:
            now = self._now_s
            if not retry or not error.retriable or self.stopped or now + _METADATA_RETRY_S >= deadline_s:
                fail(error)
                return
            self.metadata.pop(topic, None)
            self._schedule(now + _METADATA_RETRY_S, "retry",
                           lambda t: self._with_metadata(topic, t, deadline_s, ready, auto_create))

        def ready(error: MeshqError | None) -> None:
            if error is not None:
                fail(error)
                return
            if topic not in self.metadata:
                self._with_metadata(topic, self._now_s, deadline_s, ready, auto_create)
                return
            partition = partition_of()
            leader = self._leader_of(topic, partition)
            if leader is None:
                retry_or_fail(NotLeaderError(f"no leader known for {topic}/{partition} (an election may be under way)"))
                return
            now = self._now_s
            # One attempt waits at most half the failure timeout (a live leader answers in
            # milliseconds), so a leader that just died costs one attempt, not the whole deadline.
            attempt_s = deadline_s - now if not retry else min(deadline_s - now,
                                                                max(0.5, self.config.failure_timeout_s / 2))
            self._request(leader, type_, body, (), now, max(0.001, attempt_s),
                          lambda m: self._effects.append(Resolve(command.waiter, convert(m))), retry_or_fail)

        self._with_metadata(topic, now_s, deadline_s, ready, auto_create)

    def _cmd_fetch(self, command: Command, now_s: float) -> None:
        args = command.args
        body = {"topic": args["topic"], "partition": args["partition"], "offset": args["offset"],
                "max_bytes": args.get("max_bytes", 4 * 1024 * 1024),
                "max_wait_ms": int(args.get("max_wait_s", 0.5) * 1000)}
        args.setdefault("deadline_s", now_s + args.get("max_wait_s", 0.5) + self.config.request_timeout_s)

        def convert(message: wire.Message) -> FetchResult:
            b = message.body
            return FetchResult(b["topic"], b["partition"], message.payloads[0] if message.payloads else b"",
                               b["high_watermark"], b["log_start_offset"])

        # The consumer retries failed fetches itself (between its polls).
        self._partition_command(command, now_s, "fetch", body, convert, retry=False)

    def _cmd_list_offsets(self, command: Command, now_s: float) -> None:
        args = command.args
        body = {"topic": args["topic"], "partition": args["partition"], "timestamp_ms": args["timestamp_ms"]}
        self._partition_command(command, now_s, "list_offsets", body, lambda m: m.body["offset"])

    def _coordinator_command(self, command: Command, now_s: float, type_: str, body: dict,
                             convert: Callable[[wire.Message], Any]) -> None:
        group = command.args["group"]
        validate_topic_name(group)

        def partition_of() -> int:
            return stable_hash64(group.encode()) % self.metadata[OFFSETS_TOPIC]["config"].partitions

        self._routed_command(command, now_s, OFFSETS_TOPIC, partition_of, type_, body, convert, False, True)

    def _cmd_commit(self, command: Command, now_s: float) -> None:
        offsets = [{"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(command.args["offsets"].items())]
        self._coordinator_command(command, now_s, "offset_commit", {"group": command.args["group"], "offsets": offsets},
                                  lambda m: None)

    def _cmd_committed(self, command: Command, now_s: float) -> None:
        self._coordinator_command(
            command, now_s, "offset_fetch", {"group": command.args["group"], "topic": command.args["topic"]},
            lambda m: {(e["topic"], e["partition"]): e["offset"] for e in m.body["offsets"]})

    def _cmd_status(self, command: Command, now_s: float) -> None:
        """Ask every live storage node for its local view and merge them (leaders know their partitions).

        With ``node_id`` in the args, return that one node's own view, unmerged.
        """
        peers = self.storage_peers()
        only = command.args.get("node_id")
        deadline_s = command.args.get("deadline_s", now_s + self.config.request_timeout_s)
        if (not peers or (only is not None and only not in self.peer_endpoints and only != self.node_id)) \
                and now_s + 0.05 < deadline_s:
            self._schedule(now_s + 0.05, "retry", lambda t: self._command(command, t))
            return
        if only is not None:
            if only == self.node_id and self.is_storage:
                self._effects.append(Resolve(command.waiter, self.local_status()))
                return
            if only not in self.peer_endpoints:
                self._effects.append(Fail(command.waiter, UsageError(
                    f"node {only!r} is not known here; known storage nodes: {', '.join(peers) or 'none'}")))
                return
            peers = [only]
        if not peers:
            self._effects.append(Fail(command.waiter, TimeoutError(
                "no storage node is reachable: check --seed / mDNS, and that a `meshq node` is running")))
            return
        reports: dict[str, dict] = {}
        remaining = set(peers)

        def finish(peer: str, report: dict | None) -> None:
            remaining.discard(peer)
            if report is not None:
                reports[peer] = report
            if remaining:
                return
            if not reports:
                self._effects.append(Fail(command.waiter, TimeoutError("no storage node answered the status request")))
            elif only is not None:
                self._effects.append(Resolve(command.waiter, reports[only]))
            else:
                preferred = self.node_id if self.node_id in reports else sorted(reports)[0]
                self._effects.append(Resolve(command.waiter, merge_status(reports, preferred)))

        timeout_s = max(0.05, min(2.0, deadline_s - now_s))
        for peer in peers:
            self._request(peer, "status", {}, (), now_s, timeout_s,
                          lambda m, p=peer: finish(p, m.body["status"]), lambda e, p=peer: finish(p, None))

    def _cmd_leave(self, command: Command, now_s: float) -> None:
        """Ask storage node ``node_id`` (maybe this one) to leave the cluster (``meshq leave``); resolves
        with its ``leave_ok`` body ``{"state": "draining"|"left", "assigned": N}``. Ask again until ``left``."""
        target = command.args["node_id"]
        deadline_s = command.args.get("deadline_s", now_s + self.config.request_timeout_s)
        if target != self.node_id and target not in self.peer_endpoints:
            if now_s + 0.05 < deadline_s:  # a fresh client learns the members from its seeds' gossip
                self._schedule(now_s + 0.05, "retry", lambda t: self._command(command, t))
                return
            raise UsageError(f"node {target!r} is not known here; known storage nodes: "
                             f"{', '.join(self.storage_peers()) or 'none'}")
        self._simple_request(command, target, "leave", {"node_id": target}, now_s, lambda m: dict(m.body))


def merge_status(reports: dict[str, dict], preferred: str) -> dict:
    """One cluster status from the local views of several storage nodes.

    Members and metadata come from ``preferred``; each partition's high watermark from the
    node that leads it; consumer groups from the node that stores them.
    """
    merged = dict(reports[preferred])
    # Each partition as its leader sees it (the highest epoch wins if two still claim it).
    leader_views: dict[tuple[str, int], dict] = {}
    for node_id in sorted(reports):
        for topic in reports[node_id]["topics"]:
            for p in topic["partitions"]:
                if p["leader"] == node_id and p.get("role", "leader") == "leader":
                    key = (topic["name"], p["partition"])
                    known = leader_views.get(key)
                    if known is None or p.get("epoch", 0) > known.get("epoch", 0):
                        leader_views[key] = p
    by_leader = {key: p["high_watermark"] for key, p in leader_views.items()}
    # The replica set as the most up-to-date metadata has it (nodes apply changes at different times).
    configs: dict[tuple[str, int], dict] = {}
    for node_id in sorted(reports):
        for topic in reports[node_id]["topics"]:
            for p in topic["partitions"]:
                key = (topic["name"], p["partition"])
                if key not in configs or p.get("config_version", 0) > configs[key].get("config_version", 0):
                    configs[key] = p
    topics = []
    for topic in merged["topics"]:
        partitions = []
        for p in topic["partitions"]:
            view = leader_views.get((topic["name"], p["partition"]))
            newest = configs.get((topic["name"], p["partition"]), p)
            p = {**p, **{k: newest[k] for k in ("replicas", "learners", "target", "config_version") if k in newest}}
            if view is None:
                partitions.append({**p, "in_sync": p["in_sync"] if p.get("role") == "leader" else []})
            else:
                partitions.append({**p, **{k: view[k] for k in ("leader", "in_sync", "high_watermark", "epoch")
                                           if k in view}})
        topics.append({**topic, "partitions": partitions})
    merged["topics"] = topics
    merged["handoffs"] = sum(1 for topic in topics for p in topic["partitions"]
                             if p.get("learners") or p.get("target", p["replicas"]) != p["replicas"])
    groups: dict[tuple[str, str, int], dict] = {}
    for node_id in sorted(reports):
        for group in reports[node_id]["groups"]:
            for p in group["partitions"]:
                hw = by_leader.get((p["topic"], p["partition"]), p["high_watermark"])
                groups[(group["group"], p["topic"], p["partition"])] = {
                    **p, "high_watermark": hw, "lag": max(0, hw - p["committed"])}
    merged_groups: dict[str, dict] = {}
    for (group, _topic, _partition), entry in sorted(groups.items()):
        merged_groups.setdefault(group, {"group": group, "partitions": []})["partitions"].append(entry)
    merged["groups"] = list(merged_groups.values())
    merged["answered_by"] = sorted(reports)
    return merged


def _cut_at_offset(data: bytes, high_watermark: int) -> bytes:
    """Drop whole batches at or beyond the high watermark (never serve uncommitted records)."""
    end = 0
    for pos, header in batch_format.iter_batches(data, verify_crc=False):
        if header.base_offset >= high_watermark:
            break
        end = pos + header.size
    return data[:end] if end != len(data) else data


def produce_retriable(error: MeshqError) -> bool:
    """Whether a failed produce is sent again (same sequence numbers) after a metadata refresh."""
    return error.retriable or isinstance(error, UnknownTopicError) or error_code(error) == "out_of_order_sequence"


def final_produce_error(topic: str, partition: int, attempts: int, error: MeshqError | None) -> MeshqError:
    """What a produce that ran out of time reports: ``TimeoutError`` when an attempt reached a
    leader (its fate is unknown: it may be stored), ``NotEnoughReplicasError`` when no leader of
    the partition could be reached at all. The last retriable error (None: no answer at all) is
    kept in the message."""
    where = f"{topic}/{partition}"
    if isinstance(error, (TimeoutError, NotEnoughReplicasError)):
        return error
    if attempts == 0 and isinstance(error, NotLeaderError):
        return NotEnoughReplicasError(
            f"no leader of {where} could be reached before the deadline (a majority of its replicas may be "
            f"down or cut off); nothing was sent. Last error: {error}")
    return TimeoutError(
        f"produce to {where} was not acknowledged before its deadline; it may or may not be stored. "
        f"Last error: {error or 'no answer'}")


def _too_large(size: int, limit: int) -> MeshqError:
    return MessageTooLargeError(f"a record batch of {size} bytes exceeds the limit of {limit}; send smaller records")


# message type -> the NodeCore method that serves it (looked up per call: patchable)
_SERVERS: dict[str, str] = {
    "hello": "_serve_hello",
    "raft_vote": "_serve_raft",
    "raft_vote_ok": "_serve_raft",
    "raft_append": "_serve_raft",
    "raft_append_ok": "_serve_raft",
    "raft_join": "_serve_raft_join",
    "raft_propose": "_serve_raft_propose",
    "metadata": "_serve_metadata",
    "create_topic": "_serve_create_topic",
    "produce": "_serve_produce",
    "fetch": "_serve_fetch",
    "list_offsets": "_serve_list_offsets",
    "offset_commit": "_serve_offset_commit",
    "offset_fetch": "_serve_offset_fetch",
    "status": "_serve_status",
    "leave": "_serve_leave",
    "repl_vote": "_serve_replica",
    "repl_vote_ok": "_serve_replica",
    "repl_append": "_serve_replica",
    "repl_append_ok": "_serve_replica",
    "repl_timeout_now": "_serve_replica",
}

_COMMANDS: dict[str, str] = {
    "metadata": "_cmd_metadata",
    "wait_ready": "_cmd_wait_ready",
    "create_topic": "_cmd_create_topic",
    "fetch": "_cmd_fetch",
    "list_offsets": "_cmd_list_offsets",
    "commit": "_cmd_commit",
    "committed": "_cmd_committed",
    "status": "_cmd_status",
    "leave": "_cmd_leave",
}
