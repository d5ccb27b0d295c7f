"""The public ``meshq.Node``: a facade that is safe to call from any thread.

Every call is turned into an input for the node's runtime thread (which alone owns the
sockets and the core) and waits on a ``concurrent.futures.Future``.
"""

from __future__ import annotations

import builtins
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from meshq.config import NodeConfig, TopicConfig, validate_topic_name
from meshq.core.client.leave import LeaveLoop
from meshq.core.cluster.access import VIEW_WAIT_S
from meshq.core.events import (
    AclChange,
    AclList,
    AskLeave,
    Command,
    CreateTopic,
    GetMetadata,
    GetStatus,
    RpcReport,
    RpcRequest,
    ServeService,
    UnserveService,
    WaitReady,
)
from meshq.core.node import NodeCore
from meshq.core.records import RecordMetadata
from meshq.core.rpc.names import validate_service_name
from meshq.core.shared_state import DELIVER_AT_HEADER, PRIORITY_HEADER
from meshq.core.status import merge_instances
from meshq.errors import (
    ConfigError,
    MeshqError,
    MessageTooLargeError,
    NodeStoppedError,
    NoRespondersError,
    TimeoutError,
    UsageError,
)
from meshq.io.clock import RealClock
from meshq.io.direct import DirectProducer
from meshq.io.futures import FutureFactory
from meshq.io.pubsub import PubSubShell
from meshq.io.rpc import DeskSetup, ServiceWorkers
from meshq.io.rpc_direct import DirectRequester
from meshq.io.runtime import Runtime
from meshq.producer import Accumulator
from meshq.pubsub import DEFAULT_MAX_PENDING, Subscription

log = logging.getLogger("meshq.node")

_ACKS = ("none", "leader", "quorum", "all")
_REACHABLE = ("alive", "suspect")  # member states of a node that can still answer a request


