"""Inputs the core consumes and effects it asks its runtime to carry out.

The core never performs I/O itself (the log is reached through the injected
``LogStore``/``Storage`` protocols, whose durability step is still an effect). The real
runtime (``meshq.io.runtime``) and the simulator (``meshq.testing``) are the two
executors of these effects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshq.core.wire import Message
from meshq.errors import MeshqError


# ------------------------------------------------------------------ inputs
@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A request arrived on our ROUTER; ``route`` is an opaque handle for the reply."""

    route: Any
    message: Message
    # who sent it (meshq.core.acl): the client name the ZAP handler gave as User-Id, ``acl.CLUSTER`` for a
    # storage node; None without keys (no identity, nothing checked)
    caller: str | None = None


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """A reply arrived on the DEALER connected to ``peer``."""

    peer: str
    message: Message


@dataclass(frozen=True, slots=True)
class EventReceived:
    """A message published by a peer (heartbeat, goodbye) arrived on our SUB socket."""

    message: Message


@dataclass(frozen=True, slots=True)
class PeerDiscovered:
    """Discovery (mDNS) found a node of our cluster: ``info`` is a member-info map."""

    info: dict


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    """The connection of our DEALER to ``peer`` dropped (libzmq's ``EVENT_DISCONNECTED``: silent past the
    heartbeat timeout, or reset). A request written on it, or its answer, may be gone with it; libzmq
    connects again by itself."""

    peer: str


@dataclass(frozen=True, slots=True)
class TrustedNames:
    """A keyed storage node's runtime read ``cluster/trusted/`` (at start, then whenever it changed): the
    trusted client keys (z85) and their holders' names, which the ``access`` room serves client nodes."""

    names: dict


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request whose envelope decoded (so it can be answered) but whose body or payloads did
    not: the core counts it and answers ``error`` (code ``protocol``) naming the defect."""

    route: Any
    request_id: int
    error: Any  # the ProtocolError


@dataclass(frozen=True, slots=True)
class LogsSynced:
    """The runtime completed the fsync asked for by ``SyncLogs``."""

    keys: frozenset[tuple[str, int]]


# Local API calls. Each carries a ``waiter`` (an opaque token the runtime resolves through
# ``Resolve``/``Fail``) and a ``deadline_s`` on the core's clock (None: the node's
# ``request_timeout_s`` from when the core takes it).
@dataclass(slots=True)
class GetMetadata:
    """A topic's metadata (``topic``; ``refresh`` asks afresh), or with ``topic`` None every topic's."""

    topic: str | None = None
    refresh: bool = False
    auto_create: bool = True
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class WaitReady:
    """Resolves once a storage node (maybe this one) can take requests."""

    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class CreateTopic:
    config: Any  # meshq.config.TopicConfig
    if_not_exists: bool = True
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class Fetch:
    """Records of ``topic``/``partition`` from ``offset``; the leader holds it up to ``max_wait_s``."""

    topic: str
    partition: int
    offset: int
    max_bytes: int = 4 * 1024 * 1024
    max_wait_s: float = 0.5
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class ListOffsets:
    """The offset of ``timestamp_ms`` in a partition (-2: the earliest, -1: the latest)."""

    topic: str
    partition: int
    timestamp_ms: int
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class CommitOffsets:
    """Store a group's offsets: ``offsets`` maps (topic, partition) to the next offset to read.
    A group member's commit names the member and its generation (the coordinator checks them)."""

    group: str
    offsets: dict
    deadline_s: float | None = None
    waiter: Any = None
    member: str | None = None
    generation: int = -1
    seq: int = -1  # set once by the core: this node's commits in the order they were asked


@dataclass(slots=True)
class FetchCommitted:
    """A group's committed offsets for ``topic``, as {(topic, partition): offset}."""

    group: str
    topic: str
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class AclChange:
    """Grant or revoke (``action``) ``permission`` on ``pattern`` to client ``name`` (meshq.core.acl)."""

    action: str
    name: str
    permission: str
    pattern: str
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class AclList:
    """Every grant the cluster holds, as ``[{"name", "permission", "pattern"}]``, as the metadata leader knows them."""

    deadline_s: float | None = None
    waiter: Any = None
    peer: str | None = None  # the next attempt's node (the metadata leader a refusal named), else any storage node


