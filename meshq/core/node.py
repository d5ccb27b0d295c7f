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
    Fail,
    LogsSynced,
    ProduceCommand,
    ReplyReceived,
    RequestReceived,
    Resolve,
    ResolveProduce,
    Send,
    SyncLogs,
)
from meshq.core.hashing import partition_for_key, stable_hash64
from meshq.core.partition import ParkedFetch, PartitionState
from meshq.errors import (
    CorruptLogError,
    InvalidTopicError,
    MeshqError,
    NodeStoppedError,
    NotLeaderError,
    ProtocolError,
    TimeoutError,
    UnknownTopicError,
    UsageError,
    error_code,
    error_from_code,
)

log = logging.getLogger("meshq.core")

OFFSETS_TOPIC = "__consumer_offsets"
EARLIEST = -2
LATEST = -1
_METADATA_RETRY_S = 0.2


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


@dataclass(slots=True)
class ProducerPartition:
    next_sequence: int = 0
    queue: deque = field(default_factory=deque)
    in_flight: int = 0


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
        # Deadlines use the monotonic ``now_s`` handed to every call; only record timestamps
        # and retention use wall time, read through this injected function.
        self.wall_clock_ms = wall_clock_ms
        self.node_id = node_id
        self.storage = storage
        self.rng = rng
        self.endpoint = ""  # set by start(): the ROUTER endpoint peers connect to
        self.stopped = False
        # server half
        self.topics: dict[str, TopicConfig] = {}
        self.partitions: dict[tuple[str, int], PartitionState] = {}
        self.group_offsets: dict[tuple[str, str, int], int] = {}
        # client half
        self.members: dict[str, dict] = {}
        self.peer_endpoints: dict[str, str] = {}
        self.metadata: dict[str, dict] = {}  # topic -> {"config": TopicConfig, "leaders": [node_id|None]}
        self.awaiting_metadata: dict[str, list[Callable[[MeshqError | None], None]]] = {}
        self.pending: dict[int, PendingRequest] = {}
        self.producer_id = rng.getrandbits(62)
        self.producer_epoch = 0
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
    def start(self, endpoint: str, now_s: float) -> list:
        """Open storage state, connect to seeds. Returns the first effects."""
        self.endpoint = endpoint
        self.members[self.node_id] = {
            "node_id": self.node_id, "address": endpoint, "role": self.config.role, "state": "alive",
        }
        if self.is_storage:
            self._load_topics()
            self._schedule(now_s + self.config.retention_check_interval_s, "retention", None)
            if self.config.fsync == "interval":
                self._schedule(now_s + self.config.fsync_interval_s, "fsync", None)
        for seed in self.config.seeds:
            host, port = parse_host_port(seed)
            self._connect(f"seed:{host}:{port}", f"tcp://{host}:{port}")
            self._hello(f"seed:{host}:{port}", now_s)
        return self._take_effects()

    def stop(self, now_s: float) -> list:
        """Fail everything still waiting; returns final effects (including a last fsync)."""
        self.stopped = True
        error = NodeStoppedError("the node was stopped before the operation completed")
        for request in list(self.pending.values()):
            request.on_error(error)
        self.pending.clear()
        for pp in self.producer_partitions.values():
            while pp.queue:
                self._fail_batch(pp.queue.popleft(), error)
        for waiters in self.awaiting_metadata.values():
            for callback in waiters:
                callback(error)
        self.awaiting_metadata.clear()
        if self.partitions:
            self._effects.append(SyncLogs(frozenset(self.partitions)))
        return self._take_effects()

    @property
    def is_storage(self) -> bool:
        return self.config.role == "storage"

    # ------------------------------------------------------------------ runtime interface
    def handle(self, event: Any, now_s: float) -> list:
        """Feed one input; returns the effects to execute."""
        if isinstance(event, RequestReceived):
            self._serve(event.route, event.message, now_s)
        elif isinstance(event, ReplyReceived):
            self._on_reply(event.message, now_s)
        elif isinstance(event, ProduceCommand):
            self._produce(event, now_s)
        elif isinstance(event, Command):
            self._command(event, now_s)
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
        return self._timers[0][0] if self._timers else None

    def on_timer(self, now_s: float) -> list:
        while self._timers and self._timers[0][0] <= now_s:
            _deadline, _seq, kind, key = heapq.heappop(self._timers)
            if kind == "request":
                request = self.pending.pop(key, None)
                if request is not None:
                    request.on_error(TimeoutError(f"no reply from {request.peer} to {request.type} in time"))
            elif kind == "fetch":
                self._expire_parked(key, now_s)
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
        """A request nobody waits for (acks=none); request id 0 means 'do not reply'."""
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
            from meshq.core.events import Reply

            frames = wire.encode(self.config.cluster, self.node_id, type_, request_id, body, payloads)
            self._effects.append(Reply(route, frames))

    def _reply_error(self, route: Any, request_id: int, error: MeshqError) -> None:
        self._reply(route, request_id, "error",
                    {"code": error_code(error), "message": str(error)[:4096], "retriable": error.retriable})

    def _drain_local(self, now_s: float) -> None:
        while self._local_inbox:
            self._on_reply(self._local_inbox.popleft(), now_s)

    # ================================================================== server half
    def _serve(self, route: Any, message: wire.Message, now_s: float) -> None:
        handler = _SERVERS.get(message.type)
        if handler is None:
            # A reply type sent as a request: the peer is confused; drop and count it.
            self.counters["frames_invalid"] += 1
            return
        try:
            handler(self, route, message, now_s)
        except MeshqError as exc:
            self._reply_error(route, message.request_id, exc)

    def _serve_hello(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        self.members[body["node_id"]] = {
            "node_id": body["node_id"], "address": body["address"], "role": body["role"], "state": "alive",
        }
        self._reply(route, message.request_id, "hello_ok", {
            "node_id": self.node_id, "role": self.config.role, "members": self._member_list(),
        })

    def _serve_metadata(self, route: Any, message: wire.Message, now_s: float) -> None:
        names = message.body["topics"]
        if names is None:
            names = sorted(name for name in self.topics if not name.startswith("__"))
        topics = []
        for name in names:
            config = self.topics.get(name)
            if config is None and name == OFFSETS_TOPIC and self.is_storage:
                config = self._create_topic(self._offsets_topic_config())
            if config is None:
                if not (message.body["auto_create"] and self.config.auto_create_topics and self.is_storage):
                    continue
                config = self._create_topic(self._default_topic_config(name))
            topics.append(self._topic_meta(config))
        self._reply(route, message.request_id, "metadata_ok", {"members": self._member_list(), "topics": topics})

    def _serve_create_topic(self, route: Any, message: wire.Message, now_s: float) -> None:
        self._require_storage()
        config = TopicConfig.from_wire(message.body["config"])
        if config.name.startswith("__"):
            raise InvalidTopicError(f"topic names starting with '__' are reserved for meshq ({config.name!r})")
        existing = self.topics.get(config.name)
        if existing is not None and not message.body["if_not_exists"]:
            raise InvalidTopicError(f"topic {config.name!r} already exists")
        created = existing is None
        config = existing or self._create_topic(config)
        self._reply(route, message.request_id, "create_topic_ok", {"topic": self._topic_meta(config), "created": created})

    def _serve_produce(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        state = self._leader_state(body["topic"], body["partition"])
        data = message.payloads[0]
        header = batch_format.verify_batch(data, self.config.batch_max_bytes * 2)
        base_offset, duplicate = state.append(data, header, self.wall_clock_ms())
        if duplicate:
            self.counters["duplicates_dropped"] += header.record_count
        else:
            self.counters["records_produced"] += header.record_count
            self.counters["batches_produced"] += 1
            self._on_appended(state, now_s)
        reply = {"topic": state.topic, "partition": state.partition, "base_offset": base_offset, "duplicate": duplicate}
        if self.config.fsync == "always" and body["acks"] != "none" and not duplicate:
            needed = state.log.end_offset
            state.awaiting_sync.append(
                (needed, lambda: self._reply(route, message.request_id, "produce_ok", reply))
            )
            self._effects.append(SyncLogs(frozenset([state.key])))
        else:
            self._reply(route, message.request_id, "produce_ok", reply)

    def _serve_fetch(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        state = self._leader_state(body["topic"], body["partition"])
        if body["offset"] >= state.high_watermark and body["max_wait_ms"] > 0:
            deadline = now_s + body["max_wait_ms"] / 1000.0
            state.parked_fetches.append(ParkedFetch(route, message.request_id, body, deadline))
            self._schedule(deadline, "fetch", state.key)
            return
        self._answer_fetch(state, route, message.request_id, body)

    def _answer_fetch(self, state: PartitionState, route: Any, request_id: int, body: dict) -> None:
        offset = body["offset"]
        high_watermark = state.high_watermark
        data = b""
        if offset < high_watermark:
            data = state.log.read(offset, body["max_bytes"])
            data = _cut_at_offset(data, high_watermark)
            self.counters["records_fetched_bytes"] += len(data)
        elif offset > state.log.end_offset:
            from meshq.errors import OffsetOutOfRangeError

            raise OffsetOutOfRangeError(
                f"offset {offset} is past the end {state.log.end_offset} of {state.topic}/{state.partition}"
            )
        reply = {"topic": state.topic, "partition": state.partition, "high_watermark": high_watermark,
                 "log_start_offset": state.log.start_offset}
        self._reply(route, request_id, "fetch_ok", reply, (data,) if data else ())

    def _on_appended(self, state: PartitionState, now_s: float) -> None:
        self._dirty_logs.add(state.key)
        if state.parked_fetches:
            parked, state.parked_fetches = state.parked_fetches, []
            for fetch in parked:
                self._answer_parked(state, fetch)

    def _answer_parked(self, state: PartitionState, fetch: ParkedFetch) -> None:
        try:
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
        for key in keys:
            state = self.partitions.get(key)
            if state is None or not state.awaiting_sync:
                continue
            synced = state.log.synced_offset
            still = []
            for needed, callback in state.awaiting_sync:
                if needed <= synced:
                    callback()
                else:
                    still.append((needed, callback))
            state.awaiting_sync = still

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
        if records:
            data = batch_format.encode_batch(records)
            state.append(data, batch_format.parse_header(data), now_ms)
            self._on_appended(state, now_s)
            for entry in message.body["offsets"]:
                self.group_offsets[(group, entry["topic"], entry["partition"])] = entry["offset"]
        if self.config.fsync == "always" and records:
            state.awaiting_sync.append((state.log.end_offset, lambda: self._reply(route, message.request_id, "offset_commit_ok", {})))
            self._effects.append(SyncLogs(frozenset([state.key])))
        else:
            self._reply(route, message.request_id, "offset_commit_ok", {})

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
        if state is not None:
            return state
        if not self.is_storage:
            raise NotLeaderError(f"node {self.node_id} is a client and leads no partition")
        config = self.topics.get(topic)
        if config is None:
            if topic == OFFSETS_TOPIC:
                self._create_topic(self._offsets_topic_config())
                return self.partitions[(topic, partition)]
            raise UnknownTopicError(f"topic {topic!r} does not exist on {self.node_id}")
        raise UnknownTopicError(f"topic {topic!r} has {config.partitions} partitions; {partition} does not exist")

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

    def _create_topic(self, config: TopicConfig) -> TopicConfig:
        self._require_storage()
        self.topics[config.name] = config
        self._save_topics()
        self._open_partitions(config)
        log.info("created topic %s (%d partitions)", config.name, config.partitions)
        return config

    def _open_partitions(self, config: TopicConfig) -> None:
        for partition in range(config.partitions):
            key = (config.name, partition)
            if key not in self.partitions:
                self.partitions[key] = PartitionState(config.name, partition, self.storage.open_log(config.name, partition))

    def _save_topics(self) -> None:
        self.storage.write_meta("topics", {"topics": [c.to_wire() for _, c in sorted(self.topics.items())]})

    def _load_topics(self) -> None:
        saved = self.storage.read_meta("topics") or {"topics": []}
        for item in saved["topics"]:
            config = TopicConfig.from_wire(item)
            self.topics[config.name] = config
            self._open_partitions(config)
        if OFFSETS_TOPIC in self.topics:
            self._replay_group_offsets()

    def _replay_group_offsets(self) -> None:
        for (topic, partition), state in sorted(self.partitions.items()):
            if topic != OFFSETS_TOPIC:
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
        return [dict(member) for _, member in sorted(self.members.items())]

    def _topic_meta(self, config: TopicConfig) -> dict:
        partitions = []
        for p in range(config.partitions):
            state = self.partitions.get((config.name, p))
            partitions.append({
                "partition": p,
                "leader": self.node_id if state else None,
                "replicas": [self.node_id] if state else [],
                "in_sync": [self.node_id] if state else [],
                "high_watermark": state.high_watermark if state else 0,
            })
        return {"config": config.to_wire(), "partitions": partitions}

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
        return {
            "cluster": self.config.cluster,
            "node_id": self.node_id,
            "members": self._member_list(),
            "topics": topics,
            "groups": list(groups.values()),
            "counters": dict(self.counters),
        }

    # ================================================================== client half
    def _hello(self, peer: str, now_s: float) -> None:
        def on_reply(message: wire.Message) -> None:
            node_id = message.body["node_id"]
            for member in message.body["members"]:
                if member["node_id"] != self.node_id:
                    self.members.setdefault(member["node_id"], member)
            endpoint = self.peer_endpoints.pop(peer, None)
            self._effects.append(Disconnect(peer))
            if endpoint and node_id != self.node_id:
                self._connect(node_id, endpoint)
            for member in message.body["members"]:
                if member["role"] == "storage" and member["node_id"] != self.node_id:
                    self._connect(member["node_id"], member["address"])

        def on_error(error: MeshqError) -> None:
            if self.stopped:
                return
            log.info("seed %s did not answer hello (%s); retrying", peer, error)
            self._schedule(now_s + 0.5, "retry", lambda t: self._hello(peer, t))

        body = {"node_id": self.node_id, "role": self.config.role, "address": self.endpoint}
        self._request(peer, "hello", body, (), now_s, 2.0, on_reply, on_error)

    def storage_peers(self) -> list[str]:
        """Storage members this node can send requests to (itself included)."""
        out = [node for node, m in sorted(self.members.items()) if m["role"] == "storage"
               and (node == self.node_id or node in self.peer_endpoints)]
        return out

    def _any_storage_peer(self) -> str | None:
        peers = self.storage_peers()
        if self.node_id in peers:
            return self.node_id
        return self.rng.choice(peers) if peers else None

    def _with_metadata(self, topic: str, now_s: float, deadline_s: float,
                       then: Callable[[MeshqError | None], None], auto_create: bool = True) -> None:
        """Run ``then(None)`` once metadata for ``topic`` is known, or ``then(error)``."""
        if topic in self.metadata:
            then(None)
            return
        waiters = self.awaiting_metadata.setdefault(topic, [])
        waiters.append(then)
        if len(waiters) == 1:
            self._refresh_metadata(topic, now_s, deadline_s, auto_create)

    def _refresh_metadata(self, topic: str, now_s: float, deadline_s: float, auto_create: bool) -> None:
        peer = self._any_storage_peer()

        def finish(error: MeshqError | None) -> None:
            for callback in self.awaiting_metadata.pop(topic, []):
                callback(error)

        def retry_or_fail(error: MeshqError, now: float) -> None:
            if self.stopped:
                return
            if now + _METADATA_RETRY_S < deadline_s and error.retriable:
                self._schedule(now + _METADATA_RETRY_S, "retry",
                               lambda t: self._refresh_metadata(topic, t, deadline_s, auto_create))
            else:
                finish(error)

        if peer is None:
            retry_or_fail(TimeoutError(
                "no storage node is reachable yet: check --seed / mDNS, and that a `meshq node` is running"
            ), now_s)
            return

        def on_reply(message: wire.Message) -> None:
            self._absorb_metadata(message.body)
            if topic in self.metadata:
                finish(None)
            else:
                finish(UnknownTopicError(f"topic {topic!r} does not exist (and auto-creation is off)"))

        self._request(peer, "metadata", {"topics": [topic], "auto_create": auto_create}, (), now_s,
                      min(self.config.request_timeout_s, max(0.05, deadline_s - now_s)),
                      on_reply, lambda error: retry_or_fail(error, now_s))

    def _absorb_metadata(self, body: dict) -> None:
        for member in body["members"]:
            node_id = member["node_id"]
            if node_id == self.node_id:
                continue
            self.members[node_id] = member
            if member["role"] == "storage":
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
            self._enqueue_records(command, now_s)

        self._with_metadata(command.topic, now_s, command.deadline_s, ready)

    def _fail_records(self, command: ProduceCommand, error: MeshqError) -> None:
        if command.waiter is not None:
            self._effects.append(ResolveProduce(command.waiter, range(len(command.records)), command.records,
                                                command.topic, -1, -1, error))

    def _enqueue_records(self, command: ProduceCommand, now_s: float) -> None:
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
            if all(record[0] is None for record in records):
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
            while start < total:
                end, size = start, 0
                while end < total and end - start < limit_records:
                    record = part_records[end]
                    size += len(record[1]) + (len(record[0]) if record[0] else 0) + 16
                    if size > limit_bytes and end > start:
                        break
                    end += 1
                chunk = part_records[start:end] if (start, end) != (0, total) else part_records
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
        while pp.queue and pp.in_flight < self.config.max_in_flight_per_partition:
            out = pp.queue[0]
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
        key = (out.topic, out.partition)

        def on_reply(message: wire.Message) -> None:
            pp.in_flight -= 1
            if out.waiter is not None:
                self._effects.append(ResolveProduce(out.waiter, out.indexes, out.records, out.topic,
                                                    out.partition, message.body["base_offset"]))
            self._pump(key, now_s)

        def on_error(error: MeshqError) -> None:
            pp.in_flight -= 1
            if self.stopped:
                self._fail_batch(out, error)
                return
            self._retry_later(out, pp, error, now_s, requeue=True)

        timeout_s = max(0.001, min(self.config.request_timeout_s, out.deadline_s - now_s))
        self._request(leader, "produce", body, (out.data,), now_s, timeout_s, on_reply, on_error)

    def _retry_later(self, out: OutBatch, pp: ProducerPartition, error: MeshqError, now_s: float,
                     requeue: bool) -> None:
        """Retry a batch (same sequence numbers) after a metadata refresh, or fail it at its deadline."""
        retriable = error.retriable or isinstance(error, (UnknownTopicError,)) or error_code(error) == "out_of_order_sequence"
        if not retriable or now_s + _METADATA_RETRY_S >= out.deadline_s:
            if not requeue:
                pp.queue.popleft()
            self._fail_batch(out, error)
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
                            self._fail_batch(pp.queue.popleft(), error2)
                    else:
                        self._pump(key, t)

            self._with_metadata(out.topic, t, out.deadline_s, after)

        self._schedule(now_s + _METADATA_RETRY_S, "retry", resume)

    def _fail_batch(self, out: OutBatch, error: MeshqError) -> None:
        if out.waiter is not None:
            self._effects.append(ResolveProduce(out.waiter, out.indexes, out.records, out.topic,
                                                out.partition, -1, error))

    # ------------------------------------------------------------------ other commands
    def _command(self, command: Command, now_s: float) -> None:
        handler = _COMMANDS.get(command.kind)
        if handler is None:
            raise UsageError(f"unknown command {command.kind!r}")
        if self.stopped:
            self._effects.append(Fail(command.waiter, NodeStoppedError("the node is stopped")))
            return
        try:
            handler(self, command, now_s)
        except MeshqError as exc:
            self._effects.append(Fail(command.waiter, exc))

    def _simple_request(self, command: Command, peer: str | None, type_: str, body: dict, now_s: float,
                        convert: Callable[[wire.Message], Any]) -> None:
        deadline_s = command.args.get("deadline_s", now_s + self.config.request_timeout_s)
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
                           convert: Callable[[wire.Message], Any]) -> None:
        topic, partition = command.args["topic"], command.args["partition"]
        deadline_s = command.args.get("deadline_s", now_s + self.config.request_timeout_s)

        def ready(error: MeshqError | None) -> None:
            if error is not None:
                self._effects.append(Fail(command.waiter, error))
                return
            leader = self._leader_of(topic, partition)
            if leader is None:
                self.metadata.pop(topic, None)
                self._effects.append(Fail(command.waiter, NotLeaderError(f"no leader known for {topic}/{partition}")))
                return
            self._simple_request(command, leader, type_, body, now_s, convert)

        self._with_metadata(topic, now_s, deadline_s, ready, command.args.get("auto_create", False))

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

        self._partition_command(command, now_s, "fetch", body, convert)

    def _cmd_list_offsets(self, command: Command, now_s: float) -> None:
        args = command.args
        body = {"topic": args["topic"], "partition": args["partition"], "timestamp_ms": args["timestamp_ms"]}
        self._partition_command(command, now_s, "list_offsets", body, lambda m: m.body["offset"])

    def _coordinator_command(self, command: Command, now_s: float, type_: str, body: dict,
                             convert: Callable[[wire.Message], Any]) -> None:
        group = command.args["group"]
        validate_topic_name(group)

        def ready(error: MeshqError | None) -> None:
            if error is not None:
                self._effects.append(Fail(command.waiter, error))
                return
            partitions = self.metadata[OFFSETS_TOPIC]["config"].partitions
            leader = self._leader_of(OFFSETS_TOPIC, stable_hash64(group.encode()) % partitions)
            self._simple_request(command, leader or self._any_storage_peer(), type_, body, now_s, convert)

        self._with_metadata(OFFSETS_TOPIC, now_s, command.args.get("deadline_s", now_s + self.config.request_timeout_s),
                            ready, auto_create=False)

    def _cmd_commit(self, command: Command, now_s: float) -> None:
        offsets = [{"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(command.args["offsets"].items())]
        self._coordinator_command(command, now_s, "offset_commit", {"group": command.args["group"], "offsets": offsets},
                                  lambda m: None)

    def _cmd_committed(self, command: Command, now_s: float) -> None:
        self._coordinator_command(
            command, now_s, "offset_fetch", {"group": command.args["group"], "topic": command.args["topic"]},
            lambda m: {(e["topic"], e["partition"]): e["offset"] for e in m.body["offsets"]})

    def _cmd_status(self, command: Command, now_s: float) -> None:
        if self.is_storage:
            self._effects.append(Resolve(command.waiter, self.local_status()))
            return
        self._simple_request(command, self._any_storage_peer(), "status", {}, now_s, lambda m: m.body["status"])


def _cut_at_offset(data: bytes, high_watermark: int) -> bytes:
    """Drop whole batches at or beyond the high watermark (never serve uncommitted records)."""
    end = 0
    for pos, header in batch_format.iter_batches(data, verify_crc=False):
        if header.base_offset >= high_watermark:
            break
        end = pos + header.size
    return data[:end] if end != len(data) else data


def _too_large(size: int, limit: int) -> MeshqError:
    from meshq.errors import MessageTooLargeError

    return MessageTooLargeError(f"a record batch of {size} bytes exceeds the limit of {limit}; send smaller records")


_SERVERS: dict[str, Callable[[NodeCore, Any, wire.Message, float], None]] = {
    "hello": NodeCore._serve_hello,
    "metadata": NodeCore._serve_metadata,
    "create_topic": NodeCore._serve_create_topic,
    "produce": NodeCore._serve_produce,
    "fetch": NodeCore._serve_fetch,
    "list_offsets": NodeCore._serve_list_offsets,
    "offset_commit": NodeCore._serve_offset_commit,
    "offset_fetch": NodeCore._serve_offset_fetch,
    "status": NodeCore._serve_status,
}

_COMMANDS: dict[str, Callable[[NodeCore, Command, float], None]] = {
    "metadata": NodeCore._cmd_metadata,
    "wait_ready": NodeCore._cmd_wait_ready,
    "create_topic": NodeCore._cmd_create_topic,
    "fetch": NodeCore._cmd_fetch,
    "list_offsets": NodeCore._cmd_list_offsets,
    "commit": NodeCore._cmd_commit,
    "committed": NodeCore._cmd_committed,
    "status": NodeCore._cmd_status,
}
