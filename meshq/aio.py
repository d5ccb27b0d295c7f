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
* Starting and stopping the node (binding sockets, opening the data directory) are
  blocking and rare: they run in a worker thread (``asyncio.to_thread``), never on the loop.

mDNS discovery runs on the event loop itself with zeroconf's ``AsyncZeroconf``
(``meshq.io.aio_discovery``, pinned to the node's ``interfaces``): the same announcement and
filter as the threaded ``meshq.Node``'s, without a zeroconf thread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import zmq
import zmq.asyncio

from meshq import consumer as _consumer
from meshq import node as _sync
from meshq import pubsub as _pubsub
from meshq import shared as _shared
from meshq.config import TopicConfig
from meshq.core import wire
from meshq.core.client.direct import answer_of, leader_silent, silent_leader_error
from meshq.core.events import (
    AclChange,
    AclList,
    Command,
    GetMetadata,
    GetStatus,
    ServeService,
    UnserveService,
    WaitReady,
)
from meshq.core.records import Record, RecordMetadata
from meshq.errors import (
    MeshqError,
    NodeStoppedError,
    ProtocolError,
    SubscriptionClosedError,
    TimeoutError,
    UsageError,
)
from meshq.io.aio_discovery import AsyncDiscovery
from meshq.io.direct import _SLICE_S, DROPPED, EXCHANGE, REFRESH, SLEEP, DirectProducer, DropWatch, _ThreadState
from meshq.io.sockets import new_socket
from meshq.io.steps import drive_async

__all__ = ["Consumer", "Node", "Service", "SharedConsumer", "Subscription"]

DEFAULT_MAX_PENDING = _pubsub.DEFAULT_MAX_PENDING

_log = logging.getLogger("meshq.aio")


class Node:
    """A meshq node used from asyncio; the arguments are those of ``meshq.Node``.

    ``async with meshq.aio.Node(...) as node:`` starts it and stops it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sync = _sync.Node(*args, **kwargs)
        self._direct: _LoopProducer | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> Node:
        self.sync._mdns_on_loop = True  # discovery runs on this loop (AsyncZeroconf), not in zeroconf's thread
        await asyncio.to_thread(self.sync.start)
        if self.sync.config.mdns:
            discovery = AsyncDiscovery(*self.sync.discovery_args(), fingerprint=self.sync._key_fingerprint,
                                       loop=asyncio.get_running_loop())
            try:
                await discovery.async_start()
            except BaseException:
                await discovery.async_stop()
                await asyncio.to_thread(self.sync.stop)
                raise
            self.sync._discovery = discovery
        self._direct = _LoopProducer(self.sync)
        return self

    async def stop(self, timeout: float = 10.0) -> None:
        if self._direct is not None:
            self._direct.close()
        if isinstance(self.sync._discovery, AsyncDiscovery):
            await self.sync._discovery.async_stop()
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
    def _latency(self) -> Any:
        """The sync node's client-side latency histograms (None without ``metrics_port``)."""
        return self.sync._latency

    @property
    def has_left(self) -> bool:
        return self.sync.has_left

    # ------------------------------------------------------------------ calls the core answers
    async def _call(self, command: Command, timeout_s: float) -> Any:
        return await _call(self.sync, command, timeout_s)

    def _submit_raw(self, command: Command) -> Future:
        """Hand ``command`` to the runtime as the sync shells do (no deadline of its own)."""
        future: Future = Future()
        command.waiter = future
        self.sync.runtime.submit(command)
        return future

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

    async def acl_grant(self, name: str, permission: str, pattern: str, timeout: float = 10.0) -> bool:
        """See ``meshq.Node.acl_grant``."""
        return await self._call(AclChange("grant", name, permission, pattern), timeout)

    async def acl_revoke(self, name: str, permission: str, pattern: str, timeout: float = 10.0) -> bool:
        """See ``meshq.Node.acl_revoke``."""
        return await self._call(AclChange("revoke", name, permission, pattern), timeout)

    async def acl_list(self, timeout: float = 10.0) -> list[dict]:
        """See ``meshq.Node.acl_list``."""
        return await self._call(AclList(), timeout)

    async def topic(self, name: str, timeout: float = 10.0, create: bool = False) -> TopicConfig:
        meta = await self._call(GetMetadata(name, refresh=True, auto_create=create), timeout)
        return meta["config"]

    async def list_topics(self, timeout: float = 10.0) -> list[TopicConfig]:
        body = await self._call(GetMetadata(), timeout)
        return [TopicConfig.from_wire(t["config"]) for t in body["topics"]]

    async def status(self, timeout: float = 5.0, node_id: str | None = None) -> dict:
        """The cluster as ``meshq status --json`` shows it (see ``meshq.Node.status``)."""
        return await self._call(GetStatus(node_id or None), timeout)

    # ------------------------------------------------------------------ consume
    async def consumer(self, topic: str, group: str | None = None, start: Any = "earliest", mode: str = "stream",
                       auto_commit: bool = True, auto_commit_interval_s: float = 5.0,
                       max_bytes: int = 4 * 1024 * 1024, partitions: list[int] | None = None,
                       timeout: float = 10.0, **shared: Any) -> Consumer:
        """A stream consumer of ``topic`` (see ``meshq.Node.consumer``), its calls coroutines."""
        self.sync._require_started()
        if mode == "shared":
            if group is None:
                raise UsageError("mode='shared' needs a group")
            config = await self.topic(topic, timeout=timeout, create=True)
            return SharedConsumer(self.sync, topic, group, partitions=config.partitions, **shared)  # type: ignore[return-value]
        if mode != "stream" or shared:
            raise UsageError(f"mode must be 'stream' or 'shared' (its options only with 'shared'), not {mode!r}")
        consumer = Consumer(self, topic, group, start, auto_commit, auto_commit_interval_s, max_bytes, partitions)
        return await consumer._open(timeout)

    # ------------------------------------------------------------------ pub/sub
    def publish(self, subject: str, data: bytes, headers: dict[str, bytes] | None = None) -> None:
        """``meshq.Node.publish``: it never blocks (a slow subscriber drops), so a plain method."""
        self.sync.publish(subject, data, headers)

    async def subscribe(self, pattern: str, queue: str | None = None, max_pending: int = DEFAULT_MAX_PENDING,
                        timeout: float = 5.0) -> Subscription:
        """``meshq.Node.subscribe`` for asyncio: messages reach the subscription's asyncio.Queue
        from the runtime thread through ``call_soon_threadsafe``."""
        self.sync._require_started()
        shell = self.sync._pubsub
        assert shell is not None
        sub, command = shell.prepare_subscription(Subscription, pattern, queue, max_pending,
                                                  asyncio.get_running_loop())
        try:
            await self._call(command, timeout)
        except BaseException:
            shell.abandon_subscription(sub)
            raise
        return sub

    # ------------------------------------------------------------------ request/reply
    async def serve(self, service: str, handler: Any, concurrency: int = 1, idempotent: bool = False) -> Service:
        """Serve ``service`` from this node (see ``meshq.Node.serve``). A coroutine function handler
        runs on this event loop, dispatched to it straight from the runtime thread (no worker
        threads; the core keeps at most ``concurrency`` running); a plain function runs in the sync
        API's worker pool. Returns a handle; ``await handle.close()`` withdraws the service."""
        self.sync._check_serve(service, handler, concurrency)
        workers = self.sync._workers
        assert workers is not None
        loop = asyncio.get_running_loop() if inspect.iscoroutinefunction(handler) else None
        desk = workers.add(service, handler, concurrency, loop)
        try:
            await self._call(ServeService(service, bool(idempotent), concurrency, desk=desk), 10.0)
        except BaseException:
            workers.remove(service)
            raise
        return Service(self, service)

    async def unserve(self, service: str, timeout: float = 10.0) -> None:
        """Stop serving ``service`` here: requests queued here go to other instances, running ones finish."""
        self.sync._require_started()
        await self._call(UnserveService(service), timeout)
        assert self.sync._workers is not None
        self.sync._workers.remove(service)

    async def request(self, service: str, payload: bytes | str, timeout: float = 1.0) -> bytes:
        """Send ``payload`` to one live instance of ``service`` and return its reply (the errors of
        ``meshq.Node.request``); the runtime sends it, the reply's Future is awaited."""
        return await self._settled(self.sync.request_async(service, payload, timeout), timeout + 1.0,
                                   f"request to {service!r}")

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
        # The runtime thread scheduled every settled record's asyncio completion (call_soon_threadsafe)
        # before it counted the batch done; one more turn of the loop runs them before flush returns.
        await asyncio.sleep(0)

    @staticmethod
    async def _settled(future: Future, timeout_s: float, what: str) -> Any:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError as exc:
            # Since Python 3.11 asyncio.TimeoutError is the builtin one, which meshq.TimeoutError also is: an error
            # the operation itself raised (e.g. an rpc's "no reply ... may or may not have run") passes through
            # with its own message; only the wait running out is reported as this wait's.
            if isinstance(exc, MeshqError):
                raise
            raise TimeoutError(f"{what} did not complete within {timeout_s:.1f} s") from None


class Service:
    """The handle ``await node.serve(...)`` returns: ``await close()`` withdraws the service."""

    def __init__(self, node: Node, service: str) -> None:
        self.node = node
        self.service = service
        self.closed = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        sync = self.node.sync
        if sync._started and not sync._stopped and not sync.has_left:
            await self.node.unserve(self.service)

    async def __aenter__(self) -> Service:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _call(sync: _sync.Node, command: Command, timeout_s: float) -> Any:
    """``meshq.Node._call`` awaited: the command's Future, wrapped."""
    future = sync._submit(command, timeout_s)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s + 1.0)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{type(command).__name__} did not complete within {timeout_s + 1.0:.1f} s") from None


