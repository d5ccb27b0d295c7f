"""The runtime thread: owns every ZeroMQ socket of a node and executes the core's effects.

Theory of operation
-------------------
One thread per node. It binds a ROUTER (requests in) and a PUB (events out), keeps one
DEALER per known peer, and polls all of them plus a wakeup eventfd until the core's next
deadline. Local API calls from any thread are appended to a deque and the eventfd is
written (at most one pending wakeup), so the thread that calls ``Node.produce`` never
touches a socket. Each loop iteration drains a bounded number of inputs, feeds them to the
core, executes the resulting effects, and then performs every ``SyncLogs`` asked for during
the iteration with one fsync per log — group commit: one fsync covers every batch appended
in that iteration — before feeding ``LogsSynced`` back so acks waiting for durability go out.

A node that has left the cluster (``meshq leave``: ``core.has_left``) stops by itself at the
end of the iteration in which it answered ``left``: the usual stop path runs (goodbye, last
fsyncs), the ROUTER lingers ``_LEFT_LINGER_MS`` so that the ``left`` answer reaches the
caller, then ``left`` is set and ``on_left`` runs. It does not keep serving in between: a
node outside the membership that keeps running would only ask to be admitted again.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

import zmq

from meshq.core import wire
from meshq.core.acl import CLUSTER
from meshq.core.events import (
    COMMANDS,
    RPC_COMMANDS,
    BadRequest,
    Connect,
    Disconnect,
    EventReceived,
    Fail,
    LogsSynced,
    PeerDisconnected,
    ProduceCommand,
    Publish,
    Reply,
    ReplyReceived,
    RequestReceived,
    Resolve,
    ResolveProduce,
    RpcRequest,
    RpcRequests,
    RunHandlers,
    Send,
    Subscribe,
    SyncLogs,
    TrustedNames,
    Unsubscribe,
)
from meshq.core.node import NodeCore
from meshq.core.pubsub import frames as pubsub_frames
from meshq.errors import NodeStoppedError, ProtocolError, StorageError
from meshq.io.dropwatch import DropWatches
from meshq.io.keyed_sub import KeyedSubs
from meshq.io.sockets import (
    EVENTS,
    NOBLOCK,
    POLLIN,
    RCVMORE,
    bind_tcp,
    frame_peer_address,
    frame_user_id,
    new_socket,
    send_frames,
)

log = logging.getLogger("meshq.runtime")

_MAX_INPUTS_PER_SOCKET = 256  # bound per loop iteration so one busy peer cannot starve the rest
# Keyed: the XPUB's ZMQ_FD signals only new commands, and a publishing thread's send may consume that signal while
# a subscription waits in the socket: the runtime judges subscriptions when the FD is readable and at least this often.
_SUBSCRIPTIONS_DRAIN_S = 0.05
_PUBSUB_HWM = 1000  # messages (pub/sub batches, heartbeats) queued per peer on the PUB and SUB sockets
_TRUSTED_READ_S = 1.0  # a keyed storage node reads cluster/trusted/ for the core this often (acl_view)
_LEFT_LINGER_MS = 1000  # how long the ROUTER of a node that left may take to deliver its last replies
if os.environ.get("MESHQ_CHECK_OUTGOING", "") == "1":
    wire.CHECK_OUTGOING = True  # (see meshq.core.wire): the switch lives with the I/O, not in the core


class Runtime:
    """Owns the sockets and the core; see the module docstring."""

    def __init__(self, core: NodeCore, clock: Any, storage: Any, context: zmq.Context | None = None,
                 keys: Any = None) -> None:
        self.core = core
        self.clock = clock
        self.storage = storage
        # With keys (meshq.keys.KeySet) every socket is CURVE and the node runs a ZAP handler, which is one per
        # context: such a node gets a context of its own.
        self.curve: Any = None
        if keys is not None:
            from meshq.io.curve import Curve

            self.context = context or zmq.Context()
            self.curve = Curve(keys, self.context)
            self.curve.member_keys = self._member_keys
        else:
            self.context = context or zmq.Context.instance()
        self.commands: deque = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_pending = False
        # Guards writing and closing the eventfd: once closed, its number may belong to another file.
        self._wake_lock = threading.Lock()
        self._stop_requested = False
        self._thread: threading.Thread | None = None
        self._dealers: dict[str, zmq.Socket] = {}
        self._socket_peer: dict[zmq.Socket, str] = {}
        # each peer DEALER's drop monitor (meshq.io.dropwatch): polled; a drop is fed to the core as PeerDisconnected
        self._drops: DropWatches | None = None  # made in _run, with the poller
        # A keyed node subscribes to each peer's PUB with a SUB socket of its own (pub/sub data's source is then
        # the key that socket's handshake verified, not the frame's claim): meshq.io.keyed_sub, made in _run.
        self._keyed_subs: KeyedSubs | None = None
        self._monitors: dict[zmq.Socket, tuple[str, str]] = {}  # handshake monitors -> (endpoint, socket kind)
        self._refusal_logged_s = float("-inf")
        self._zap_refused = 0
        self._trusted: dict[str, str] | None = None  # the client keys last handed to the core (_read_trusted)
        # peers refused: a handshake that failed (CURVE against plain) or a key ZAP refused (status, metrics)
        core.counters.setdefault("auth_refused", 0)
        self.router: zmq.Socket | None = None
        self.pub: zmq.Socket | None = None
        self.sub: zmq.Socket | None = None
        self.subscription_gate: Any = None  # keyed: judges the subscriptions on ``pub`` (meshq.io.xpub)
        self._pub_fd = -1  # keyed: the XPUB's ZMQ_FD, readable when it may hold subscriptions to judge
        self._subscriptions_drained_s = float("-inf")
        # Pub/sub (meshq.io.pubsub) publishes on ``pub`` from callers' threads: every use of ``pub``
        # holds this lock. ``on_data(frame, payload)`` takes the data frames ``sub`` receives.
        self.pub_lock = threading.Lock()
        self.on_data: Callable[[bytes, bytes, str | None], None] | None = None
        self.endpoint = ""
        self.pub_endpoint = ""
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        self._tasks: list[tuple[float, int, Any]] = []  # (deadline_s, seq, callable): front-end timers
        self._task_seq = 0
        # set once the node left the cluster and the runtime stopped because of it (module docstring)
        self.left = threading.Event()
        self.on_left: Callable[[], None] | None = None  # runs on the runtime thread after ``left`` is set
        # runs a service's handler off this thread (meshq.io.rpc); it feeds back ``HandlerDone``
        self.run_handler: Callable[[RunHandlers], None] | None = None

    # ------------------------------------------------------------------ called from any thread
    def submit(self, item: Any) -> None:
        """Queue an input for the core (thread-safe)."""
        self.commands.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            with self._wake_lock:
                if self._wake_fd < 0:
                    return  # the runtime has stopped (the node stopped or left): nothing reads it any more
                try:
                    os.eventfd_write(self._wake_fd, 1)
                except OSError:
                    pass

    def call_later(self, delay_s: float, task: Any) -> None:
        """Run ``task()`` on the runtime thread after ``delay_s`` (thread-safe)."""
        self.submit(_Task(self.clock.now_s() + delay_s, task))

    def start(self) -> None:
        self._bind()
        self._thread = threading.Thread(target=self._run, name=f"meshq-{self.core.node_id}", daemon=True)
        self._thread.start()
        self.started.wait()
        if self.start_error is not None:
            raise self.start_error

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop_requested = True
        self.submit(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        """The runtime thread is still alive (e.g. ``stop``'s join timed out during its last fsyncs)."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ runtime thread
    def _bind(self) -> None:
        config = self.core.config
        if self.curve is not None:
            self.curve.start()
        self.router = self._socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if self.curve is None:
            self.pub = self._socket(zmq.PUB)
        else:  # an XPUB that takes a data subscription only from the key it names (meshq.io.xpub)
            from meshq.io.xpub import SubscriptionGate, new_keyed_pub

            self.pub = new_keyed_pub(self._socket(zmq.XPUB))
            self.subscription_gate = SubscriptionGate(self.pub, self.core.pubsub.counters)
        self.sub = self._socket(zmq.SUB)
        # Control messages (wire headers) and the pub/sub data frames addressed to this node only:
        # a PUB filters for its subscribers, so data for other nodes never reaches us.
        self.sub.setsockopt(zmq.SUBSCRIBE, pubsub_frames.CONTROL_PREFIX)
        self.sub.setsockopt(zmq.SUBSCRIBE, self._own_data_prefix())
        # Pub/sub batches hold up to 64 KiB: these bound what a paused or slow peer can hold up
        # (per peer, at each end) to about 64 MiB; beyond, its messages are dropped (and counted).
        self.pub.setsockopt(zmq.SNDHWM, _PUBSUB_HWM)
        self.sub.setsockopt(zmq.RCVHWM, _PUBSUB_HWM)
        for sock, port, flag, what in ((self.router, config.port, "--port", "ROUTER (requests)"),
                                       (self.pub, config.pub_port, "--pub-port", "PUB (events)")):
            try:
                endpoint = bind_tcp(sock, config.host, port)
            except zmq.ZMQError as exc:
                self._close_sockets()
                raise StorageError(f"cannot bind the {what} socket to {config.host}:{port or '*'} ({exc}); choose "
                                   f"a free {flag} or another --host") from None
            if sock is self.router:
                self.endpoint = endpoint
            else:
                self.pub_endpoint = endpoint
        if config.advertised_host:
            port = self.endpoint.rsplit(":", 1)[1]
            self.endpoint = f"tcp://{config.advertised_host}:{port}"
            pub_port = self.pub_endpoint.rsplit(":", 1)[1]
            self.pub_endpoint = f"tcp://{config.advertised_host}:{pub_port}"

    def _own_data_prefix(self) -> bytes:
        """The prefix of the data frames addressed to this node; keyed, it names the key this node listens with."""
        if self.curve is None:
            return pubsub_frames.data_prefix(self.core.node_id)
        return pubsub_frames.keyed_data_prefix(self.core.node_id, self.curve.keys.public)

    def data_key(self, node_id: str) -> bytes:
        """Keyed: the key the data frames to ``node_id`` are addressed with (``frames.keyed_data_prefix``), the one
        ``node_id`` listens with (from any thread: a lookup in the member table)."""
        return self._server_key(node_id)

    def _drain_subscriptions(self) -> None:
        """Keyed: apply or refuse the subscriptions the XPUB holds (meshq.io.xpub)."""
        self._subscriptions_drained_s = self.clock.now_s()
        with self.pub_lock:
            if self.pub is not None and not self.pub.closed:
                self.subscription_gate.drain()

    def _socket(self, kind: int, endpoint: str | None = None) -> zmq.Socket:
        return new_socket(self.context, kind, self.core.config.max_frame_bytes, self.curve, endpoint)

    def _watch_handshakes(self) -> None:
        """Monitor the ROUTER (and a keyed node's PUB) for handshakes that failed: a peer with keys at a node
        without, or the other way round, never forms a mesh, and the refusing side says so (module docstring)."""
        mask = int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sockets = (self.router, self.pub) if self.curve is not None else (self.router,)
        for sock in sockets:
            monitor = sock.get_monitor_socket(mask)
            self._monitors[monitor] = (sock.getsockopt_string(zmq.LAST_ENDPOINT), "PUB" if sock is self.pub else
                                       "ROUTER")

    def _drain_monitor(self, monitor: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        endpoint, what = self._monitors[monitor]
        while True:
            try:
                recv_monitor_message(monitor, NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            counters = self.core.counters
            counters["auth_refused"] += 1
            now = self.clock.now_s()
            if now - self._refusal_logged_s < 60.0:
                continue
            self._refusal_logged_s = now
            if self.curve is not None:
                log.warning("refused a connection to the %s at %s: the peer does not speak CURVE with this cluster's "
                            "key (started without --keys, or with another cluster's keys; %d refused so far): give it "
                            "--keys of this cluster", what,
                            endpoint, counters["auth_refused"])
            else:
                log.warning("refused a connection to the %s at %s: the peer speaks CURVE and this node has no keys "
                            "(%d refused so far): start this node with --keys DIR/cluster of that cluster, or that "
                            "peer without --keys", what, endpoint, counters["auth_refused"])

    def _run(self) -> None:
        poller = zmq.Poller()
        self._poller = poller
        self._drops = DropWatches(poller)
        if self.curve is not None:
            self._keyed_subs = KeyedSubs(lambda: self.core.members, lambda: self._socket(zmq.SUB),
                                         self._own_data_prefix(),
                                         lambda endpoint: self._server_key(pub_endpoint=endpoint), poller, _PUBSUB_HWM)
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.sub, zmq.POLLIN)
        try:
            self._watch_handshakes()
        except zmq.ZMQError as exc:  # monitoring is diagnostics only: never fatal
            log.warning("cannot monitor handshakes: %s", exc)
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_fd, zmq.POLLIN)
        if self.subscription_gate is not None:
            self._pub_fd = self.pub.getsockopt(zmq.FD)
            poller.register(self._pub_fd, zmq.POLLIN)
        try:
            self._execute(self.core.start(self.endpoint, self.clock.now_s(), self.pub_endpoint,
                                          self.curve.keys.public.decode("ascii") if self.curve is not None else ""))
        except BaseException as exc:  # report to start() and die
            self.start_error = exc
            self.started.set()
            self._close_sockets()
            return
        self.started.set()
        if self.curve is not None and self.curve.keys.kind == "cluster":
            self._read_trusted()
        try:
            self._loop(poller)
        except BaseException:
            log.exception("runtime of node %s crashed", self.core.node_id)
            raise
        finally:
            try:
                self._execute(self.core.stop(self.clock.now_s()))
                self._flush_syncs()
                self._fail_leftovers()
            finally:
                self._close_sockets()
        if self.core.has_left:
            self.left.set()
            if self.on_left is not None:
                try:
                    self.on_left()
                except Exception:  # the node is stopped either way; say what failed on the way out
                    log.exception("cleanup after node %s left the cluster failed", self.core.node_id)

    def _fail_leftovers(self) -> None:
        """Fail commands that arrived too late to be handled (the node is stopping)."""
        error = NodeStoppedError("the node was stopped before the operation completed")
        while self.commands:
            item = self.commands.popleft()
            if isinstance(item, ProduceCommand) and item.waiter is not None:
                item.waiter.settle(range(len(item.records)), item.records, item.topic, -1, -1, error)
            elif isinstance(item, COMMANDS) or isinstance(item, RPC_COMMANDS):
                _settle(item.waiter, None, error)

    def _loop(self, poller: zmq.Poller) -> None:
        core = self.core
        clock = self.clock
        socket_peer = self._socket_peer
        assert self._drops is not None
        watched = self._drops.peer_of  # a drop monitor's reading end -> its peer
        self._sync_keys: set = set()
        deadline: float | None = None
        deadline_known = False  # the core's next deadline, when nothing changed since it was asked
        while not self._stop_requested:
            now = clock.now_s()
            if not deadline_known:
                deadline = core.next_deadline()
            if self._tasks and (deadline is None or self._tasks[0][0] < deadline):
                deadline = self._tasks[0][0]
            if self.commands:
                timeout_ms = 0
            elif deadline is None:
                timeout_ms = 1000
            else:
                timeout_ms = max(0, min(1000, int((deadline - now) * 1000) + 1))
            ready = dict(poller.poll(timeout_ms))
            if self._wake_fd in ready:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
            self._wake_pending = False
            if self.curve is not None and self.curve.refused != self._zap_refused:  # counted on the ZAP thread
                refused = self.curve.refused
                core.counters["auth_refused"] += refused - self._zap_refused
                self._zap_refused = refused
            if self.subscription_gate is not None and (
                    self._pub_fd in ready or now - self._subscriptions_drained_s >= _SUBSCRIPTIONS_DRAIN_S):
                self._drain_subscriptions()
            if self.router in ready:
                self._drain_router()
            if self.sub in ready:
                self._drain_sub(self.sub, None)
            if self._keyed_subs is not None and self._keyed_subs.node_of:
                for sock, via in list(self._keyed_subs.node_of.items()):
                    if sock in ready:
                        self._drain_sub(sock, via)
            if self._monitors:
                for monitor in self._monitors:
                    if monitor in ready:
                        self._drain_monitor(monitor)
            for sock in ready:
                peer = socket_peer.get(sock)
                if peer is not None:
                    self._drain_dealer(sock, peer)
                elif sock in watched:
                    self._on_drop_watch(watched[sock])
            if self.commands:
                self._drain_commands()
            now = clock.now_s()
            while self._tasks and self._tasks[0][0] <= now:
                heapq.heappop(self._tasks)[2]()
            deadline = core.next_deadline()
            deadline_known = True
            if deadline is not None and deadline <= now:
                self._execute(core.on_timer(now))
                deadline_known = False
            if self._sync_keys and self._flush_syncs():
                deadline_known = False
            if core.has_left:
                log.info("node %s left the cluster (meshq leave): its partitions are on the other members and it "
                         "is out of the storage membership; stopping", core.node_id)
                return

    def _read_trusted(self) -> None:
        """A keyed storage node: hand the core the trusted client keys and their names (``cluster/trusted/``) when
        they changed, which it serves client nodes (``acl_view``); then again in ``_TRUSTED_READ_S``."""
        if self._stop_requested:
            return
        names = {key.decode("ascii", "replace"): name for key, name in self.curve.keys.trusted_names().items()
                 if name != CLUSTER}
        if names != self._trusted:
            self._trusted = names
            self._execute(self.core.handle(TrustedNames(names), self.clock.now_s()))
        self.call_later(_TRUSTED_READ_S, self._read_trusted)

    def _drain_router(self) -> None:
        if self.curve is None:  # no keys: no identity (nothing is checked)
            self._drain(self.router, lambda head, frames, message: RequestReceived(frames[0], message), header_at=1)
        else:  # the ZAP handler named the key's owner (meshq.io.curve): the caller the core checks
            self._drain(self.router, lambda head, frames, message: RequestReceived(frames[0], message,
                                                                                   frame_user_id(head)), header_at=1)

    def _drain_sub(self, sock: zmq.Socket, via: str | None) -> None:
        """Events for the core, and pub/sub data frames for ``on_data`` (never decoded by the core); ``via``: the
        node whose PUB a keyed node's per-peer SUB socket reaches (None: the shared SUB of an unkeyed node)."""
        core, cluster = self.core, self.core.config.cluster
        data_mark = pubsub_frames.DATA_MARK[0]
        keyed = via is not None  # the frames name this node's key after the mark; the room reads the unkeyed prefix
        strip_key = pubsub_frames.strip_key
        on_data = self.on_data
        pubsub_counters = core.pubsub.counters
        for _ in range(_MAX_INPUTS_PER_SOCKET):
            try:
                head = sock.recv(NOBLOCK, copy=False)  # a Frame: it knows the sender's address
            except zmq.Again:
                return
            frames = [head.bytes]
            while sock.get(RCVMORE):
                frames.append(sock.recv(NOBLOCK))
            first = frames[0]
            if first and first[0] == data_mark:
                if len(frames) != 2 or on_data is None:
                    pubsub_counters["frames_invalid"] += 1
                    core.blame(frame_peer_address(head))
                    continue
                invalid = pubsub_counters["frames_invalid"]
                if keyed:
                    first = strip_key(first)
                try:
                    on_data(first, frames[1], via)
                except Exception:  # a bug on the data path: never fatal for the node
                    core.counters["handler_errors"] = core.counters.get("handler_errors", 0) + 1
                    log.exception("error while delivering a pub/sub message; dropped")
                if pubsub_counters["frames_invalid"] != invalid:  # the room refused (and counted) it
                    core.blame(frame_peer_address(head))
                continue
            try:
                message = wire.decode(frames, cluster)
            except Exception as exc:  # ProtocolError, or a decoder bug: never fatal
                core.note_invalid_frame(exc if isinstance(exc, ProtocolError) else ProtocolError(repr(exc)[:200]),
                                        frame_peer_address(head))
                continue
            self._handle_peer_input(EventReceived(message))

    def _drain_dealer(self, sock: zmq.Socket, peer: str) -> None:
        self._drain(sock, lambda head, frames, message: ReplyReceived(peer, message), peer=peer)

    def _drain(self, sock: zmq.Socket, to_event: Any, header_at: int = 0, peer: str = "") -> None:
        """Read up to _MAX_INPUTS_PER_SOCKET messages from ``sock``, decode, and feed the core.

        ``header_at`` skips the ROUTER's identity frame; ``to_event(head, frames, message)`` builds the
        core's input. A frame that fails to decode is dropped and counted, never fatal: for
        ``peer`` (the node a DEALER talks to), else for the sender's address.
        """
        core = self.core
        cluster = core.config.cluster
        more = True
        for _ in range(_MAX_INPUTS_PER_SOCKET):
            if not more or sock.closed:
                return  # drained, or an effect of the previous message disconnected this peer
            try:
                head = sock.recv(NOBLOCK, copy=False)  # a Frame: it knows the sender's address
            except zmq.Again:
                return
            frames = [head.bytes]
            # (a message's frames arrive together: no wait here). A Frame says whether more follow: cheaper than
            # asking the socket for RCVMORE, which pyzmq turns into an enum lookup in Python on every call.
            frame = head
            while frame.more:
                frame = sock.recv(NOBLOCK, copy=False)
                frames.append(frame.bytes)
            # Another message waiting? Asked here, not by a recv that fails: a failed recv raises zmq.Again,
            # whose construction costs several times this query, once per drain (one message, most often).
            more = sock.get(EVENTS) & POLLIN
            try:
                message = wire.decode(frames[header_at:], cluster)
            except wire.InvalidRequest as exc:
                if header_at and exc.request_id:  # a request (ROUTER) with an id: answer what is wrong
                    self._handle_peer_input(BadRequest(frames[0], exc.request_id, exc))
                else:
                    core.note_invalid_frame(exc, peer or frame_peer_address(head))
                continue
            except Exception as exc:  # ProtocolError, or a decoder bug: never fatal
                core.note_invalid_frame(exc if isinstance(exc, ProtocolError) else ProtocolError(repr(exc)[:200]),
                                        peer or frame_peer_address(head))
                continue
            self._handle_peer_input(to_event(head, frames, message))

    def _member_keys(self) -> set[bytes]:
        """Keys of the client members this node knows (called on the ZAP thread: the table may change meanwhile)."""
        members = self.core.members
        for _ in range(3):
            try:
                return {m.key.encode("ascii") for m in list(members.members.values()) if m.key}
            except RuntimeError:  # the table changed size during the copy
                continue
        return set()

    def _server_key(self, peer: str | None = None, pub_endpoint: str | None = None) -> bytes:
        """The CURVE key the peer listens with: the cluster key, or a client's own (gossiped in its member info)."""
        members = self.core.members
        member = None
        if members is not None:
            if peer is not None:
                member = members.get(peer)
            else:
                member = next((m for m in members.members.values() if m.pub_address == pub_endpoint), None)
        if member is not None and member.role == "client" and member.key:
            return member.key.encode("ascii")
        return self.curve.keys.cluster_public

    def _subscribe(self, endpoint: str) -> None:
        if self._keyed_subs is not None:
            self._keyed_subs.subscribe(endpoint)
            return
        try:
            self.sub.connect(endpoint)
        except zmq.ZMQError as exc:
            log.warning("cannot subscribe to %s: %s", endpoint, exc)

    def _handle_peer_input(self, event: Any) -> None:
        """Feed a peer's message to the core; a bug it triggers is logged and counted, never fatal.

        The decoder already rejected malformed frames; this is the last line of defence so
        that no peer can crash or stall the node through an unforeseen path.
        """
        try:
            effects = self.core.handle(event, self.clock.now_s())
        except Exception:
            self.core.counters["handler_errors"] = self.core.counters.get("handler_errors", 0) + 1
            message = getattr(event, "message", None)  # (a BadRequest has none)
            log.exception("error while handling a %s from a peer; message dropped",
                          message.type if message is not None else type(event).__name__)
            return
        self._execute(effects)

    def _drain_commands(self) -> None:
        """Hand the queued commands to the core, in order; consecutive ``RpcRequest``s (pipelined
        ``request_async`` calls) go as one ``RpcRequests``, so those to one instance share a message."""
        core, clock, commands = self.core, self.clock, self.commands
        requests: list = []
        for _ in range(len(commands)):
            item = commands.popleft()
            kind = type(item)
            if kind is RpcRequest:
                requests.append(item)
                continue
            if requests:
                self._execute(core.handle(requests[0] if len(requests) == 1 else RpcRequests(tuple(requests)),
                                          clock.now_s()))
                requests = []
            if item is None:
                continue
            if kind is _Task:
                self._task_seq += 1
                heapq.heappush(self._tasks, (item.deadline_s, self._task_seq, item.run))
                continue
            self._execute(core.handle(item, clock.now_s()))
        if requests:
            self._execute(core.handle(requests[0] if len(requests) == 1 else RpcRequests(tuple(requests)),
                                      clock.now_s()))

    def _flush_syncs(self) -> bool:
        """Sync the logs asked for since the last call; True when the core was told (its timers may
        have changed)."""
        if not self._sync_keys:
            return False
        keys, self._sync_keys = frozenset(self._sync_keys), set()
        partitions = self.core.partitions
        synced = set()
        for key in sorted(keys):
            state = partitions.get(key)
            if state is None:
                continue
            try:
                state.log.sync()
            except StorageError as exc:
                # Never acknowledge what may not be on disk (the "fsyncgate" lesson: after a
                # failed fsync the page cache may have dropped the dirty pages). The log now
                # refuses further use; its waiting acks time out at the producers.
                log.critical("fsync of %s/%d failed; the partition is unusable until restart: %s",
                             key[0], key[1], exc)
                continue
            synced.add(key)
        self._execute(self.core.handle(LogsSynced(frozenset(synced)), self.clock.now_s()))
        return True

    # ------------------------------------------------------------------ effects
    def _execute(self, effects: list) -> None:
        for effect in effects:
            kind = type(effect)
            if kind is Send:
                sock = self._dealers.get(effect.peer)
                if sock is not None:
                    send_frames(sock, effect.frames)
            elif kind is Reply:
                send_frames(self.router, [effect.route, *effect.frames])
            elif kind is ResolveProduce:
                effect.waiter.settle(effect.indexes, effect.records, effect.topic, effect.partition,
                                     effect.base_offset, effect.error)
            elif kind is Resolve:
                _settle(effect.waiter, effect.result, None)
            elif kind is Fail:
                _settle(effect.waiter, None, effect.error)
            elif kind is SyncLogs:
                self._sync_keys.update(effect.keys)
            elif kind is RunHandlers:
                assert self.run_handler is not None, "a service is served without a handler pool"
                self.run_handler(effect)
            elif kind is Publish:
                with self.pub_lock:
                    send_frames(self.pub, effect.frames)
            elif kind is Subscribe:
                self._subscribe(effect.endpoint)
            elif kind is Unsubscribe:
                if self._keyed_subs is not None:
                    self._keyed_subs.unsubscribe(effect.endpoint)
                else:
                    try:
                        self.sub.disconnect(effect.endpoint)
                    except zmq.ZMQError:
                        pass
            elif kind is Connect:
                self._connect(effect.peer, effect.endpoint)
            elif kind is Disconnect:
                self._close_dealer(effect.peer)
            else:
                raise AssertionError(f"unknown effect {effect!r}")

    def _close_dealer(self, peer: str) -> None:
        sock = self._dealers.pop(peer, None)
        if sock is not None:
            self._poller.unregister(sock)
            self._socket_peer.pop(sock, None)
            assert self._drops is not None
            self._drops.close(peer)  # before its DEALER (meshq.io.dropwatch)
            sock.close(0)

    def _on_drop_watch(self, peer: str) -> None:
        """The drop monitor of ``peer``'s DEALER is readable: a drop fails the requests pending on it (core)."""
        assert self._drops is not None
        if self._drops.dropped(peer):
            log.info("connection to %s dropped; the requests waiting on it are retried", peer)
            self._handle_peer_input(PeerDisconnected(peer))

    def _connect(self, peer: str, endpoint: str) -> None:
        self._close_dealer(peer)
        if self.curve is not None:
            self.curve.note_endpoint(peer, endpoint, self._server_key(peer))
        sock = self._socket(zmq.DEALER, endpoint)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            log.warning("cannot connect to %s at %s: %s", peer, endpoint, exc)
            sock.close(0)
            return
        self._dealers[peer] = sock
        self._socket_peer[sock] = peer
        self._poller.register(sock, zmq.POLLIN)
        assert self._drops is not None
        self._drops.add(peer, sock)

    def _close_sockets(self) -> None:
        if self._monitors:  # stop the handshake monitors before closing their PAIRs (see meshq.io.dropwatch)
            for sock in (self.router, self.pub):
                if sock is not None and not sock.closed:
                    try:
                        sock.disable_monitor()
                    except zmq.ZMQError:
                        pass
        for monitor in list(self._monitors):
            monitor.close(0)
        self._monitors.clear()
        if self._drops is not None:
            self._drops.close_all()  # before the DEALERs
        for sock in list(self._dealers.values()):
            sock.close(0)
        self._dealers.clear()
        self._socket_peer.clear()
        if self._keyed_subs is not None:
            self._keyed_subs.close()
        if self.router is not None:
            self.router.close(_LEFT_LINGER_MS if self.core.has_left else 0)  # the ``left`` answer must get out
        if self.sub is not None:
            self.sub.close(0)
        if self.pub is not None:
            with self.pub_lock:
                self.pub.close(200)  # give the goodbye a moment to leave
        if self.curve is not None:
            self.curve.stop()
        with self._wake_lock:
            wake_fd, self._wake_fd = self._wake_fd, -1
        try:
            os.close(wake_fd)
        except OSError:
            pass


class _Task:
    __slots__ = ("deadline_s", "run")

    def __init__(self, deadline_s: float, run: Any) -> None:
        self.deadline_s = deadline_s
        self.run = run


def _settle(waiter: Any, result: Any, error: BaseException | None) -> None:
    if waiter is None:
        return
    if isinstance(waiter, Future):
        try:  # (set_* refuse a future already done or cancelled: one lock taken, not two)
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)
        except InvalidStateError:
            pass  # already settled, or cancelled by its caller (another thread): nobody waits
    else:
        waiter(result, error)


__all__ = ["Runtime"]
