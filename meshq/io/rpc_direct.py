"""Synchronous requests from the caller's thread: the I/O shell of ``Node.request``'s fast path.

Theory of operation
-------------------
Through the runtime thread a request costs the caller two thread hand-offs (caller ->
runtime to send, runtime -> caller to complete), which on a small machine are most of a
loopback round trip. When the chosen instance is another node, this module sends the
request from the calling thread instead, on that thread's own DEALER socket to the instance's
ROUTER, and waits for the answer there (as ``meshq.io.direct`` does for produce). When the
instance advertises a *desk* for the service (``meshq.core.rpc.desk``: the socket of the
service's one worker thread), the request goes there instead, and the worker answers it
itself — one thread woken on each side. A desk withdrawn while requests wait there answers
them ``not_serving`` (after the one running, if any), and keeps answering so for a while after
its service is withdrawn (``meshq.io.rpc``), until every caller has learnt it is gone. A socket
to a desk sends only while connected (``IMMEDIATE``): when it is not — the first request after
a connect, or a desk port a firewall or NAT does not let through — the request goes to the
node's ROUTER instead. The node's own desk is reached through ``inproc``. Sockets to desks no
longer advertised are closed when a new desk is first asked.

Every decision is the pure core's (``meshq.core.rpc.room``): which instances are live and
offer the service (``Rpc.instances``: a read of the runtime's tables), which one to ask
(``choose``: least outstanding, counting this path's requests too), and what an answer, a
silent instance or the deadline means (``when_answered``, ``when_silent``, ``when_none``,
``timed_out``) — the simulator runs the same functions through the runtime path. This shell
only sends, polls in slices of ``_SLICE_S`` (looking at the instance's liveness in the member
table between slices: suspect, dead or gone means "silent"), sleeps for a pause, and keeps
counts.

Request ids come from one process-wide counter starting at ``DIRECT_REQUEST_IDS`` (above
anything the runtime's outbox reaches), so a server's duplicate check, keyed by caller node,
incarnation and request id, never confuses the two paths; an answer whose id is not the one
awaited is a late reply to an earlier request of this thread: dropped and counted.

``try_request`` returns None — the request then goes through the runtime — when nothing was
sent and the fast path does not apply: no instance is known yet (the runtime path waits for
adverts after a start, and says "no responders"), or the chosen instance is this node itself
and the service has no desk here.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import weakref
from typing import Any

import zmq

from meshq.core import wire
from meshq.core.rpc.desk import DESKS, desks_of
from meshq.core.rpc.room import FAIL, PARK, REPLY, RETRY, Call, choose, timed_out, when_answered, when_none, when_silent
from meshq.errors import NodeStoppedError, ProtocolError
from meshq.io.sockets import NOBLOCK, NOBLOCK_MORE, RCVTIMEO, ZERO_COPY_BYTES, new_socket, raw_send

_SLICE_S = 0.05  # how often a waiting call looks at its instance's liveness and at close()
_SLICE_MS = int(_SLICE_S * 1000) + 1
_MAX_TIMEOUT_MS = (1 << 31) - 1  # the wire's limit of ``timeout_ms`` (a longer timeout is still waited out here)
DIRECT_REQUEST_IDS = 1 << 48


class _ThreadSockets:
    __slots__ = ("thread", "lock", "sockets")

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = weakref.ref(thread)
        self.lock = threading.Lock()
        self.sockets: dict[str, zmq.Socket] = {}

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)
        self.sockets.clear()


class DirectRequester:
    """See the module docstring. ``node`` is the ``meshq.Node`` facade it serves."""

    def __init__(self, node: Any, context: zmq.Context) -> None:
        self.core = node.core
        self.workers = getattr(node, "_workers", None)  # (meshq.io.rpc: this node's desks, for its own callers)
        self.config = node.core.config
        self.now_s = node.clock.now_s
        self.context = context
        self.curve = node.runtime.curve  # CURVE settings when the node has keys (meshq.io.curve)
        self.rng = random.Random()
        self.closed = False
        self._ids = itertools.count(DIRECT_REQUEST_IDS)
        self._local = threading.local()
        self._states: list[_ThreadSockets] = []
        self._lock = threading.Lock()
        self.outstanding: dict[str, int] = {}  # node id -> requests of this path in flight there (under _lock)
        self.counters = {"direct_requests": 0, "direct_replies": 0, "direct_retries": 0, "direct_late_replies": 0}

    # ------------------------------------------------------------------ public
    def try_request(self, service: str, payload: bytes, timeout_s: float) -> bytes | None:
        """Send ``payload`` from this thread and wait for the reply; None when the fast path does
        not apply and nothing was sent (module docstring). Raises what the caller is told."""
        if self.closed:
            return None
        call = Call(0, service, payload, self.now_s() + timeout_s, None)
        state = self._state()
        sent = False
        with state.lock:
            while True:
                now = self.now_s()
                if now >= call.deadline_s:
                    raise timed_out(call, call.instance)
                try:
                    offers = self.core.rpc.instances(service)  # a read of the runtime's tables
                except RuntimeError:  # a table changed under us (very rare): let the runtime do it
                    offers = None
                if offers is None and sent:
                    offers = {}
                if offers is None or (not sent and not offers):
                    return None
                # (one instance: chosen whatever its count, so the counts are not gathered)
                outstanding = self._outstanding() if len(offers) > 1 else {}
                instance = choose(offers, outstanding, call.avoid, self.rng)
                if instance is None:
                    action, value = when_none(call, bool(offers), True, now, now)
                    if action == PARK:
                        time.sleep(max(0.0, value - now))
                        continue
                    raise self.core.rpc.explain(service, value)
                fallback = None  # where to send when the desk cannot be reached (module docstring)
                if instance == self.core.node_id:  # this node's own desk, through inproc (else the runtime)
                    endpoint = self.workers.inproc(service) if self.workers is not None else None
                else:
                    endpoint = self.core.out.peer_endpoints.get(instance)
                    desk = self.core.rpc.desk(instance, service)  # its own socket, when it has one (core.rpc.desk)
                    if desk is not None and endpoint is not None:
                        endpoint, fallback = desk, endpoint
                if endpoint is None:
                    if sent:
                        call.avoid.add(instance)
                        continue
                    return None
                call.instance, call.idempotent = instance, offers[instance]
                sent = True
                outcome = self._attempt(state, call, instance, endpoint, fallback)
                if outcome is not None:
                    return outcome

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def close(self) -> None:
        """``Node.stop``: close every thread's sockets; a waiting call gives up within ``_SLICE_S``."""
        self.closed = True
        with self._lock:
            states, self._states = self._states, []
        for state in states:
            if state.lock.acquire(timeout=2 * _SLICE_S):
                try:
                    state.close()
                finally:
                    state.lock.release()

    # ------------------------------------------------------------------ internals
    def _state(self) -> _ThreadSockets:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadSockets(threading.current_thread())
            with self._lock:
                ended = [s for s in self._states if s.thread() is None or not s.thread().is_alive()]
                for old in ended:
                    old.close()  # its thread is gone: nobody else uses them
                self._states = [s for s in self._states if s not in ended] + [state]
        return state

    def _outstanding(self) -> dict[str, int]:
        ours = dict(self.outstanding)
        for node_id, count in list(self.core.rpc.outstanding.items()):
            ours[node_id] = ours.get(node_id, 0) + count
        return ours

    def _socket(self, state: _ThreadSockets, endpoint: str, desk: bool) -> zmq.Socket:
        sock = state.sockets.get(endpoint)
        if sock is None:
            if desk:
                self._forget_desks(state)
            sock = state.sockets[endpoint] = new_socket(self.context, zmq.DEALER, self.config.max_frame_bytes,
                                                        self.curve, endpoint)
            if desk:  # a send fails at once, rather than wait in a queue, while its desk is not connected
                sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(RCVTIMEO, _SLICE_MS)  # (_wait changes it only for a last, shorter slice)
            sock.connect(endpoint)
        return sock

    def _forget_desks(self, state: _ThreadSockets) -> None:
        """Close this thread's sockets to desks nobody advertises any more (a withdrawn service, a restarted
        node: each desk has a port of its own, and a socket to a closed one retries it for good)."""
        try:
            known = {endpoint for value in self.core.adverts.of(DESKS, include_suspect=True).values()
                     for endpoint in desks_of(value).values()}
        except RuntimeError:  # (a table changed under us: another time)
            return
        for endpoint in [endpoint for endpoint in state.sockets if endpoint not in known
                         and endpoint not in self.core.out.peer_endpoints.values() and not endpoint.startswith("inproc")]:
            state.sockets.pop(endpoint).close(0)

    def _attempt(self, state: _ThreadSockets, call: Call, instance: str, endpoint: str,
                 fallback: str | None) -> bytes | None:
        """One send and its wait: the reply, None to try again, or raises. ``fallback``: the node's
        ROUTER, when ``endpoint`` is a desk (a send to a desk not connected goes there instead)."""
        sock = self._socket(state, endpoint, fallback is not None)
        request_id = next(self._ids)
        now = self.now_s()
        body = {"service": call.service, "incarnation": self.core.incarnation,
                "timeout_ms": min(_MAX_TIMEOUT_MS, max(1, int((call.deadline_s - now) * 1000)))}
        call.attempts += 1
        self.counters["direct_requests" if call.attempts == 1 else "direct_retries"] += 1
        with self._lock:
            self.outstanding[instance] = self.outstanding.get(instance, 0) + 1
        try:
            frames = wire.encode(self.config.cluster, self.core.node_id, "rpc_request", request_id, body,
                                 (call.payload,))
            if not _sent(sock, frames):
                # not connected: a desk not yet (the first request after a connect) or not at all (a port a
                # firewall does not let through) goes to the node's ROUTER; a ROUTER (HWM with no peer) is
                # treated as refused, and another instance is tried
                if fallback is None or not _sent(sock := self._socket(state, fallback, False), frames):
                    call.avoid.add(instance)
                    return None
            return self._wait(sock, call, instance, request_id)
        finally:
            with self._lock:
                count = self.outstanding.get(instance, 0) - 1
                if count > 0:
                    self.outstanding[instance] = count
                else:
                    self.outstanding.pop(instance, None)

    def _wait(self, sock: zmq.Socket, call: Call, instance: str, request_id: int) -> bytes | None:
        cluster = self.config.cluster
        while True:
            remaining = call.deadline_s - self.now_s()
            if remaining <= 0:
                raise timed_out(call, instance)
            # a blocking receive bounded by RCVTIMEO (one slice, set when the socket is made, or what is
            # left): no poller built per wait
            last = remaining < _SLICE_S
            if last:
                sock.setsockopt(RCVTIMEO, int(remaining * 1000) + 1)
            try:
                frames = sock.recv_multipart()
            except zmq.Again:
                frames = None
            finally:
                if last:
                    sock.setsockopt(RCVTIMEO, _SLICE_MS)
            if frames is None:
                if self.closed:
                    raise NodeStoppedError("the node was stopped before the reply came; the request may or may "
                                           "not have run")
                if instance != self.core.node_id and self._silent(instance):
                    action, value = when_silent(call, instance)
                    if action == FAIL:
                        raise value
                    return None
                continue
            try:
                message = wire.decode(frames, cluster)
            except ProtocolError:
                continue  # dropped, as the runtime drops it
            if message.request_id != request_id:
                self.counters["direct_late_replies"] += 1
                continue
            action, value = when_answered(call, instance, message)
            if action == REPLY:
                self.counters["direct_replies"] += 1
                return value
            if action == RETRY:
                return None
            raise value

    def _silent(self, instance: str) -> bool:
        members = self.core.mesh.members
        member = members.get(instance) if members is not None else None
        return member is None or member.state != "alive"


def _sent(sock: zmq.Socket, frames: list) -> bool:
    """Send an ``rpc_request``'s two frames with plain-int flags, below pyzmq's ``send_multipart``
    (which builds enum flags per frame); False when the socket takes nothing (not connected)."""
    header, payload = frames
    try:
        raw_send(sock, header, NOBLOCK_MORE, True)
        raw_send(sock, payload, NOBLOCK, len(payload) < ZERO_COPY_BYTES)  # (never refused once the first went)
    except zmq.ZMQError:
        return False
    return True


__all__ = ["DirectRequester", "DIRECT_REQUEST_IDS"]
