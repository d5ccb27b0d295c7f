"""Synchronous produce from the caller's thread: the fast path of ``Node.produce``.

Theory of operation
-------------------
``Node.produce`` waits for one record's acknowledgement. Through the runtime thread that
costs the client two thread hand-offs (caller -> runtime to send, runtime -> caller to
complete) and the runtime's generic command handling: on a 2-vCPU machine about a quarter of
a replicated write's latency (docs/performance.md). When the record can go straight to a
remote leader, this module sends it from the calling thread instead, on that thread's own
DEALER socket, and waits for the answer there:

* **Each thread is its own idempotent producer**: a producer id and epoch of its own and its
  own sequence per partition. It shares no state with the runtime's producer, so it needs no
  lock, and the leader's ordinary duplicate and gap checks apply to it unchanged.
* **The request is the ordinary ``produce`` message**; the leader cannot tell the difference.
* **Retries re-send the same bytes** (same producer id, epoch and sequence, so the leader
  stores them at most once) to whichever node the metadata names as leader then: after a
  retriable error (``not_leader``, ``not_enough_replicas`` ...) or when the leader is seen
  silent (suspect or dead in this node's member table), the topic's metadata is refreshed
  through the runtime first. Without an answer the call waits at most ``request_timeout_s``
  per attempt and never past its own deadline.
* **A call that ends without an acknowledgement starts a new producer epoch** for the
  thread: leaders fence the old epoch, so a batch whose fate is unknown can never be stored
  behind later ones (as the runtime's producer does; KIP-360). When it ended on a timeout or
  another retriable error, the next call to the topic refreshes its metadata first.

``try_produce`` returns None — the record then goes through the runtime as before — when
nothing was sent and the fast path does not apply: ``acks=none``; the topic's metadata is not
known yet (the first produce to it, auto-creation); its leader is this node itself, unknown or
not connected; the batch would be large; or records of this node are still buffered or in
flight in the runtime's producer (a synchronous produce must not overtake them: one thread's
records keep their order in the log).

Sockets belong to their thread. ``close`` (from ``Node.stop``) closes the sockets of threads
that ended or are idle, and makes a thread still waiting give up within ``_SLICE_S`` with
``NodeStoppedError`` and close its own.
"""

from __future__ import annotations

import random
import threading
import time
import weakref
from typing import Any

import zmq

from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.client.producer import final_produce_error, produce_retriable
from meshq.core.events import GetMetadata
from meshq.core.hashing import partition_for_key
from meshq.core.records import RecordMetadata
from meshq.errors import (
    MeshqError,
    NodeStoppedError,
    NotLeaderError,
    ProtocolError,
    UsageError,
    error_from_code,
)
from meshq.io.runtime import new_socket

_SLICE_S = 0.05  # how often a waiting call looks at the leader's liveness and at close()
_RETRY_PAUSE_S = 0.05  # pause before a retry after an error answer (the cluster is changing)
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)