@dataclass(slots=True)
class GetStatus:
    """The cluster's status merged from every live storage node (or only ``node_id``'s own view)."""

    node_id: str | None = None
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class AskLeave:
    """Ask storage node ``node_id`` to leave; resolves with its ``leave_ok`` body."""

    node_id: str
    deadline_s: float | None = None
    waiter: Any = None


# Consumer-group members (meshq.core.client.group_client). ``JoinGroup`` resolves with the new
# member's id at once; the member then joins, heartbeats and rejoins in the core by itself.
@dataclass(slots=True)
class JoinGroup:
    """Make this node a member of ``group`` reading ``topic`` (``partitions`` of them)."""

    group: str
    topic: str
    partitions: int
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class AddSubscription:
    """Pub/sub: start local subscription ``sub_id`` to ``pattern`` (in queue group ``queue``);
    ``stats`` is the shell's counters of it, read for status. Resolves once the core routes to it."""

    sub_id: int
    pattern: str
    queue: str | None
    stats: Any = None
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class ShareFetch:
    """Records of a shared subscription on ``topic``/``partition`` for ``member`` (a long poll)."""

    group: str
    topic: str
    partition: int
    member: str
    max_records: int = 500
    max_wait_s: float = 0.5
    ack_timeout_ms: int = 30_000
    max_deliveries: int = 5
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class RemoveSubscription:
    """Pub/sub: end local subscription ``sub_id`` (its interest is withdrawn from the mesh)."""

    sub_id: int
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class WatchGroup:
    """Resolves with the member's ``GroupView`` once its version differs from ``version``."""

    member: str
    version: int
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class ReleaseGroup:
    """The member's consumer let go of every partition of ``generation`` (and committed): rejoin."""

    member: str
    generation: int
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class LeaveGroup:
    """The member closes: tell the coordinator (the others rebalance at once); resolves with
    whether the coordinator answered."""

    member: str
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class ShareAck:
    """Answers of ``member`` for records of ``topic``/``partition``: ``acks`` packs ">qBI" entries
    (offset, kind 0 ack / 1 nack / 2 reject, delay ms); resolves once durable with the offsets
    whose answer was stale (packed ">q": the member did not hold them; nothing changed for them)."""

    group: str
    topic: str
    partition: int
    member: str
    acks: bytes
    deadline_s: float | None = None
    waiter: Any = None


Command = GetMetadata | WaitReady | CreateTopic | Fetch | ListOffsets | CommitOffsets | FetchCommitted | GetStatus | AskLeave \
    | JoinGroup | WatchGroup | ReleaseGroup | LeaveGroup | ShareFetch | ShareAck | AddSubscription | RemoveSubscription \
    | AclChange | AclList
COMMANDS = (GetMetadata, WaitReady, CreateTopic, Fetch, ListOffsets, CommitOffsets, FetchCommitted, GetStatus, AskLeave,
            JoinGroup, WatchGroup, ReleaseGroup, LeaveGroup, ShareFetch, ShareAck, AddSubscription, RemoveSubscription,
            AclChange, AclList)


@dataclass(slots=True)
class ProduceCommand:
    """Records to produce; ``waiter`` (or None) learns each record's fate by index."""

    topic: str
    records: list  # list[RecordTuple]: (key, value, headers, timestamp_ms)
    waiter: Any
    partition: int | None = None
    acks: str = "quorum"
    deadline_s: float = 0.0


@dataclass(frozen=True, slots=True)
class InCoreWaiter:
    """The waiter of a ``ProduceCommand`` a room of the core sent itself (a dead-letter append):
    the producer calls ``callback(ResolveProduce)`` instead of emitting it to the runtime."""

    callback: Any


# ------------------------------------------------------------------ effects
@dataclass(frozen=True, slots=True)
class Connect:
    """Open a DEALER (and later SUB) to ``endpoint`` for the peer key ``peer``."""

    peer: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    peer: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Connect our SUB socket to a peer's PUB endpoint."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    endpoint: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Send frames on our PUB socket (every subscriber receives them)."""

    frames: list


