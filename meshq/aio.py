"""meshq on asyncio: the same node, its calls as coroutines.

Theory of operation
-------------------
A node's protocol engine is the sans-I/O ``NodeCore``, driven by its runtime thread
(``meshq.io.runtime``): that thread owns the node's sockets, timers and disk, whether the
node is used from threads or from asyncio. ``meshq.aio.Node`` builds that node
(``meshq.Node``) and turns each call into a coroutine without blocking the event loop and
without a thread pool:

* A call the core answers (create a topic, metadata, status, a fetch, a commit) is handed to
  the runtime as a typed command whose waiter is a ``concurrent.futures.Future``; the
  coroutine awaits it through ``asyncio.wrap_future`` (the runtime thread completes it, the
  loop is woken by ``call_soon_threadsafe``).
* ``produce`` to a remote leader goes out on the event loop itself, on its own asyncio
  DEALER socket (pyzmq's ``zmq.asyncio``), exactly as ``meshq.io.direct`` sends from a
  calling thread: the same decisions (``DirectProducer.produce_steps``: sequences, retries,
  refreshes, epochs, from the pure ``meshq.core.client.direct``) carried out with ``await``.
  One such produce is in flight per event loop at a time (a producer's sequence numbers are
  one stream); a produce started while another is waiting, or one the fast path does not
  take (the leader is this node, the topic is new, acks="none"), goes through the runtime's
  batching producer and is awaited like any other command — concurrent produces batch.
* Starting and stopping the node (binding sockets, opening the data directory, mDNS) are
  blocking and rare: they run in a worker thread (``asyncio.to_thread``), never on the loop.

mDNS discovery is the node's own (python-zeroconf on the runtime side, pinned to the node's
``interfaces``); ``meshq.aio`` adds no second browser.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import zmq
import zmq.asyncio

from meshq import node as _sync
from meshq.config import TopicConfig
from meshq.core import wire
from meshq.core.client.direct import answer_of, leader_silent, silent_leader_error
from meshq.core.events import Command, GetMetadata, GetStatus, WaitReady
from meshq.core.records import RecordMetadata
from meshq.errors import MeshqError, NodeStoppedError, ProtocolError, TimeoutError
from meshq.io.direct import _SLICE_S, EXCHANGE, REFRESH, SLEEP, DirectProducer, _ThreadState
from meshq.io.runtime import new_socket

__all__ = ["Node"]


class Node:
    """A meshq node used from asyncio; the arguments are those of ``meshq.Node``.

    ``async with meshq.aio.Node(...) as node:`` starts it and stops it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sync = _sync.Node(*args, **kwargs)
        self._direct: _LoopProducer | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> Node:
        await asyncio.to_thread(self.sync.start)
        self._direct = _LoopProducer(self.sync)
        return self

    async def stop(self, timeout: float = 10.0) -> None:
        if self._direct is not None:
            self._direct.close()
        await asyncio.to_thread(self.sync.stop, timeout)

    async def __aenter__(self) -> Node:
        if not self.sync._started:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def node_id(self) -> str:
        return self.sync.node_id

    @property
    def address(self) -> str:
        return self.sync.address

    @property
    def has_left(self) -> bool:
        return self.sync.has_left

    # ------------------------------------------------------------------ calls the core answers
    async def _call(self, command: Command, timeout_s: float) -> Any:
        future = self.sync._submit(command, timeout_s)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s + 1.0)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{type(command).__name__} did not complete within {timeout_s + 1.0:.1f} s") from None

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Until a storage node (maybe this one) can take requests."""
        await self._call(WaitReady(), timeout)

    async def wait_for_members(self, count: int, timeout: float = 10.0) -> list[dict]:
        """Until ``count`` storage members are alive; returns them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        members: list[dict] = []
        while True:
            try:
                status = await self.status(timeout=max(0.1, min(2.0, deadline - loop.time())))
                members = _sync.live_storage_members(status)
            except MeshqError as exc:
                if not exc.retriable:
                    raise
            if len(members) >= count:
                return members
            if loop.time() >= deadline:
                raise TimeoutError(f"only {len(members)} of {count} storage members appeared within {timeout} s")
            await asyncio.sleep(0.05)

    async def create_topic(self, name: str, partitions: int | None = None, replication_factor: int | None = None,
                           retention_bytes: int | None = None, retention_ms: int | None = 7 * 24 * 3600 * 1000,
                           cleanup_policy: str = "delete", if_not_exists: bool = True,
                           timeout: float = 10.0) -> TopicConfig:
        """Create a topic (or return the existing one when ``if_not_exists``)."""
        command = self.sync._create_topic_command(name, partitions, replication_factor, retention_bytes,
                                                  retention_ms, cleanup_policy, if_not_exists)
        return await self._call(command, timeout)

    async def topic(self, name: str, timeout: float = 10.0, create: bool = False) -> TopicConfig:
        meta = await self._call(GetMetadata(name, refresh=True, auto_create=create), timeout)
        return meta["config"]

    async def list_topics(self, timeout: float = 10.0) -> list[TopicConfig]:
        body = await self._call(GetMetadata(), timeout)
        return [TopicConfig.from_wire(t["config"]) for t in body["topics"]]

    async def status(self, timeout: float = 5.0, node_id: str | None = None) -> dict:
        """The cluster as ``meshq status --json`` shows it (see ``meshq.Node.status``)."""
        return await self._call(GetStatus(node_id or None), timeout)

    # ------------------------------------------------------------------ produce
    async def produce(self, topic: str, value: bytes, key: bytes | None = None,
                      headers: dict[str, bytes] | None = None, acks: str = "quorum", timeout: float = 5.0,
                      partition: int | None = None, timestamp_ms: int | None = None) -> RecordMetadata:
        """Produce one record; returns once it is acknowledged at ``acks``."""
        record = self.sync._record(value, key, headers, acks, timestamp_ms)
        if self._direct is not None:
            metadata = await self._direct.try_produce(topic, record, partition, acks, timeout)
            if metadata is not None:
                return metadata
        accumulator = self.sync._accumulator
        assert accumulator is not None
        future = accumulator.append(topic, record, partition, acks, timeout, True)
        return await self._settled(future, timeout + 0.5, "produce")

    def produce_async(self, topic: str, value: bytes, key: bytes | None = None,
                      headers: dict[str, bytes] | None = None, acks: str = "quorum", timeout: float = 30.0,
                      partition: int | None = None, timestamp_ms: int | None = None) -> asyncio.Future:
        """Queue one record (batched with others); await the returned future for its RecordMetadata."""
        return asyncio.wrap_future(self.sync.produce_async(topic, value, key, headers, acks, timeout, partition,
                                                           timestamp_ms))

    async def produce_batch(self, topic: str, values: Sequence[bytes], keys: Sequence[bytes | None] | None = None,
                            acks: str = "quorum", timeout: float = 30.0, partition: int | None = None,
                            headers: dict[str, bytes] | None = None) -> Sequence[RecordMetadata]:
        """Produce many records in one call; RecordMetadata in input order."""
        future = self.sync.produce_batch(topic, values, keys, acks, timeout, partition, headers)
        return await self._settled(future, timeout + 0.5, "produce_batch")

    async def flush(self, timeout: float | None = None) -> None:
        """Send everything buffered and wait until every produce so far has completed."""
        self.sync._require_started()
        accumulator = self.sync._accumulator
        assert accumulator is not None
        accumulator.flush_all()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while accumulator.tracker.outstanding:
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"flush did not complete within {timeout} s")
            await asyncio.sleep(0.001)

    @staticmethod
    async def _settled(future: Future, timeout_s: float, what: str) -> Any:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{what} did not complete within {timeout_s:.1f} s") from None


