"""Producer front end: batching in the caller's thread, completion in the runtime thread.

``produce_async`` appends to an open per-(topic, partition, acks) buffer under a lock; a
buffer is handed to the runtime as one ``ProduceCommand`` when it is full, when its
``linger_s`` expires, on ``flush()``, or when a synchronous ``produce`` follows it (so the
order of records from one thread is the order in the log). Completion is per batch: the
runtime calls ``settle`` once per stored batch with the indexes it covers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from typing import Any

from meshq.core.events import ProduceCommand
from meshq.core.records import RecordMetadata
from meshq.errors import MeshqError

_SETTLED = (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED)
_CANCELLED = (CANCELLED, CANCELLED_AND_NOTIFIED)


class _Tracker:
    """Counts commands not yet settled, so ``flush()`` can wait for all of them."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.outstanding = 0

    def add(self) -> None:
        with self.condition:
            self.outstanding += 1

    def done(self) -> None:
        with self.condition:
            self.outstanding -= 1
            if self.outstanding == 0:
                self.condition.notify_all()

    def wait_idle(self, timeout_s: float | None) -> bool:
        with self.condition:
            return self.condition.wait_for(lambda: self.outstanding == 0, timeout_s)


class RecordFuture(Future):
    """The ``Future`` of one ``produce_async`` record: a real ``concurrent.futures.Future``, built cheaply.

    A plain ``Future()`` costs a ``threading.Condition`` (and its ``RLock``) per record, which was
    most of ``produce_async``'s time. Here the records of one open buffer are settled together
    under the buffer's ``Condition`` (``_buffer.condition``: state changes, and the wake-up of
    ``result()`` / ``exception()``, which wait on it in a loop on their own state); the state,
    result and exception start as plain slots, and the ``RecordMetadata`` is built on first
    ``result()`` from the stored batch's base offset.

    What ``Future``'s own machinery locks — ``_condition``, taken by ``concurrent.futures.wait``,
    ``as_completed``, ``add_done_callback``, ``cancel`` — is a condition of the record's own, made
    on first use (under the buffer's condition). Never one lock for many futures there:
    ``concurrent.futures.wait`` locks futures in id order, and a lock shared by several futures
    sits at several places in that order, so two threads waiting on overlapping sets could
    deadlock (and with them the runtime thread settling the buffer). A record that has its own
    condition changes state only under it (then under the buffer's, for ``result()``), and its
    waiters are told in the same critical section: ``wait`` reads the state and installs its
    waiter under that condition, so it can never both see the record done and be told again.
    Lock order: a record's own condition, then the buffer's; nothing is taken while the buffer's
    is held.
    """

    # Slots, not the instance dict: settling writes three attributes per record, and on a
    # dict-backed instance that materialises a dict per record (3.5 x slower, and GC churn).
    # _segment: (timestamps, topic, partition, base_offset) of the stored batch, set when settled.
    __slots__ = ("_own", "_buffer", "_state", "_result", "_exception", "_segment", "_position")

    def __init__(self, buffer: _OpenBuffer) -> None:  # no super().__init__(): see the class docstring
        self._own: threading.Condition | None = None
        self._buffer = buffer
        self._state = PENDING
        self._result = None
        self._exception = None

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        own = self._own
        if own is None:
            buffer = self._buffer
            with buffer.condition:  # (settling decides under it whether a record has one)
                own = self._own
                if own is None:
                    self.__dict__["_waiter_list"] = []
                    self.__dict__["_callback_list"] = []
                    own = self._own = threading.Condition()  # settled from now on under ``own`` too
        return own

    @property
    def _waiters(self) -> list:  # type: ignore[override]
        self._condition  # noqa: B018 (made with its lists)
        return self.__dict__["_waiter_list"]

    @property
    def _done_callbacks(self) -> list:  # type: ignore[override]
        self._condition  # noqa: B018
        return self.__dict__["_callback_list"]

    def _settled(self) -> bool:
        return self._state in _SETTLED

    def _wait_settled(self, timeout: float | None) -> None:
        if self._state not in _SETTLED:
            condition = self._buffer.condition
            with condition:
                if not condition.wait_for(self._settled, timeout):
                    raise FutureTimeoutError()
        if self._state in _CANCELLED:
            raise CancelledError()

    def done(self) -> bool:
        return self._state in _SETTLED

    def cancel(self) -> bool:
        own = self._condition  # (state changes of a record with its own condition happen under it)
        with own:
            with self._buffer.condition:
                if self._state not in (PENDING, CANCELLED, CANCELLED_AND_NOTIFIED):
                    return False
                if self._state is not PENDING:
                    return True
                self._state = CANCELLED
                self._buffer.condition.notify_all()
            own.notify_all()
        self._invoke_callbacks()
        return True

    def result(self, timeout: float | None = None) -> Any:
        self._wait_settled(timeout)
        if self._exception is not None:
            raise self._exception
        if self._result is None:
            timestamps, topic, partition, base_offset = self._segment  # type: ignore[misc]
            j = self._position
            self._result = RecordMetadata(topic, partition, base_offset + j if base_offset >= 0 else -1,
                                          timestamps[j])
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait_settled(timeout)
        return self._exception

    def __repr__(self) -> str:
        if self._state is FINISHED and self._exception is None:
            self.result(0)
        return super().__repr__()