class SharedConsumer(_shared.SharedConsumer):
    """``meshq.shared.SharedConsumer`` on asyncio: the same state, commands and answers
    (``ack``/``nack`` return at once); ``poll``, ``flush_acks`` and ``close`` await the commands'
    wrapped Futures."""

    async def _wait_any(self, futures: list[Future], timeout: float) -> set[Future]:
        wrapped = {asyncio.wrap_future(f): f for f in futures}
        done, _ = await asyncio.wait(wrapped, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return {wrapped[w] for w in done}

    async def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Record]:  # type: ignore[override]
        self._require_open()
        deadline = time.monotonic() + timeout
        self._send_answers()
        while True:
            if self._state.buffer:
                return self._state.take(max_records)
            self._issue_fetches(max(0.0, deadline - time.monotonic()))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            waiting = list(self._fetches) + list(self._acks)
            if not waiting:
                await asyncio.sleep(min(remaining, 0.05))
                continue
            for future in await self._wait_any(waiting, remaining):
                if future in self._fetches:
                    self._on_fetched(future)
                else:
                    self._on_acked(future)

    def __aiter__(self) -> SharedConsumer:
        return self

    async def __anext__(self) -> Record:
        while not self._closed:
            records = await self.poll(max_records=1)
            if records:
                return records[0]
        raise StopAsyncIteration

    async def flush_acks(self, timeout: float = 10.0) -> None:  # type: ignore[override]
        self._send_answers()
        await self._wait_acks_async(timeout)

    async def _wait_acks_async(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._acks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(self._acks)} ack requests were not confirmed within {timeout} s")
            for future in await self._wait_any(list(self._acks), remaining):
                self._on_acked(future)
        if self._ack_errors:
            errors, self._ack_errors = self._ack_errors, []
            raise errors[0]

    async def close(self, timeout: float = 10.0) -> None:  # type: ignore[override]
        if self._closed:
            return
        self._closed = True
        self._state.release_all()
        self._send_answers()
        try:
            await self._wait_acks_async(timeout)
        except MeshqError as exc:
            _log.warning("closing the shared consumer of %s: %s", self.topic, exc)

    async def __aenter__(self) -> SharedConsumer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _LoopQueue:
    """What a subscription's ``_queue`` is for meshq.aio: ``put`` (from the runtime thread, or a
    publisher on this node) hands the item to an asyncio.Queue on the subscriber's loop."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop is closed: nobody reads this subscription any more


class Subscription(_pubsub.Subscription):
    """``meshq.Subscription`` read with ``await sub.recv(timeout)`` / ``async for msg in sub``."""

    __slots__ = ()

    def __init__(self, shell: Any, sub_id: int, pattern: str, queue: str | None, max_pending: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(shell, sub_id, pattern, queue, max_pending)
        self._queue = _LoopQueue(loop)  # type: ignore[assignment]

    async def recv(self, timeout: float | None = None) -> _pubsub.Message:  # type: ignore[override]
        """The next message; waits up to ``timeout`` seconds (None: forever). Raises
        ``meshq.TimeoutError`` when none came, ``SubscriptionClosedError`` once closed and drained."""
        if self._buffer:
            self._read += 1
            return self._buffer.popleft()
        try:
            item = await asyncio.wait_for(self._queue.queue.get(), timeout)  # type: ignore[attr-defined]
        except asyncio.TimeoutError:
            raise TimeoutError(f"no message on {self.pattern!r} within {timeout} s") from None
        return self._unpack(item)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> _pubsub.Message:
        try:
            return await self.recv()
        except SubscriptionClosedError:
            raise StopAsyncIteration from None

    async def close(self) -> None:  # type: ignore[override]
        """Withdraw the interest from the mesh; messages already queued can still be read. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            command = self._shell.unsubscribe_command(self)
            if command is not None:
                try:
                    await _call(self._shell.node, command, 5.0)
                except NodeStoppedError:
                    pass
        finally:
            self._queue.put(_pubsub._CLOSED)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


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
                        watch = state.watch(sock)
                        try:
                            await sock.send_multipart(step[2], zmq.NOBLOCK)
                        except zmq.ZMQError as exc:
                            result = exc
                        else:
                            result = await self._wait_async(sock, watch, step[3])
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

    async def _wait_async(self, sock: zmq.asyncio.Socket, watch: DropWatch, call: Any) -> Any:
        cluster = self.config.cluster
        while True:
            remaining = call.wait_until_s - self.now_s()
            if remaining <= 0:
                return None
            if not await sock.poll(int(min(remaining, _SLICE_S) * 1000) + 1, zmq.POLLIN):
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