class Node:
    """One meshq node (storage or client). See SPEC §4.1 for the calls."""

    def __init__(
        self,
        cluster: str = "default",
        data_dir: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        seeds: Iterable[str] = (),
        mdns: bool = True,
        interfaces: Iterable[str] | None = None,
        role: str = "storage",
        replication_factor: int = 3,
        partitions: int = 8,
        *,
        node_id: str | None = None,
        pub_port: int = 0,
        fsync: str = "interval",
        **options: Any,
    ) -> None:
        if options.get("keys") is not None:
            options["keys"] = os.fspath(options["keys"])  # a key set directory (meshq keygen)
        self.config = NodeConfig(
            cluster=cluster,
            node_id=node_id,
            data_dir=os.fspath(data_dir) if data_dir is not None else None,
            role=role,  # type: ignore[arg-type]
            host=host,
            port=port,
            pub_port=pub_port,
            seeds=tuple(seeds),
            mdns=mdns,
            interfaces=tuple(interfaces) if interfaces is not None else None,
            replication_factor=replication_factor,
            partitions=partitions,
            fsync=fsync,  # type: ignore[arg-type]
            **options,
        )
        self.clock = RealClock()
        self.storage: Any = None
        self.core: NodeCore | None = None
        self.runtime: Runtime | None = None
        self._accumulator: Accumulator | None = None
        self._direct: DirectProducer | None = None  # synchronous produce from the caller's thread
        self._pubsub: PubSubShell | None = None
        self._workers: ServiceWorkers | None = None  # handlers of the services this node serves
        self._requester: DirectRequester | None = None  # synchronous requests from the caller's thread
        self._new_future = FutureFactory()  # request_async's futures (a condition only when needed: meshq.io.futures)
        self._latency: Any = None  # meshq.metrics.ClientLatency when the node serves metrics
        self._discovery: Any = None
        self._mdns_on_loop = False  # meshq.aio.Node runs discovery on its event loop (AsyncZeroconf)
        self._key_fingerprint = ""  # of the cluster key the node runs with ("" without keys)
        self._started = False
        self._stopped = False

    @classmethod
    def from_config(cls, config: NodeConfig) -> Node:
        node = cls.__new__(cls)
        node.config = config
        node.clock = RealClock()
        node.storage = None
        node.core = None
        node.runtime = None
        node._accumulator = None
        node._direct = None
        node._pubsub = None
        node._workers = None
        node._requester = None
        node._discovery = None
        node._mdns_on_loop = False
        node._key_fingerprint = ""
        node._started = False
        node._stopped = False
        return node

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Node:
        """Open storage, bind sockets, start the runtime thread. Returns self."""
        if self._started:
            raise UsageError("this node was already started; create a new Node to start again")
        config = self.config
        node_id = config.node_id
        if config.role == "storage":
            from meshq.log.datadir import FileStorage

            self.storage = FileStorage(config.data_dir, segment_bytes=config.segment_bytes,
                                       segment_ms=config.segment_ms, min_free_bytes=config.min_free_bytes)
            try:
                node_id = self._stable_node_id(node_id)
            except BaseException:
                self.storage.close()
                raise
        elif node_id is None:
            node_id = f"client-{socket.gethostname()[:20]}-{os.getpid()}-{random.getrandbits(24):06x}"
        self.core = NodeCore(config, node_id, self.storage, random.Random(), self.clock.wall_ms)
        try:
            keys = self._load_keys()
            self._key_fingerprint = keys.fingerprint if keys is not None else ""
            self.runtime = Runtime(self.core, self.clock, self.storage, keys=keys)
        except BaseException:
            if self.storage is not None:
                self.storage.close()
            raise
        try:
            self.runtime.start()
        except BaseException:
            if self.storage is not None:
                self.storage.close()
            raise
        self.runtime.on_left = self._after_leaving
        desks = None if self.runtime.curve is not None else DeskSetup(  # (keyed: requests go through the ROUTER)
            self.runtime.context, config.host, self.runtime.endpoint.rsplit(":", 1)[0][len("tcp://"):],
            config.cluster, self.core.node_id, linger_s=2 * config.heartbeat_interval_s)
        self._workers = ServiceWorkers(self.runtime.submit, config.max_frame_bytes, self.clock.now_s, desks)
        self.runtime.run_handler = self._workers.run
        self._requester = DirectRequester(self, self.runtime.context)
        self._accumulator = Accumulator(self.runtime, self.clock, config.linger_s, config.batch_max_records)
        self._direct = DirectProducer(self, self.runtime.context, random.Random())
        self._pubsub = PubSubShell(self)
        self._discovery = None
        if config.mdns and not self._mdns_on_loop:
            from meshq.io.discovery import Discovery

            self._discovery = Discovery(*self.discovery_args(), fingerprint=self._key_fingerprint)
            try:
                self._discovery.start()
            except BaseException:
                self.runtime.stop()
                if self.storage is not None:
                    self.storage.close()
                raise
        self._metrics = None
        if config.metrics_port is not None:
            from meshq.metrics import create_metrics, serve_metrics

            registry, self._latency = create_metrics(self)
            self._accumulator.latency = self._latency
            try:
                self._metrics = serve_metrics(registry, config.host, config.metrics_port)
            except OSError as exc:
                self.stop_quietly()
                raise ConfigError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc}") from None
        self._started = True
        log.info("node %s (%s) listening on %s%s", node_id, config.role, self.runtime.endpoint,
                 f" (CURVE, cluster key {keys.fingerprint})" if keys is not None else "")
        self._await_grant_view()
        return self

    def _await_grant_view(self) -> None:
        """A keyed client node learns its grants from a storage node (``acl_view``, usually within a tenth of a
        second): wait for them, ``VIEW_WAIT_S`` at most, so that from the first call on its own checks say at
        once what its key may not do (a publish refused with ``AuthorizationError`` rather than sent nowhere).
        Without them in time it goes on: the peers check all the same."""
        assert self.core is not None
        access = self.core.access
        deadline = time.monotonic() + VIEW_WAIT_S
        while not access.knows_own() and time.monotonic() < deadline and not self.core.stopped:
            time.sleep(0.005)
        if not access.knows_own():
            log.warning("client node %s has not learnt its grants from a storage node within %g s; its own "
                        "checks let calls through until it does (the peers still check)", self.core.node_id,
                        VIEW_WAIT_S)

    def discovery_args(self) -> tuple:
        """What a ``Discovery`` of this started node announces and where (its positional arguments)."""
        assert self.runtime is not None and self.core is not None
        return (self.runtime, self.config.cluster, self.core.node_id, self.config.role, self.runtime.endpoint,
                self.runtime.pub_endpoint, self.core.incarnation, self.config.interfaces)

    def _load_keys(self) -> Any:
        """The key set of ``keys=`` (a storage node needs DIR/cluster, a client DIR/clients/NAME), or None."""
        if self.config.keys is None:
            return None
        from meshq.keys import load

        return load(self.config.keys, "cluster" if self.config.role == "storage" else "client")

    def _stable_node_id(self, requested: str | None) -> str:
        saved = self.storage.read_meta("node")
        if saved is not None:
            if saved.get("cluster") != self.config.cluster:
                raise ConfigError(
                    f"data directory {self.config.data_dir} belongs to cluster {saved.get('cluster')!r}, "
                    f"not {self.config.cluster!r}; use another --data directory or the right --cluster"
                )
            if requested is not None and requested != saved["node_id"]:
                raise ConfigError(
                    f"data directory {self.config.data_dir} belongs to node {saved['node_id']!r}, not {requested!r}"
                )
            return saved["node_id"]
        node_id = requested or f"{socket.gethostname()[:32]}-{random.getrandbits(32):08x}"
        self.storage.write_meta("node", {"node_id": node_id, "cluster": self.config.cluster})
        return node_id

    def stop_quietly(self) -> None:
        """Undo a partial start (sockets, discovery, storage)."""
        if self._discovery is not None:
            self._discovery.stop()
        if self.runtime is not None:
            self.runtime.stop()
        if self.storage is not None:
            self.storage.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Flush buffered records, stop the runtime, close storage. Idempotent."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        if self._direct is not None:
            self._direct.close()
        if self._pubsub is not None:
            self._pubsub.close()
        if self._requester is not None:
            self._requester.close()
        try:
            if self._accumulator is not None:
                self._accumulator.flush_all()
                self._accumulator.tracker.wait_idle(min(timeout, 5.0))
        finally:
            assert self.runtime is not None
            if self._discovery is not None:
                self._discovery.stop()
            if getattr(self, "_metrics", None) is not None:
                self._metrics.shutdown()
                self._metrics.server_close()
            self.runtime.stop(timeout)
            if self._workers is not None:
                self._workers.close(min(timeout, 5.0))
            if self.runtime.running:
                # Closing the logs under a thread that may still write them could lose what it
                # writes: leave them (and the data directory's lock) to the process's exit.
                log.error("node %s: the runtime thread did not stop within %.0f s; its data directory stays "
                          "open until it does (or the process exits)", self.core.node_id if self.core else "?", timeout)
            elif self.storage is not None:
                self.storage.close()

    def _after_leaving(self) -> None:
        """Runs on the runtime thread once it stopped because this node left the cluster: stop
        announcing the node on mDNS (``stop()`` still releases the data directory)."""
        if self._discovery is not None:
            self._discovery.stop()

    def __enter__(self) -> Node:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ properties
    @property
    def node_id(self) -> str:
        self._require_started()
        assert self.core is not None
        return self.core.node_id

    @property
    def address(self) -> str:
        """The ROUTER endpoint peers connect to (``tcp://host:port``)."""
        self._require_started()
        assert self.runtime is not None
        return self.runtime.endpoint

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def has_left(self) -> bool:
        """True once this node left the cluster (``leave()`` or ``meshq leave``) and its runtime stopped."""
        return self.runtime is not None and self.runtime.left.is_set()

    def _require_started(self) -> None:
        if not self._started:
            raise UsageError("call node.start() (or use `with meshq.Node(...) as node:`) first")
        if self._stopped:
            raise NodeStoppedError("this node was stopped")
        if self.has_left:
            raise NodeStoppedError("this node left the cluster (meshq leave) and stopped; call node.stop() to "
                                   "release its data directory, or start a new Node to join again")

    # ------------------------------------------------------------------ internal calls
    def _call(self, command: Command, timeout_s: float) -> Any:
        """Hand ``command`` to the core and wait for its result (its deadline: ``timeout_s``)."""
        return _wait(self._submit(command, timeout_s), timeout_s + 1.0, type(command).__name__)

    def _submit(self, command: Command, timeout_s: float) -> Future:
        """Hand ``command`` to the core; the Future gets its result (its deadline: ``timeout_s``)."""
        self._require_started()
        assert self.runtime is not None
        future: Future = Future()
        if command.deadline_s is None:
            command.deadline_s = self.clock.now_s() + timeout_s
        command.waiter = future
        self.runtime.submit(command)
        return future

    # ------------------------------------------------------------------ membership
    def wait_for_members(self, count: int, timeout: float = 10.0) -> list[dict]:
        """Block until ``count`` storage members are known; returns them."""
        deadline = time.monotonic() + timeout
        members: list[dict] = []
        while True:
            try:
                status = self.status(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                members = live_storage_members(status)
            except MeshqError as exc:
                if not exc.retriable:
                    raise
            if len(members) >= count:
                return members
            if time.monotonic() >= deadline:
                raise TimeoutError(f"only {len(members)} of {count} storage members appeared within {timeout} s")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until a storage node (maybe this one) can take requests."""
        self._call(WaitReady(), timeout)

    def leave(self, timeout: float = 300.0, *, node_id: str | None = None,
              progress: Callable[[dict], None] | None = None) -> None:
        """Leave the cluster for good (``meshq leave``): hand every partition over to the other
        members, leave the storage membership, then stop this node.

        With ``node_id``, ask that storage node (alive, reached through this one) to leave
        instead; it stops by itself. ``progress`` is called with each answer
        (``{"state": "draining"|"left", "assigned": N}``, N = partitions still naming the node)
        and with ``{"state": "retrying", "error": text}`` while the cluster cannot answer. Raises
        ``TimeoutError`` if the node has not left after ``timeout`` seconds (it keeps draining:
        call again to keep waiting); ``UsageError`` / ``NoRespondersError`` before asking anything
        when the node is unknown, a client, or not running.
        """
        self._require_started()
        assert self.core is not None
        own = node_id is None or node_id == self.core.node_id
        target = self.core.node_id if own else node_id
        if own and self.config.role != "storage":
            raise UsageError("a client node holds no partitions and has no membership to leave; give node_id= to "
                             "ask a storage node to leave")
        deadline = time.monotonic() + timeout
        if not own and self._check_can_leave(target, min(3.0, timeout)):
            if progress is not None:
                progress({"state": "left", "assigned": 0})
            return
        loop = LeaveLoop(target, own, deadline)  # deadline on time.monotonic()
        while time.monotonic() < deadline:
            remaining = deadline - time.monotonic()
            try:
                if own and self.has_left:
                    # the node saw it was let go and stopped itself between two questions
                    raise NodeStoppedError("left")
                step = loop.answered(self._call(AskLeave(target), min(10.0, remaining)))
            except MeshqError as exc:
                step = loop.failed(exc, own_has_left=own and self.has_left,
                                   left_membership=lambda: self._left_membership(target))
            if step.report is not None and progress is not None:
                progress(step.report)
            if step.done:
                if own:
                    self.stop()
                return
            time.sleep(max(0.0, min(loop.poll_s, deadline - time.monotonic())))
        if not own and "assigned" not in loop.answer and self._check_can_leave(target, 2.0):
            # It never answered: the first check may have seen it alive just before it stopped
            # (a view not yet updated). Asked again, that check names a stopped node (raises) or
            # one that left meanwhile.
            return
        raise loop.timeout_error(timeout)

    def _check_can_leave(self, node_id: str, timeout_s: float) -> bool:
        """Fail fast, naming the members, when ``node_id`` is not a live storage member; True when it
        already left (it is out of the agreed membership and no longer running)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(timeout=max(0.5, deadline - time.monotonic()))
            members = {m["node_id"]: m for m in status["members"]}
            member = members.get(node_id)
            if (member is not None and member["state"] in _REACHABLE) or time.monotonic() >= deadline:
                break
            time.sleep(0.2)  # a fresh client may not have heard the member's heartbeats yet
        voters = status.get("metadata", {}).get("voters", [])
        if member is not None and member["state"] not in _REACHABLE and node_id not in voters:
            return True
        storage = ", ".join(sorted(n for n, m in members.items() if m["role"] == "storage")) or "none"
        if member is None:
            raise UsageError(f"no node {node_id!r} in cluster {self.config.cluster!r}; its storage nodes are: {storage}")
        if member["role"] != "storage":
            raise UsageError(f"{node_id} is a client node: it holds no partitions and has no membership to leave")
        if member["state"] not in _REACHABLE:
            raise NoRespondersError(
                f"node {node_id} is not running (state {member['state']}): a node hands its partitions over itself, so it must be running "
                f"to leave. Start it again and retry, or leave it down: the cluster removes a member silent for "
                f"member_timeout (default 300 s) and re-replicates its partitions")

    def _left_membership(self, node_id: str) -> bool:
        """Whether the cluster's agreed storage membership no longer lists ``node_id``."""
        try:
            voters = self.status(timeout=5.0).get("metadata", {}).get("voters")
        except MeshqError:
            return False
        return voters is not None and node_id not in voters

    # ------------------------------------------------------------------ topics
    def create_topic(self, name: str, partitions: int | None = None, replication_factor: int | None = None,
                     retention_bytes: int | None = None, retention_ms: int | None = 7 * 24 * 3600 * 1000,
                     cleanup_policy: str = "delete", if_not_exists: bool = True, timeout: float = 10.0,
                     delete_retention_ms: int | None = 24 * 3600 * 1000) -> TopicConfig:
        """Create a topic (or return the existing one when ``if_not_exists``).

        ``retention_ms``/``retention_bytes`` None (or -1) keep records forever; see ``TopicConfig``."""
        command = self._create_topic_command(name, partitions, replication_factor, retention_bytes, retention_ms,
                                             cleanup_policy, if_not_exists, delete_retention_ms)
        return self._call(command, timeout)

    def _create_topic_command(self, name: str, partitions: int | None, replication_factor: int | None,
                              retention_bytes: int | None, retention_ms: int | None, cleanup_policy: str,
                              if_not_exists: bool, delete_retention_ms: int | None = 24 * 3600 * 1000) -> CreateTopic:
        config = TopicConfig(
            name=validate_topic_name(name),
            partitions=partitions or self.config.partitions,
            replication_factor=replication_factor or self.config.replication_factor,
            retention_bytes=retention_bytes,
            retention_ms=retention_ms,
            cleanup_policy=cleanup_policy,  # type: ignore[arg-type]
            delete_retention_ms=delete_retention_ms,
        )
        return CreateTopic(config, if_not_exists)

    # ------------------------------------------------------------------ permissions (meshq.core.acl)
    def acl_grant(self, name: str, permission: str, pattern: str, timeout: float = 10.0) -> bool:
        """Let client ``name`` do ``permission`` on what ``pattern`` matches (admin key only); False if it
        already could by this very grant. Agreed by the cluster before it returns."""
        return self._call(AclChange("grant", name, permission, pattern), timeout)

    def acl_revoke(self, name: str, permission: str, pattern: str, timeout: float = 10.0) -> bool:
        """Take back exactly the grant ``acl_grant(name, permission, pattern)`` made (admin key only)."""
        return self._call(AclChange("revoke", name, permission, pattern), timeout)

    def acl_list(self, timeout: float = 10.0) -> list[dict]:
        """Every grant, ``[{"name", "permission", "pattern"}]`` sorted (admin key only)."""
        return self._call(AclList(), timeout)

    def topic(self, name: str, timeout: float = 10.0, create: bool = False) -> TopicConfig:
        """The configuration of an existing topic (``UnknownTopicError`` if missing)."""
        meta = self._call(GetMetadata(name, refresh=True, auto_create=create), timeout)
        return meta["config"]

    def list_topics(self, timeout: float = 10.0) -> list[TopicConfig]:
        body = self._call(GetMetadata(), timeout)
        return [TopicConfig.from_wire(t["config"]) for t in body["topics"]]

    # ------------------------------------------------------------------ produce
    def produce(self, topic: str, value: bytes, key: bytes | None = None, headers: dict[str, bytes] | None = None,
                acks: str = "quorum", timeout: float = 5.0, partition: int | None = None,
                timestamp_ms: int | None = None, *, delay: float | None = None, deliver_at: float | None = None,
                priority: int | None = None) -> RecordMetadata:
        """Produce one record and wait for its acknowledgement.

        Sent from the calling thread straight to the partition's leader when it can be
        (``meshq.io.direct``), else through the runtime thread; the guarantees are the same.
        ``delay`` (seconds) or ``deliver_at`` (unix seconds) hold the record back from consumers
        until then; ``priority`` (0-9, default 4) orders what shared subscriptions hand out first.
        Both travel as record headers (``meshq-deliver-at``, ``meshq-priority``).
        """
        if self._latency is not None:
            started_s = time.monotonic()
            metadata = self._produce_one(topic, value, key, headers, acks, timeout, partition, timestamp_ms, delay,
                                         deliver_at, priority)
            self._latency.produce_one.observe(time.monotonic() - started_s)
            return metadata
        return self._produce_one(topic, value, key, headers, acks, timeout, partition, timestamp_ms, delay,
                                 deliver_at, priority)

    def _produce_one(self, topic: str, value: bytes, key: bytes | None, headers: dict[str, bytes] | None, acks: str,
                     timeout: float, partition: int | None, timestamp_ms: int | None, delay: float | None,
                     deliver_at: float | None, priority: int | None) -> RecordMetadata:
        headers = self._scheduling_headers(headers, delay, deliver_at, priority)
        record = self._record(value, key, headers, acks, timestamp_ms)
        if self._direct is not None:
            metadata = self._direct.try_produce(topic, record, partition, acks, timeout)
            if metadata is not None:
                return metadata
        assert self._accumulator is not None
        future = self._accumulator.append(topic, record, partition, acks, timeout, True)
        return _wait(future, timeout + 0.5, "produce")

    def produce_async(self, topic: str, value: bytes, key: bytes | None = None,
                      headers: dict[str, bytes] | None = None, acks: str = "quorum", timeout: float = 30.0,
                      partition: int | None = None, timestamp_ms: int | None = None, *, delay: float | None = None,
                      deliver_at: float | None = None, priority: int | None = None) -> Future:
        """Queue one record (batched with others for ``linger_s``); the Future gives its RecordMetadata.
        ``delay``/``deliver_at``/``priority`` as in ``produce``."""
        if (headers is None and delay is None and deliver_at is None and priority is None
                and type(value) is bytes and (key is None or type(key) is bytes) and acks in _ACKS
                and self._started and not self._stopped and not self.runtime.left.is_set()):  # type: ignore[union-attr]
            # the common call, already valid: the same record _record() would build, without its calls
            record = (key, value, None, timestamp_ms if timestamp_ms is not None else self.clock.wall_ms())
        else:
            if delay is not None or deliver_at is not None or priority is not None:
                headers = self._scheduling_headers(headers, delay, deliver_at, priority)
            record = self._record(value, key, headers, acks, timestamp_ms)
        return self._accumulator.append(topic, record, partition, acks, timeout)  # type: ignore[union-attr]

    def produce_batch(self, topic: str, values: Sequence[bytes], keys: Sequence[bytes | None] | None = None,
                      acks: str = "quorum", timeout: float = 30.0, partition: int | None = None,
                      headers: dict[str, bytes] | None = None, *, delay: float | None = None,
                      deliver_at: float | None = None, priority: int | None = None) -> Future:
        """Produce many records in one call; the Future gives a sequence of RecordMetadata in input order.

        The fast path for bulk loads: one completion per batch instead of one Future per record.
        ``delay``/``deliver_at``/``priority`` (as in ``produce``) apply to every record of the call.
        """
        self._require_started()
        headers = self._scheduling_headers(headers, delay, deliver_at, priority)
        _check_acks(acks)
        now_ms = self.clock.wall_ms()
        if keys is None:
            records = [(None, _as_bytes(v), headers, now_ms) for v in values]
        else:
            if len(keys) != len(values):
                raise UsageError(f"{len(keys)} keys for {len(values)} values; give one key per value")
            records = [(k, _as_bytes(v), headers, now_ms) for k, v in zip(keys, values)]
        assert self._accumulator is not None
        return self._accumulator.submit_batch(validate_topic_name(topic), records, partition, acks, timeout)

    def _scheduling_headers(self, headers: dict | None, delay: float | None, deliver_at: float | None,
                            priority: int | None) -> dict | None:
        """``headers`` plus ``meshq-deliver-at`` / ``meshq-priority`` for the given arguments (checked)."""
        if delay is None and deliver_at is None and priority is None:
            return headers
        extra: dict[str, bytes] = {}
        if delay is not None and deliver_at is not None:
            raise UsageError("give delay= (seconds from now) or deliver_at= (unix seconds), not both")
        if delay is not None:
            if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < 10 * 365 * 86400:
                raise UsageError(f"delay must be a number of seconds >= 0 (and under 10 years), not {delay!r}")
            extra[DELIVER_AT_HEADER] = str(self.clock.wall_ms() + int(delay * 1000)).encode()
        if deliver_at is not None:
            if isinstance(deliver_at, bool) or not isinstance(deliver_at, (int, float)) or deliver_at < 0:
                raise UsageError(f"deliver_at must be unix seconds (a number >= 0), not {deliver_at!r}")
            extra[DELIVER_AT_HEADER] = str(int(deliver_at * 1000)).encode()
        if priority is not None:
            if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
                raise UsageError(f"priority must be an int from 0 (lowest) to 9 (highest), not {priority!r}")
            extra[PRIORITY_HEADER] = str(priority).encode()
        return {**(headers or {}), **extra}

    def _record(self, value: bytes, key: bytes | None, headers: dict | None, acks: str,
                timestamp_ms: int | None) -> tuple:
        """Check the arguments of one record and build its (key, value, headers, timestamp) tuple."""
        self._require_started()
        if acks not in _ACKS:
            _check_acks(acks)
        if type(value) is not bytes:
            value = _as_bytes(value)
        if key is not None and type(key) is not bytes:
            key = _as_bytes(key)
        if headers:
            headers = {str(k): _as_bytes(v) for k, v in headers.items()}
        return key, value, headers or None, timestamp_ms if timestamp_ms is not None else self.clock.wall_ms()

    def flush(self, timeout: float | None = None) -> None:
        """Send everything buffered and wait until every produce so far has completed."""
        self._require_started()
        assert self._accumulator is not None
        self._accumulator.flush_all()
        if not self._accumulator.tracker.wait_idle(timeout):
            raise TimeoutError(f"flush did not complete within {timeout} s")

    # ------------------------------------------------------------------ consume
    def consumer(self, topic: str, group: str | None = None, start: Any = "earliest", mode: str = "stream",
                 **options: Any) -> Any:
        """A consumer of ``topic``; with ``group`` its committed offsets are kept in the mesh.

        ``mode="shared"`` (with a ``group``) returns a ``meshq.shared.SharedConsumer``: any member may
        get any record, each acked on its own (options ``ack_timeout``, ``max_deliveries``, ``prefetch``).
        """
        from meshq.consumer import Consumer

        self._require_started()
        if mode == "shared":
            from meshq.shared import SharedConsumer

            if group is None:
                raise UsageError("mode='shared' needs a group: node.consumer(topic, group='workers', mode='shared')")
            if start != "earliest":
                raise UsageError("a shared group starts at the earliest record of each partition; drop start=")
            return SharedConsumer(self, topic, group, **options)
        if mode != "stream":
            raise UsageError(f"mode {mode!r} is not available in this version; use mode='stream' or mode='shared'")
        return Consumer(self, topic, group=group, start=start, **options)

    # ------------------------------------------------------------------ pub/sub
    def publish(self, subject: str, data: bytes, headers: dict[str, bytes] | None = None) -> None:
        """Send ``data`` to every current subscription matching ``subject`` in the mesh (this node's
        too; one member per queue group). At-most-once, nothing stored; returns at once: a node
        with no matching subscription costs nothing, a slow subscriber drops (and counts) instead
        of blocking. Raises ``InvalidSubjectError`` (a ValueError) for a malformed subject and
        ``MessageTooLargeError`` for data over 1 MiB."""
        if not self._started or self._stopped:
            self._require_started()
        assert self._pubsub is not None
        self._pubsub.publish(subject, data, headers)

    def subscribe(self, pattern: str, queue: str | None = None, max_pending: int = DEFAULT_MAX_PENDING,
                  timeout: float = 5.0) -> Subscription:
        """Receive what is published to subjects matching ``pattern`` (``*``: one token, ``>``: the
        rest). With ``queue``, each message goes to one member of that queue group only, across
        the mesh. Messages published after this returns reach the subscription from this node at
        once, from other nodes as soon as they learn the interest (milliseconds on a LAN)."""
        self._require_started()
        assert self._pubsub is not None
        return self._pubsub.subscribe(pattern, queue, max_pending, timeout)

    # ------------------------------------------------------------------ request/reply
    def serve(self, service: str, handler: Callable[[bytes], bytes | str], concurrency: int = 1,
              idempotent: bool = False) -> Service:
        """Serve ``service`` from this node: ``handler(payload) -> reply`` runs in a pool of
        ``concurrency`` threads. Declare ``idempotent=True`` only if running a request twice is
        harmless: a request in flight to an instance that dies is then retried on another.
        Returns a handle; ``handle.close()`` (or ``unserve``) withdraws the service."""
        self._check_serve(service, handler, concurrency)
        assert self._workers is not None
        desk = self._workers.add(service, handler, concurrency)
        try:
            self._call(ServeService(service, bool(idempotent), concurrency, desk=desk), 10.0)
        except BaseException:
            self._workers.remove(service)
            raise
        return Service(self, service)

    def _check_serve(self, service: str, handler: Any, concurrency: int) -> None:
        self._require_started()
        validate_service_name(service)
        if not callable(handler):
            raise UsageError(f"handler must be a function from bytes to bytes, not {type(handler).__name__}")
        if type(concurrency) is not int or concurrency < 1:
            raise UsageError(f"concurrency must be a positive int, not {concurrency!r}")

    def unserve(self, service: str, timeout: float = 10.0) -> None:
        """Stop serving ``service`` here: requests queued here go to other instances, running ones finish."""
        self._require_started()
        self._call(UnserveService(service), timeout)
        assert self._workers is not None
        self._workers.remove(service)

    def request(self, service: str, payload: bytes | str, timeout: float = 1.0) -> bytes:
        """Send ``payload`` to one live instance of ``service`` and return its reply.

        Raises ``NoRespondersError`` at once when no instance exists, ``TimeoutError`` when no
        reply came within ``timeout`` s, ``RemoteError`` when the handler raised, and
        ``OutcomeUnknownError`` when the instance died while handling a non-idempotent request.
        """
        payload = self._check_request(service, payload, timeout)
        if self._latency is None:
            return self._request(service, payload, timeout)
        started_s = time.monotonic()
        try:
            return self._request(service, payload, timeout)
        finally:
            self._latency.rpc.observe(time.monotonic() - started_s)

    def _request(self, service: str, payload: bytes, timeout: float) -> bytes:
        if self._requester is not None:  # sent from this thread when it can be (meshq.io.rpc_direct)
            reply = self._requester.try_request(service, payload, timeout)
            if reply is not None:
                return reply
        assert self.runtime is not None
        future: Future = Future()
        self.runtime.submit(RpcRequest(service, payload, self.clock.now_s() + timeout, future))
        return _wait(future, timeout + 1.0, f"request to {service!r}")

    def request_async(self, service: str, payload: bytes | str, timeout: float = 1.0) -> Future:
        """Like ``request``; returns a ``concurrent.futures.Future`` of the reply."""
        payload = self._check_request(service, payload, timeout)
        assert self.runtime is not None
        future = self._new_future()
        if self._latency is not None:
            future.add_done_callback(self._latency.rpc_done_callback())
        self.runtime.submit(RpcRequest(service, payload, self.clock.now_s() + timeout, future))
        return future

    def _check_request(self, service: str, payload: bytes | str, timeout: float) -> bytes:
        self._require_started()
        validate_service_name(service)
        if type(payload) is not bytes:
            payload = _as_bytes(payload)
        if len(payload) > self.config.max_frame_bytes:
            raise MessageTooLargeError(f"request of {len(payload)} bytes exceeds max_frame_bytes "
                                       f"({self.config.max_frame_bytes}); send less per request")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise UsageError(f"timeout must be a positive number of seconds, not {timeout!r}")
        return payload

    # ------------------------------------------------------------------ status
    def status(self, timeout: float = 5.0, node_id: str | None = None) -> dict:
        """The cluster, shaped like ``meshq status --json``: every storage node's view merged,
        or with ``node_id`` that one node's own view. ``services`` lists the services of every
        node that answered and of this one; ``service_instances`` the live nodes offering each
        service, as this node or any node that answered sees them (a process started a moment ago
        has not heard every advert yet; the nodes have)."""
        status = self._call(GetStatus(node_id or None), timeout)
        report = self._call(RpcReport(), timeout)
        own = [s for s in status.get("services", []) if s["node_id"] != self.node_id]
        status["services"] = sorted(own + report["services"], key=lambda s: (s["service"], s["node_id"]))
        if node_id is None:  # (asked of one node: that node's own view, as it was given)
            status["service_instances"] = merge_instances([status.get("service_instances", {}), report["instances"]])
        calls = dict(report["calls"])
        if self._requester is not None:  # requests sent from the callers' threads
            direct = self._requester.stats()
            calls["late_replies"] += direct.pop("direct_late_replies")
            calls.update(direct)
        status["requests"] = calls
        return status


class Service:
    """The handle ``Node.serve`` returns: ``close()`` withdraws the service (also on ``with`` exit)."""

    def __init__(self, node: Node, service: str) -> None:
        self.node = node
        self.service = service
        self.closed = False

    def close(self) -> None:
        """Withdraw the service from this node (idempotent; a stopped node serves nothing anyway)."""
        if self.closed:
            return
        self.closed = True
        if self.node._started and not self.node._stopped and not self.node.has_left:
            self.node.unserve(self.service)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<meshq.Service {self.service!r}{' closed' if self.closed else ''}>"


def live_storage_members(status: dict) -> list[dict]:
    """The storage members a status report shows alive."""
    return [m for m in status["members"] if m["role"] == "storage" and m["state"] == "alive"]


def _wait(future: Future, timeout_s: float, what: str) -> Any:
    try:
        return future.result(timeout_s)
    except MeshqError:
        raise
    except builtins.TimeoutError:  # the Future itself timed out
        raise TimeoutError(f"{what} did not complete within {timeout_s:.1f} s") from None


def _check_acks(acks: str) -> None:
    if acks not in _ACKS:
        raise UsageError(f"acks must be one of {', '.join(_ACKS)}, not {acks!r}")


def _as_bytes(value: Any) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise UsageError(f"values, keys and headers must be bytes (or str), not {type(value).__name__}")
