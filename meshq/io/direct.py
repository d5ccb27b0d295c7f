"""Synchronous produce from the caller's thread: the I/O shell of ``Node.produce``'s fast path.

Theory of operation
-------------------
``Node.produce`` waits for one record's acknowledgement. Through the runtime thread that
costs the client two thread hand-offs (caller -> runtime to send, runtime -> caller to
complete) and the runtime's generic command handling: on a 2-vCPU machine about a quarter of
a replicated write's latency (docs/performance.md). When the record can go straight to a
remote leader, this module sends it from the calling thread instead, on that thread's own
DEALER socket, and waits for the answer there.

What is sent, when it is sent again and what the caller is told is decided by the pure
``meshq.core.client.direct`` (the simulator runs the same code): each thread is its own
idempotent producer (``ThreadProducer``: producer id, epoch, sequences, sticky partition),
and each call is a ``DirectCall`` that re-sends the same bytes after retriable errors or a
silent leader (after a metadata refresh), pauses after an error answer, gives up at its
deadline, and starts a new producer epoch when it ends without an acknowledgement (KIP-360).
This shell carries its decisions out: the thread's DEALER sockets (one per leader endpoint),
polling them in slices of ``_SLICE_S`` (looking at the leader's liveness in the member table
and at ``close()`` in between), ``time.sleep`` for the pauses, the metadata refresh through
the runtime (``GetMetadata``), the wall clock, and the topics whose next call refreshes first.

``try_produce`` returns None — the record then goes through the runtime as before — when
nothing was sent and the fast path does not apply: ``acks=none``; the topic's metadata is not
known yet (the first produce to it, auto-creation); its leader is this node itself, unknown or
not connected; the batch would be large; or records of this node are still buffered or in
flight in the runtime's producer (a synchronous produce must not overtake them: one thread's
records keep their order in the log).

**A dropped connection sends again.** Each DEALER has a monitor (``DropWatch``: libzmq's
``EVENT_DISCONNECTED``). libzmq drops a connection that heard nothing for
``HEARTBEAT_TIMEOUT_MS`` (a lossy link whose TCP retransmissions back off, a short cut) or that
the peer reset, and connects afresh — but a request it had already written, or the answer the
leader sends back on the old connection, is gone with it, and nothing would send it again: the
call used to wait for its whole deadline (seconds after the link healed; the leader is still
alive in the member table, so the liveness check does not end the wait). So a wait that sees its
connection drop ends at once as ``unsent`` (``meshq.core.client.direct``): after
``RETRY_PAUSE_S`` the same bytes go again, to whichever node the metadata names, queued in the
DEALER until its new connection is up. No metadata refresh: the leader is not known to be gone,
and the refresh's own request could be lost the same way. Resending is safe: same producer id,
epoch and sequence, so the leader stores the batch once, and an answer to any attempt counts.
The watch is read only when a wait passes ``_SLICE_S`` without an answer, never on the fast
path (reading it before every send cost a synchronous produce about 14 µs of CPU). So a drop
left over from earlier traffic (an idle connection that dropped and came back) can make one
slow call send again needlessly: at most once per drop, and harmless, for the reasons above.

Sockets belong to their thread. ``close`` (from ``Node.stop``) closes the sockets of threads
that ended or are idle, and makes a thread still waiting give up within ``_SLICE_S`` with
``NodeStoppedError`` and close its own.
"""

from __future__ import annotations

import random
import threading
import time
import weakref
from collections.abc import Generator
from typing import Any

import zmq

from meshq.core import wire
from meshq.core.client.direct import (
    LIVENESS_CHECK_S,
    PAUSING,
    REFRESHING,
    DirectCall,
    ThreadProducer,
    answer_of,
    leader_silent,
    silent_leader_error,
)
from meshq.core.events import GetMetadata
from meshq.core.records import RecordMetadata
from meshq.errors import MeshqError, NodeStoppedError, NotLeaderError, ProtocolError
from meshq.io.dropwatch import DropWatch
from meshq.io.sockets import HEARTBEAT_TIMEOUT_MS, NOBLOCK, POLLIN, new_socket

_SLICE_S = LIVENESS_CHECK_S  # how often a waiting call looks at the leader's liveness and at close()
# the I/O steps of a produce (``DirectProducer.produce_steps``)
SLEEP = "sleep"
REFRESH = "refresh"
EXCHANGE = "exchange"
# What a wait answers when the connection its attempt went out on dropped (module docstring).
DROPPED = "dropped"


class _ThreadState(ThreadProducer):
    """One calling thread's producer and its sockets (used only by that thread, and by
    ``close`` once it holds ``lock``)."""

    __slots__ = ("thread", "lock", "sockets", "watches")

    def __init__(self, thread: threading.Thread, rng: random.Random) -> None:
        super().__init__(rng)
        self.thread = weakref.ref(thread)
        self.lock = threading.Lock()
        self.sockets: dict[str, zmq.Socket] = {}
        self.watches: dict[zmq.Socket, DropWatch] = {}  # each DEALER's drop monitor

    def close_sockets(self) -> None:
        for watch in self.watches.values():  # each watch before its DEALER (meshq.io.dropwatch)
            watch.close()
        self.watches.clear()
        for sock in self.sockets.values():
            sock.close(0)
        self.sockets.clear()

    def watch(self, sock: zmq.Socket) -> DropWatch:
        """The drop monitor of ``sock``, one of this state's DEALERs (made on first use)."""
        watch = self.watches.get(sock)
        if watch is None:
            watch = self.watches[sock] = DropWatch(sock)
        return watch