class Consumer(_consumer.ConsumerFlow):
    """A stream consumer on asyncio (``await node.consumer(...)``): ``meshq.Consumer``'s control
    flow (``meshq.consumer.ConsumerFlow``, its steps) with each step awaited on the loop."""

    def __init__(self, node: Node, topic: str, group: str | None, start: Any, auto_commit: bool,
                 auto_commit_interval_s: float, max_bytes: int, partitions: list[int] | None) -> None:
        super().__init__(node, topic, group, start, auto_commit, auto_commit_interval_s, max_bytes)
        self._explicit = partitions

    async def _open(self, timeout: float) -> Consumer:
        config = await self.node.topic(self.topic, timeout=timeout, create=True)
        await self._run(self._open_steps(config.partitions, self._explicit, timeout))
        return self

    def _run(self, steps: Any) -> Any:
        return drive_async(steps, self._do)

    async def _do(self, step: Any) -> Any:
        if type(step) is _consumer.Wait:
            if not step.futures:
                await asyncio.sleep(step.timeout_s)
                return set()
            return (await asyncio.wait(step.futures, timeout=step.timeout_s,
                                       return_when=asyncio.FIRST_COMPLETED))[0]
        if type(step) is _consumer.Submit:
            return asyncio.wrap_future(self.node._submit_raw(step.command))
        return await self.node._call(step.command, step.timeout_s)

    async def seek(self, partition: int, offset: Any) -> None:
        """Move ``partition`` to ``offset`` (an int, 'earliest', 'latest', or a datetime)."""
        await self._run(self._seek_steps(partition, offset))

    async def assignment(self) -> list[int]:
        """The partitions this consumer reads now (a group member's change at each rebalance)."""
        if self._member is not None and not self._closed:
            await self._run(self._apply_group_steps())
        return list(self._state.partitions)

    async def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds for the first."""
        return await self._run(self._poll_steps(timeout, max_records))

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Record:
        """The next record; taken one at a time, so a commit stores exactly what was iterated."""
        while not self._closed:
            records = await self.poll(max_records=1)
            if records:
                return records[0]
        raise StopAsyncIteration

    async def commit(self, offsets: dict[int, int] | None = None, timeout: float = 10.0) -> None:
        """Store the group's position (default: one past each record returned by ``poll``)."""
        await self._run(self._commit_steps(offsets, timeout))

    async def committed(self, timeout: float = 10.0) -> dict[int, int]:
        """The group's committed offsets for this topic."""
        return await self._run(self._committed_steps(timeout))

    async def close(self) -> None:
        """Commit (with auto-commit), leave the group and stop. Idempotent."""
        await self._run(self._close_steps())

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
