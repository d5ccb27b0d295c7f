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
from concurrent.futures import Future
from typing import Any

from meshq.core.events import ProduceCommand
from meshq.core.records import RecordMetadata
from meshq.errors import MeshqError


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


class FutureListWaiter:
    """One ``Future`` per record (``produce_async``)."""

    __slots__ = ("futures", "remaining", "tracker", "latency", "started_s")

    def __init__(self, futures: list[Future], tracker: _Tracker, latency: Any = None) -> None:
        self.futures = futures
        self.remaining = len(futures)
        self.tracker = tracker
        self.latency = latency  # a prometheus Histogram child when the node serves metrics
        self.started_s = time.monotonic() if latency is not None else 0.0

    def settle(self, indexes: Sequence[int], records: list, topic: str, partition: int, base_offset: int,
               error: MeshqError | None) -> None:
        futures = self.futures
        for j, i in enumerate(indexes):
            future = futures[i]
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(RecordMetadata(topic, partition, base_offset + j if base_offset >= 0 else -1,
                                                  records[j][3]))
        self.remaining -= len(indexes)
        if self.remaining <= 0:
            if self.latency is not None and error is None:
                self.latency.observe(time.monotonic() - self.started_s)
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
    __slots__ = ("records", "futures", "deadline_s")

    def __init__(self, deadline_s: float) -> None:
        self.records: list = []
        self.futures: list[Future] = []
        self.deadline_s = deadline_s


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
        future: Future = Future()
        key = (topic, partition, acks)
        with self.lock:
            buffer = self.buffers.get(key)
            opened = buffer is None
            if opened:
                buffer = self.buffers[key] = _OpenBuffer(self.clock.now_s() + timeout_s)
            buffer.records.append(record)
            buffer.futures.append(future)
            seal = flush_now or len(buffer.records) >= self.batch_max_records
            if seal:
                del self.buffers[key]
        if seal:
            self._submit(key, buffer)
        elif opened:
            self.runtime.call_later(self.linger_s, lambda: self.flush_key(key))
        return future

    def flush_key(self, key: tuple) -> None:
        with self.lock:
            buffer = self.buffers.pop(key, None)
        if buffer is not None:
            self._submit(key, buffer)

    def flush_all(self) -> None:
        with self.lock:
            buffers, self.buffers = self.buffers, {}
        for key, buffer in buffers.items():
            self._submit(key, buffer)

    def submit_batch(self, topic: str, records: list, partition: int | None, acks: str, timeout_s: float) -> Future:
        """Hand a whole list to the runtime at once (``produce_batch``); returns one Future."""
        self.flush_all()  # keep order with records already buffered
        waiter = BatchWaiter(len(records), self.tracker, self.latency.produce_batch if self.latency else None)
        if not records:
            waiter.future.set_result(ProduceResults([], 0))
            return waiter.future
        self.tracker.add()
        self.runtime.submit(ProduceCommand(topic, records, waiter, partition, acks, self.clock.now_s() + timeout_s))
        return waiter.future

    def _submit(self, key: tuple, buffer: _OpenBuffer) -> None:
        topic, partition, acks = key
        self.tracker.add()
        waiter = FutureListWaiter(buffer.futures, self.tracker, self.latency.produce_batch if self.latency else None)
        self.runtime.submit(ProduceCommand(topic, buffer.records, waiter, partition, acks, buffer.deadline_s))