class _ThreadState:
    """One calling thread's producer identity and sockets (used only by that thread, and by
    ``close`` once it holds ``lock``)."""

    __slots__ = ("thread", "lock", "producer_id", "epoch", "sequences", "sockets", "request_id", "sticky",
                 "produced", "retries")

    def __init__(self, thread: threading.Thread, rng: random.Random) -> None:
        self.thread = weakref.ref(thread)
        self.lock = threading.Lock()
        self.producer_id = rng.getrandbits(62)
        self.epoch = 0
        self.sequences: dict[tuple[str, int], int] = {}
        self.sockets: dict[str, zmq.Socket] = {}
        self.request_id = 0
        self.sticky: dict[str, int] = {}
        self.produced = 0  # records acknowledged through this path
        self.retries = 0  # attempts after the first

    def new_epoch(self) -> None:
        self.epoch += 1
        self.sequences.clear()

    def close_sockets(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)
        self.sockets.clear()


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
        accumulator = self.node._accumulator
        if accumulator.buffers or accumulator.tracker.outstanding:
            return None  # earlier records of this node are not acknowledged yet: keep their order
        if topic in self._stale:
            # The last call to this topic ended without an answer: its leader may have moved.
            # Ask again first, as the runtime's producer drops its metadata after such a failure.
            self._stale.discard(topic)
            self._refresh(topic, self.now_s() + timeout_s)
        meta = self.core.metadata.get(topic)
        if meta is None:
            return None
        partitions = meta["config"].partitions
        state = self._state()
        if partition is None:
            if record[0] is not None:
                partition = partition_for_key(record[0], partitions)
            else:
                partition = state.sticky.get(topic)
                if partition is None:
                    partition = self.rng.randrange(partitions)
                state.sticky[topic] = (partition + 1) % partitions
        elif not 0 <= partition < partitions:
            raise UsageError(f"partition {partition} does not exist; {topic!r} has {partitions}")
        endpoint = self._leader_endpoint(topic, partition, first=True)
        if endpoint is None:
            return None
        key = (topic, partition)
        with state.lock:
            if self.closed:
                return None
            sequence = state.sequences.get(key, 0)
            data = batch_format.encode_batch([record], producer_id=state.producer_id, producer_epoch=state.epoch,
                                             base_sequence=sequence)
            if len(data) > self.config.batch_max_bytes:
                return None
            try:
                base_offset = self._send_until_answered(state, topic, partition, acks, data, endpoint,
                                                        self.now_s() + timeout_s)
            except BaseException as exc:
                state.new_epoch()  # its fate may be unknown: fence it (module docstring)
                if not isinstance(exc, MeshqError) or produce_retriable(exc):
                    self._stale.add(topic)
                if self.closed:
                    state.close_sockets()
                raise
            state.sequences[key] = sequence + 1
            state.produced += 1
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

    def _leader(self, topic: str, partition: int) -> str | None:
        """The node the client half's metadata names as the partition's leader, if any."""
        meta = self.core.metadata.get(topic)  # read-only lookups of the runtime's dicts (atomic under the GIL)
        if meta is None or partition >= len(meta["leaders"]):
            return None
        return meta["leaders"][partition]

    def _leader_endpoint(self, topic: str, partition: int, first: bool) -> str | None:
        """Where to send: the metadata's leader, if connected. On the first attempt the local
        node as leader means "use the runtime" (None); on a retry it is this node's own ROUTER."""
        leader = self._leader(topic, partition)
        if leader is None:
            return None
        if leader == self.core.node_id:
            return None if first else self.node.runtime.endpoint
        return self.core.peer_endpoints.get(leader)

    def _socket(self, state: _ThreadState, endpoint: str) -> zmq.Socket:
        sock = state.sockets.get(endpoint)
        if sock is None:
            sock = new_socket(self.context, zmq.DEALER, self.config.max_frame_bytes)
            sock.connect(endpoint)
            state.sockets[endpoint] = sock
        return sock

    def _leader_silent(self, topic: str, partition: int) -> bool:
        leader = self._leader(topic, partition)
        if leader is None:
            return True
        core = self.core
        if leader == core.node_id or core.members is None:
            return False
        member = core.members.get(leader)
        # (not in the member table yet: unknown is not silent; the runtime's producer waits too)
        return member is not None and member.state != "alive"

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

    def _send_until_answered(self, state: _ThreadState, topic: str, partition: int, acks: str, data: bytes,
                             endpoint: str | None, deadline: float) -> int:
        cluster, sender = self.config.cluster, self.core.node_id
        request_ids: set[int] = set()
        last_error: MeshqError | None = None
        while True:
            now = self.now_s()
            if now >= deadline:
                raise final_produce_error(topic, partition, len(request_ids), last_error)
            if endpoint is None:
                endpoint = self._leader_endpoint(topic, partition, first=False)
                if endpoint is None:
                    last_error = NotLeaderError(f"no known leader for {topic}/{partition}")
                    time.sleep(min(_RETRY_PAUSE_S, max(0.0, deadline - now)))
                    self._refresh(topic, deadline)
                    continue
            sock = self._socket(state, endpoint)
            state.request_id += 1
            request_ids.add(state.request_id)
            body = {"topic": topic, "partition": partition, "acks": acks,
                    "timeout_ms": max(1, int((deadline - now) * 1000))}
            try:
                sock.send_multipart(wire.encode(cluster, sender, "produce", state.request_id, body, (data,)),
                                    _NOBLOCK)
            except zmq.ZMQError as exc:  # not connected yet (HWM with no peer) or closing
                last_error = NotLeaderError(f"cannot send to the leader of {topic}/{partition} at {endpoint}: {exc}")
                endpoint = None
                time.sleep(min(_RETRY_PAUSE_S, max(0.0, deadline - now)))
                continue
            if len(request_ids) > 1:
                state.retries += 1
            answer = self._wait(sock, request_ids, topic, partition,
                                min(deadline, now + self.config.request_timeout_s))
            if type(answer) is int:
                return answer
            last_error = answer
            if answer is not None and not produce_retriable(answer):
                raise answer
            endpoint = None
            if answer is not None:
                time.sleep(min(_RETRY_PAUSE_S, max(0.0, deadline - self.now_s())))
            self._refresh(topic, deadline)

    def _wait(self, sock: zmq.Socket, request_ids: set[int], topic: str, partition: int,
              until: float) -> int | MeshqError | None:
        """The base offset an answer gives, the error it reports, or None: no answer by ``until``,
        or the leader went silent (retry elsewhere)."""
        cluster = self.config.cluster
        while True:
            remaining = until - self.now_s()
            if remaining <= 0:
                return None
            if not sock.poll(int(min(remaining, _SLICE_S) * 1000) + 1, _POLLIN):
                if self.closed:
                    raise NodeStoppedError("the node was stopped before the produce was acknowledged; "
                                           "it may or may not be stored")
                if self._leader_silent(topic, partition):
                    return NotLeaderError(f"the leader of {topic}/{partition} went silent; retrying elsewhere")
                continue
            try:
                message = wire.decode(sock.recv_multipart(_NOBLOCK), cluster)
            except ProtocolError:
                continue  # dropped, as the runtime drops it
            if message.request_id not in request_ids:
                continue  # a late answer to an earlier call
            if message.type == "produce_ok":
                return message.body["base_offset"]
            if message.type == "error":
                return error_from_code(message.body["code"], message.body["message"])
            return ProtocolError(f"unexpected answer {message.type!r} to a produce")


__all__ = ["DirectProducer"]