@dataclass(frozen=True, slots=True)
class Send:
    """Send frames to a peer over its DEALER."""

    peer: str
    frames: list


@dataclass(frozen=True, slots=True)
class Reply:
    """Send frames back over the ROUTER to the request's route."""

    route: Any
    frames: list


@dataclass(frozen=True, slots=True)
class Resolve:
    waiter: Any
    result: Any


@dataclass(frozen=True, slots=True)
class Fail:
    waiter: Any
    error: MeshqError


@dataclass(frozen=True, slots=True)
class ResolveProduce:
    """Tell ``waiter`` that the records at ``indexes`` of its command were stored (or failed).

    ``records[i]`` is the record at ``indexes[i]``; it was stored at ``base_offset + i``
    (``base_offset`` is -1 when unknown, with acks=none).
    """

    waiter: Any
    indexes: Sequence[int]
    records: list
    topic: str
    partition: int
    base_offset: int
    error: MeshqError | None = None


@dataclass(frozen=True, slots=True)
class SyncLogs:
    """fsync these partition logs, then feed back ``LogsSynced``."""

    keys: frozenset[tuple[str, int]]


# ------------------------------------------------------------------ request/reply (meshq.core.rpc)
@dataclass(slots=True)
class ServeService:
    """Offer ``service`` from this node (its handler lives in the I/O shell)."""

    service: str
    idempotent: bool = False
    concurrency: int = 1
    deadline_s: float | None = None
    waiter: Any = None
    desk: str | None = None  # the endpoint of the service's own socket, advertised (meshq.core.rpc.desk)


@dataclass(slots=True)
class UnserveService:
    """Withdraw ``service``: queued requests are refused (callers go elsewhere), running ones finish."""

    service: str
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class RpcRequest:
    """Send ``payload`` to one live instance of ``service``; resolves with the reply's bytes."""

    service: str
    payload: bytes
    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class RpcRequests:
    """Several ``RpcRequest``s at once (the runtime gathers those queued in one iteration): each one
    is decided as on its own, and those going to the same instance of the same service are sent
    in one ``rpc_batch`` message."""

    requests: tuple


@dataclass(slots=True)
class RpcReport:
    """Resolves with this node's request/reply report (``Rpc.report``)."""

    deadline_s: float | None = None
    waiter: Any = None


@dataclass(slots=True)
class HandlerDone:
    """A handler finished job ``job_id``: its ``reply``, or the error it raised (type and message)."""

    job_id: int
    reply: bytes | None
    error_type: str = ""
    error_message: str = ""
    elapsed_s: float = 0.0
    expired: bool = False  # not run: its deadline had passed when the worker came to it (no reply)


@dataclass(slots=True)
class HandlersDone:
    """A worker finished the jobs of one ``RunHandlers``: one ``HandlerDone`` per job, in order."""

    outcomes: tuple


@dataclass(slots=True)
class DeskServed:
    """What the desk of ``service`` (meshq.core.rpc.desk) did since it last told: counts and handler times."""

    service: str
    served: int
    errors: int
    expired: int
    duplicates: int
    refused: int
    invalid: int
    times_s: tuple


RPC_COMMANDS = (ServeService, UnserveService, RpcRequest, RpcReport)


@dataclass(frozen=True, slots=True)
class RunHandler:
    """Run the handler of ``service`` on ``payload`` (in the service's worker pool), then feed
    back ``HandlerDone(job_id, ...)``."""

    job_id: int
    service: str
    payload: bytes
    deadline_s: float = float("inf")  # the caller gives up then: the worker skips it (expired)


@dataclass(frozen=True, slots=True)
class RunHandlers:
    """Hand one worker of ``service`` these jobs (``RunHandler``s) to run one after the other; it
    feeds back one ``HandlersDone``. The core never has more of these out per service than its
    ``concurrency``, so that bounds the handlers running at once."""

    service: str
    jobs: tuple