class _LoopState(_ThreadState):
    """A loop's producer state: a thread's, plus whether one of its produces is in flight."""

    __slots__ = ("busy",)

    def __init__(self, thread: threading.Thread, rng: random.Random) -> None:
        super().__init__(thread, rng)
        self.busy = False


class _LoopProducer(DirectProducer):
    """``meshq.io.direct.DirectProducer`` carried out on the event loop: one producer state per
    loop, its asyncio DEALER sockets, ``await`` where the thread version blocks."""

    def __init__(self, node: Any) -> None:
        super().__init__(node, node.runtime.context, random.Random())
        self._async_context = zmq.asyncio.Context.shadow(node.runtime.context)
        self._loop_states: dict[asyncio.AbstractEventLoop, Any] = {}

    async def try_produce(self, topic: str, record: tuple, partition: int | None, acks: str,  # type: ignore[override]
                          timeout_s: float) -> RecordMetadata | None:
        if acks == "none" or self.closed:
            return None
        state = self._loop_state()
        if state.busy:
            return None  # one sequence stream per loop: a concurrent produce goes through the runtime
        state.busy = True
        try:
            return await self._run_async(state, self.produce_steps(state, topic, record, partition, acks, timeout_s))
        finally:
            state.busy = False

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loop_states.get(loop)
        if state is None:
            state = self._loop_states[loop] = _LoopState(threading.current_thread(), self.rng)
        return state

    async def _run_async(self, state: Any, steps: Any) -> Any:
        try:
            step = next(steps)
            while True:
                try:
                    kind = step[0]
                    if kind == SLEEP:
                        await asyncio.sleep(step[1])
                        result: Any = None
                    elif kind == REFRESH:
                        remaining = step[2] - self.now_s()
                        if remaining > 0:
                            try:
                                await asyncio.wrap_future(self.node._submit(
                                    GetMetadata(step[1], refresh=True, auto_create=False), remaining))
                            except NodeStoppedError:
                                raise
                            except MeshqError:
                                pass  # the next attempt reports what is wrong, or the deadline does
                        result = None
                    else:
                        assert kind == EXCHANGE
                        sock = self._async_socket(state, step[1])
                        try:
                            await sock.send_multipart(step[2], zmq.NOBLOCK)
                        except zmq.ZMQError as exc:
                            result = exc
                        else:
                            result = await self._wait_async(sock, step[3])
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

    def _async_socket(self, state: Any, endpoint: str) -> zmq.asyncio.Socket:
        sock = state.sockets.get(endpoint)
        if sock is None:
            sock = new_socket(self._async_context, zmq.DEALER, self.config.max_frame_bytes, self.node.runtime.curve,
                              endpoint)
            sock.connect(endpoint)
            state.sockets[endpoint] = sock
        return sock

    async def _wait_async(self, sock: zmq.asyncio.Socket, call: Any) -> Any:
        cluster = self.config.cluster
        while True:
            remaining = call.wait_until_s - self.now_s()
            if remaining <= 0:
                return None
            if not await sock.poll(int(min(remaining, _SLICE_S) * 1000) + 1, zmq.POLLIN):
                if self.closed:
                    raise NodeStoppedError("the node was stopped before the produce was acknowledged; "
                                           "it may or may not be stored")
                leader = self.core.client.leader_of(call.topic, call.partition)
                if leader_silent(leader, self.core.node_id, self.core.members):
                    return silent_leader_error(call.topic, call.partition)
                continue
            try:
                message = wire.decode(await sock.recv_multipart(), cluster)
            except ProtocolError:
                continue
            if call.expects(message.request_id):
                return answer_of(message)

    def stats(self) -> dict[str, int]:
        """Records acknowledged through the loop's own sockets, and retried attempts."""
        produced, retries = self._ended_counts
        for state in self._loop_states.values():
            produced += state.produced
            retries += state.retries
        return {"direct_produces": produced, "direct_retries": retries}

    def close(self) -> None:
        self.closed = True
        for state in self._loop_states.values():
            if not state.busy:
                state.close_sockets()
        self._loop_states.clear()