class FutureListWaiter:
    """The per-record futures of one open buffer (``produce_async``), settled a stored batch at a time."""

    __slots__ = ("buffer", "remaining", "tracker", "latency", "started_s")

    def __init__(self, buffer: _OpenBuffer, tracker: _Tracker, latency: Any = None) -> None:
        self.buffer = buffer
        self.remaining = len(buffer.futures)
        self.tracker = tracker
        self.latency = latency  # a prometheus Histogram child when the node serves metrics
        self.started_s = time.monotonic() if latency is not None else 0.0

    def settle(self, indexes: Sequence[int], records: list, topic: str, partition: int, base_offset: int,
               error: MeshqError | None) -> None:
        buffer = self.buffer
        futures = buffer.futures
        condition = buffer.condition
        watched = []  # records with a condition of their own: settled under it, below
        segment = None if error is not None else ([record[3] for record in records], topic, partition, base_offset)
        # (timestamps, not the records: a kept future must not keep the record values alive)
        with condition:
            for j, i in enumerate(indexes):
                future = futures[i]
                if future._own is not None:
                    watched.append((future, j))
                elif future._state is PENDING:
                    if segment is None:
                        future._exception = error
                    else:
                        future._segment = segment
                        future._position = j
                    future._state = FINISHED
            condition.notify_all()
        for future, j in watched:  # someone waits through concurrent.futures.wait / as_completed, or a callback
            own = future._own
            with own:
                with condition:
                    if future._state is not PENDING:  # (cancelled meanwhile)
                        continue
                    if segment is None:
                        future._exception = error
                    else:
                        future._segment = segment
                        future._position = j
                    future._state = FINISHED
                    condition.notify_all()
                for waiter in future._waiters:
                    if segment is None:
                        waiter.add_exception(future)
                    else:
                        waiter.add_result(future)
                own.notify_all()
            future._invoke_callbacks()
        self.remaining -= len(indexes)
        if self.remaining <= 0:
            if self.latency is not None and error is None:
                self.latency.observe(time.monotonic() - self.started_s)
            buffer.records = []  # every record settled: the futures (which keep the buffer) need no values
            self.tracker.done()


class ProduceResults(Sequence):
    """The ``RecordMetadata`` of every record of a ``produce_batch`` call, in input order.

    Built lazily: a pipelined producer that never looks at per-record offsets pays nothing.
    """

    def __init__(self, segments: list, count: int) -> None:
        self._segments = segments
        self._count = count
        self._items: list[RecordMetadata] | None = None

    def _materialize(self) -> list[RecordMetadata]:
        if self._items is None:
            items: list[Any] = [None] * self._count
            for indexes, records, topic, partition, base in self._segments:
                for j, i in enumerate(indexes):
                    items[i] = RecordMetadata(topic, partition, base + j if base >= 0 else -1, records[j][3])
            self._items = items
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):  # type: ignore[override]
        return self._materialize()[index]

    def __repr__(self) -> str:
        return f"ProduceResults({self._materialize()!r})"