class DirectProducer:
    """See the module docstring. ``node`` is the ``meshq.Node`` facade it serves."""

    def __init__(self, node: Any, context: zmq.Context, rng: random.Random) -> None:
        self.node = node
        self.core = node.core
        self.config = node.core.config
        self.now_s = node.clock.now_s
        self.context = context
        self.rng = rng
        self.closed = False
        self._local = threading.local()
        self._states: list[_ThreadState] = []
        self._states_lock = threading.Lock()
        self._ended_counts = [0, 0]  # produced / retries of the threads whose state was dropped
        self._stale: set[str] = set()  # topics whose metadata is refreshed before the next call

    # ------------------------------------------------------------------ public
    def try_produce(self, topic: str, record: tuple, partition: int | None, acks: str,
                    timeout_s: float) -> RecordMetadata | None:
        """Produce ``record`` from this thread and wait for its acknowledgement; None when the
        fast path does not apply and nothing was sent (module docstring)."""
        if acks == "none" or self.closed:
            return None
        state = self._state()
        with state.lock:
            return self._run(state, self.produce_steps(state, topic, record, partition, acks, timeout_s))

    def produce_steps(self, state: ThreadProducer, topic: str, record: tuple, partition: int | None, acks: str,
                      timeout_s: float) -> Generator[tuple, Any, RecordMetadata | None]:
        """One produce as a sequence of I/O steps the caller carries out and answers (``SLEEP``,
        ``REFRESH``, ``EXCHANGE``: see ``_run``), so the blocking shell here and the asyncio one
        (``meshq.aio``) run the very same decisions. Returns the record's metadata, or None when
        the fast path does not apply and nothing was sent."""
        if acks == "none" or self.closed:
            return None
        accumulator = self.node._accumulator
        if accumulator.buffers or accumulator.tracker.outstanding:
            return None  # earlier records of this node are not acknowledged yet: keep their order
        if topic in self._stale:
            # The last call to this topic ended without an answer: its leader may have moved.
            # Ask again first, as the runtime's producer drops its metadata after such a failure.
            self._stale.discard(topic)
            yield (REFRESH, topic, self.now_s() + timeout_s)
        meta = self.core.metadata.get(topic)
        if meta is None:
            return None
        partition = state.partition_for(topic, record[0], partition, meta["config"].partitions)
        endpoint = self._leader_endpoint(topic, partition, first=True)
        if endpoint is None or self.closed:
            return None
        call = state.start(topic, partition, record, acks, self.now_s() + timeout_s,
                           self.config.request_timeout_s, self.config.batch_max_bytes)
        if call is None:
            return None
        try:
            base_offset = yield from self._call_steps(call, endpoint)
        except BaseException as exc:
            if call.fail(exc):  # a new epoch fences it; its leader may have moved
                self._stale.add(topic)
            raise
        return RecordMetadata(topic, partition, base_offset, record[3])

    def stats(self) -> dict[str, int]:
        """Records acknowledged through this path, and retried attempts, over all threads."""
        with self._states_lock:
            produced, retries = self._ended_counts
            for state in self._states:
                produced += state.produced
                retries += state.retries
        return {"direct_produces": produced, "direct_retries": retries}

    def close(self) -> None:
        """Close every thread's sockets (``Node.stop``); a waiting call gives up by itself."""
        self.closed = True
        with self._states_lock:
            states, self._states = self._states, []
        for state in states:
            if state.lock.acquire(timeout=2 * _SLICE_S):
                try:
                    state.close_sockets()
                finally:
                    state.lock.release()

    # ------------------------------------------------------------------ internals
    def _state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadState(threading.current_thread(), self.rng)
            with self._states_lock:
                ended = [s for s in self._states if s.thread() is None or not s.thread().is_alive()]
                for old in ended:
                    old.close_sockets()  # its thread is gone: nobody else uses them
                    self._ended_counts[0] += old.produced
                    self._ended_counts[1] += old.retries
                self._states = [s for s in self._states if s not in ended]
                self._states.append(state)
        return state

    def _leader_endpoint(self, topic: str, partition: int, first: bool) -> str | None:
        """Where to send: the metadata's leader, if connected. On the first attempt the local
        node as leader means "use the runtime" (None); on a retry it is this node's own ROUTER."""
        leader = self.core.client.leader_of(topic, partition)  # read-only lookups of the runtime's dicts
        if leader is None:
            return None
        if leader == self.core.node_id:
            return None if first else self.node.runtime.endpoint
        return self.core.peer_endpoints.get(leader)

    def _socket(self, state: _ThreadState, endpoint: str) -> zmq.Socket:
        sock = state.sockets.get(endpoint)
        if sock is None:
            sock = new_socket(self.context, zmq.DEALER, self.config.max_frame_bytes, self.node.runtime.curve, endpoint)
            sock.connect(endpoint)
            state.sockets[endpoint] = sock
        return sock

    def _refresh(self, topic: str, deadline: float) -> None:
        """Ask the runtime for fresh metadata (it also connects to the leaders it names)."""
        remaining = deadline - self.now_s()
        if remaining <= 0:
            return
        try:
            self.node._call(GetMetadata(topic, refresh=True, auto_create=False), remaining)
        except NodeStoppedError:
            raise
        except MeshqError:
            pass  # the next attempt reports what is wrong, or the deadline does

    def _call_steps(self, call: DirectCall, endpoint: str | None) -> Generator[tuple, Any, int]:
        """Carry out ``call``'s decisions until it is acknowledged (its base offset) or raises."""
        cluster, sender = self.config.cluster, self.core.node_id
        while True:
            now = self.now_s()
            call.check_deadline(now)
            if call.state == PAUSING:
                yield (SLEEP, max(0.0, call.pause_until_s - now))
                call.resume()
                continue
            if call.state == REFRESHING:
                yield (REFRESH, call.topic, call.deadline_s)
                call.refreshed()
                continue
            if endpoint is None:
                endpoint = self._leader_endpoint(call.topic, call.partition, first=False)
                if endpoint is None:
                    call.no_leader(now)
                    continue
            request_id, body = call.attempt(now)
            frames = wire.encode(cluster, sender, "produce", request_id, body, (call.data,))
            answer = yield (EXCHANGE, endpoint, frames, call)
            if isinstance(answer, zmq.ZMQError):  # not connected yet (HWM with no peer) or closing
                call.unsent(NotLeaderError(f"cannot send to the leader of {call.topic}/{call.partition} at "
                                           f"{endpoint}: {answer}"), now)
                endpoint = None
                continue
            if answer is DROPPED:  # the request or its answer went with the connection: send again
                call.unsent(NotLeaderError(
                    f"the connection to the leader of {call.topic}/{call.partition} at {endpoint} dropped while "
                    f"waiting for its answer (silent for {HEARTBEAT_TIMEOUT_MS} ms, or reset)"), self.now_s())
                endpoint = None
                continue
            base_offset = call.answered(answer, self.now_s())
            if base_offset is not None:
                return base_offset
            endpoint = None

    def _run(self, state: _ThreadState, steps: Generator[tuple, Any, Any]) -> Any:
        """Carry out ``steps`` with blocking I/O on this thread: ``(SLEEP, seconds)``,
        ``(REFRESH, topic, deadline)`` (fresh metadata through the runtime), ``(EXCHANGE,
        endpoint, frames, call)`` (send on this thread's DEALER, then the answer ``_wait`` gives,
        or the ``zmq.ZMQError`` that kept it from being sent)."""
        try:
            step = next(steps)
            while True:
                try:
                    kind = step[0]
                    if kind == SLEEP:
                        time.sleep(step[1])
                        result: Any = None
                    elif kind == REFRESH:
                        self._refresh(step[1], step[2])
                        result = None
                    else:
                        sock = self._socket(state, step[1])
                        watch = state.watch(sock)
                        try:
                            sock.send_multipart(step[2], NOBLOCK)
                        except zmq.ZMQError as exc:
                            result = exc
                        else:
                            result = self._wait(sock, watch, step[3])
                except BaseException as exc:
                    step = steps.throw(exc)
                    continue
                step = steps.send(result)
        except StopIteration as stop:
            return stop.value
        except BaseException:
            if self.closed:
                state.close_sockets()
            raise

    def _wait(self, sock: zmq.Socket, watch: DropWatch, call: DirectCall) -> int | MeshqError | str | None:
        """The base offset an answer gives, the error it reports, ``DROPPED`` (the connection
        dropped: send again), or None: no answer by the attempt's ``wait_until_s`` (or the leader
        went silent: an error, retry elsewhere)."""
        cluster = self.config.cluster
        while True:
            remaining = call.wait_until_s - self.now_s()
            if remaining <= 0:
                return None
            if not sock.poll(int(min(remaining, _SLICE_S) * 1000) + 1, POLLIN):
                if self.closed:
                    raise NodeStoppedError("the node was stopped before the produce was acknowledged; "
                                           "it may or may not be stored")
                if watch.dropped():
                    return DROPPED
                leader = self.core.client.leader_of(call.topic, call.partition)
                if leader_silent(leader, self.core.node_id, self.core.members):
                    return silent_leader_error(call.topic, call.partition)
                continue
            try:
                message = wire.decode(sock.recv_multipart(NOBLOCK), cluster)
            except ProtocolError:
                continue  # dropped, as the runtime drops it
            if call.expects(message.request_id):
                return answer_of(message)
            # else: a late answer to an earlier call


__all__ = ["DirectProducer", "DropWatch"]