class BatchWaiter:
    """One ``Future`` for a whole ``produce_batch`` call."""

    __slots__ = ("future", "count", "remaining", "segments", "tracker", "latency", "started_s")

    def __init__(self, count: int, tracker: _Tracker, latency: Any = None) -> None:
        self.future: Future = Future()
        self.count = count
        self.remaining = count
        self.segments: list = []
        self.tracker = tracker
        self.latency = latency  # a prometheus Histogram child when the node serves metrics
        self.started_s = time.monotonic() if latency is not None else 0.0

    def settle(self, indexes: Sequence[int], records: list, topic: str, partition: int, base_offset: int,
               error: MeshqError | None) -> None:
        if self.remaining <= 0:
            return
        if error is not None:
            if not self.future.done():
                self.future.set_exception(error)
        else:
            self.segments.append((indexes, records, topic, partition, base_offset))
        self.remaining -= len(indexes)
        if self.remaining <= 0:
            if not self.future.done():
                if self.latency is not None:
                    self.latency.observe(time.monotonic() - self.started_s)
                self.future.set_result(ProduceResults(self.segments, self.count))
            self.tracker.done()


class _OpenBuffer:
    """Records appended by ``produce_async`` for one (topic, partition, acks) until handed to the runtime."""

    __slots__ = ("records", "futures", "deadline_s", "condition")

    def __init__(self, deadline_s: float) -> None:
        self.records: list = []
        self.futures: list[RecordFuture] = []
        self.deadline_s = deadline_s
        self.condition = threading.Condition()  # shared by the futures of this buffer



class Accumulator:
    """Per-(topic, partition, acks) open buffers filled by any thread."""

    def __init__(self, runtime: Any, clock: Any, linger_s: float, batch_max_records: int) -> None:
        self.runtime = runtime
        self.clock = clock
        self.linger_s = linger_s
        self.batch_max_records = batch_max_records
        self.lock = threading.Lock()
        self.buffers: dict[tuple, _OpenBuffer] = {}
        self.tracker = _Tracker()
        self.latency: Any = None  # meshq.metrics.ClientLatency when the node serves metrics

    def append(self, topic: str, record: tuple, partition: int | None, acks: str, timeout_s: float,
               flush_now: bool = False) -> Future:
        key = (topic, partition, acks)
        with self.lock:
            buffer = self.buffers.get(key)
            opened = buffer is None
            if opened:
                buffer = self.buffers[key] = _OpenBuffer(self.clock.now_s() + timeout_s)
            future = RecordFuture(buffer)
            records = buffer.records
            records.append(record)
            buffer.futures.append(future)
            if flush_now or len(records) >= self.batch_max_records:
                del self.buffers[key]
                self._submit(key, buffer)
                return future
        if opened:
            self.runtime.call_later(self.linger_s, lambda: self.flush_key(key))
        return future

    def flush_key(self, key: tuple) -> None:
        with self.lock:
            buffer = self.buffers.pop(key, None)
            if buffer is not None:
                self._submit(key, buffer)

    def flush_all(self) -> None:
        with self.lock:
            self._submit_all()

    def _submit_all(self) -> None:
        buffers, self.buffers = self.buffers, {}
        for key, buffer in buffers.items():
            self._submit(key, buffer)

    def submit_batch(self, topic: str, records: list, partition: int | None, acks: str, timeout_s: float) -> Future:
        """Hand a whole list to the runtime at once (``produce_batch``); returns one Future."""
        waiter = BatchWaiter(len(records), self.tracker, self.latency.produce_batch if self.latency else None)
        if not records:
            self.flush_all()
            waiter.future.set_result(ProduceResults([], 0))
            return waiter.future
        command = ProduceCommand(topic, records, waiter, partition, acks, self.clock.now_s() + timeout_s)
        with self.lock:
            self._submit_all()  # keep order with records already buffered
            self.tracker.add()
            self.runtime.submit(command)
        return waiter.future

    def _submit(self, key: tuple, buffer: _OpenBuffer) -> None:
        """Hand one buffer to the runtime. Called holding ``self.lock``: the order in which buffers
        reach the runtime is the order in which they were sealed (also against the linger timer on
        the runtime thread), and ``flush()`` cannot miss a buffer that is sealed but not yet counted."""
        topic, partition, acks = key
        self.tracker.add()
        waiter = FutureListWaiter(buffer, self.tracker, self.latency.produce_batch if self.latency else None)
        self.runtime.submit(ProduceCommand(topic, buffer.records, waiter, partition, acks, buffer.deadline_s))
