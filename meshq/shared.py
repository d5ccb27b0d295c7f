"""The shared (work-queue) consumer: any member may get any record; each is acked on its own.

Theory of operation
-------------------
This is the I/O shell around ``meshq.core.client.shared.SharedConsumerState``: it sends the
long polls the state names (``ShareFetch``, one per partition, to each partition's leader)
and the batched answers (``ShareAck``, one per partition with answers) as commands to the
node's runtime, and waits on their futures with the wall clock.

``ack``/``nack`` return at once: answers leave at the next ``poll``, when ``ACK_BATCH``
are queued, or on ``flush_acks``/``close``. An ack is durable (never redelivered, even after
the partition's leader is killed) once the leader confirmed it, which ``flush_acks()`` and
``close()`` wait for. An ack that arrives after the record's ``ack_timeout`` passed is
ignored by the leader (the record was queued again) and counted in ``stats["stale"]``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import time
from concurrent.futures import Future
from typing import Any

from meshq.config import validate_topic_name
from meshq.core.client.shared import ACK, NACK, REJECT, SharedConsumerState
from meshq.core.events import ShareAck, ShareFetch
from meshq.core.records import Record
from meshq.errors import MeshqError, TimeoutError, UsageError

log = logging.getLogger("meshq.shared")

ACK_BATCH = 256  # queued answers that are sent without waiting for the next poll
MAX_FETCH_WAIT_S = 1.0


class SharedConsumer:
    """A member of a shared group. Create with ``node.consumer(topic, group=G, mode="shared")``."""

    def __init__(self, node: Any, topic: str, group: str, ack_timeout: float = 30.0, max_deliveries: int = 5,
                 prefetch: int = 500, timeout: float = 10.0, partitions: int | None = None) -> None:
        validate_topic_name(topic)
        validate_topic_name(group)
        if isinstance(ack_timeout, bool) or not isinstance(ack_timeout, (int, float)) or not 0.001 <= ack_timeout \
                <= 86_400:
            raise UsageError(f"ack_timeout must be a number of seconds between 0.001 and 86400, not {ack_timeout!r}")
        if isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int) or not 1 <= max_deliveries \
                <= 1_000_000:
            raise UsageError(f"max_deliveries must be an int between 1 and 1000000, not {max_deliveries!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= 100_000:
            raise UsageError(f"prefetch must be an int between 1 and 100000, not {prefetch!r}")
        self.node = node
        self.topic = topic
        self.group = group
        self.ack_timeout_ms = max(1, int(ack_timeout * 1000))
        self.max_deliveries = max_deliveries
        self.member = f"{node.node_id}/{random.getrandbits(40):010x}"
        self._closed = False
        if partitions is None:  # meshq.aio looks the topic up itself, awaited
            partitions = node.topic(topic, timeout=timeout, create=True).partitions
        self.partitions = list(range(partitions))
        self._state = SharedConsumerState(topic, self.partitions, prefetch)
        self._fetches: dict[Future, int] = {}
        self._acks: dict[Future, int] = {}  # answers awaiting the leader's confirmation -> count
        self._ack_errors: list[MeshqError] = []

    @property
    def stats(self) -> dict[str, int]:
        """Records received, acked, nacked, rejected, and answers the leaders found stale."""
        return dict(self._state.stats)

    # ------------------------------------------------------------------ poll
    def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Record]:
        """Return up to ``max_records`` records, waiting at most ``timeout`` seconds for the first.

        Each record is held by this member until ``ack``/``nack`` (or its ack timeout passes);
        its header ``meshq-delivery-count`` says how many times it was handed out.
        """
        self._require_open()
        deadline = time.monotonic() + timeout
        self._send_answers()
        while True:
            if self._state.buffer:
                records = self._state.take(max_records)
                if records and self.node._latency is not None:  # (once per poll, not per record)
                    self.node._latency.observe_consume(records)
                return records
            self._issue_fetches(max(0.0, deadline - time.monotonic()))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            waiting = list(self._fetches) + list(self._acks)
            if not waiting:
                time.sleep(min(remaining, 0.05))
                continue
            done, _ = concurrent.futures.wait(waiting, timeout=remaining, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                if future in self._fetches:
                    self._on_fetched(future)
                else:
                    self._on_acked(future)

    def __iter__(self):
        while not self._closed:
            yield from self.poll()

    def _issue_fetches(self, wait_s: float) -> None:
        for partition, max_records in self._state.fetches_due(time.monotonic()):
            future: Future = Future()
            self._fetches[future] = partition
            self.node.runtime.submit(ShareFetch(self.group, self.topic, partition, self.member, max_records,
                                                min(max(wait_s, 0.0), MAX_FETCH_WAIT_S), self.ack_timeout_ms,
                                                self.max_deliveries, waiter=future))

    def _on_fetched(self, future: Future) -> None:
        partition = self._fetches.pop(future)
        try:
            index, data = future.result()
        except MeshqError as exc:
            self._state.on_fetch_failed(partition, exc, time.monotonic())  # raises what is not retriable
            log.debug("share_fetch %s/%d failed (%s); retrying", self.topic, partition, exc)
            return
        self._state.on_fetched(partition, index, data)

    # ------------------------------------------------------------------ answers
    def ack(self, record: Record) -> None:
        """The record is done. Returns at once; ``flush_acks()`` waits until the ack is durable."""
        self._answer(record, ACK, 0)

    def nack(self, record: Record, delay: float | None = None, requeue: bool = True) -> None:
        """Give the record back: handed out again after ``delay`` seconds (at once by default), or with
        ``requeue=False`` appended to ``<topic>.dlq`` (reason ``rejected``) and not delivered again."""
        if not requeue:
            if delay is not None:
                raise UsageError("nack(requeue=False) sends the record to the dead-letter topic; a delay does not "
                                 "apply (drop delay=)")
            self._answer(record, REJECT, 0)
            return
        if delay is None:
            delay_ms = 0
        elif isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
            raise UsageError(f"nack delay must be a number of seconds >= 0, not {delay!r}")
        else:
            delay_ms = int(delay * 1000)
        self._answer(record, NACK, delay_ms)

    def _answer(self, record: Record, kind: int, delay_ms: int) -> None:
        self._require_open()
        self._state.answer(record, kind, delay_ms)
        if self._state.unsent >= ACK_BATCH:
            self._send_answers()

    def _send_answers(self) -> None:
        for partition, (packed, count) in self._state.take_answers().items():
            future: Future = Future()
            self._acks[future] = count
            self.node.runtime.submit(ShareAck(self.group, self.topic, partition, self.member, packed, waiter=future))
        for future in [f for f in self._acks if f.done()]:
            self._on_acked(future)

    def _on_acked(self, future: Future) -> None:
        self._acks.pop(future, None)
        try:
            self._state.stats["stale"] += len(future.result()) // 8
        except MeshqError as exc:
            # Not confirmed: those records are handed out again after their ack timeout.
            log.warning("answers for %s (group %s) were not confirmed: %s", self.topic, self.group, exc)
            self._ack_errors.append(exc)

    def flush_acks(self, timeout: float = 10.0) -> None:
        """Send every queued answer and wait until the leaders confirmed them (durable: an acked record
        is never handed out again). Raises the first error when some were not confirmed."""
        self._send_answers()
        self._wait_acks(timeout)

    def _wait_acks(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._acks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(self._acks)} ack requests were not confirmed within {timeout} s")
            done, _ = concurrent.futures.wait(list(self._acks), timeout=remaining,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                self._on_acked(future)
        if self._ack_errors:
            errors, self._ack_errors = self._ack_errors, []
            raise errors[0]

    # ------------------------------------------------------------------ close
    def close(self, timeout: float = 10.0) -> None:
        """Give back every record still held (others get them at once), send every answer and wait
        for the leaders to confirm them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._state.release_all()
        self._send_answers()
        try:
            self._wait_acks(timeout)
        except MeshqError as exc:
            log.warning("closing the shared consumer of %s: %s (unconfirmed records are redelivered after "
                        "their ack timeout)", self.topic, exc)

    def __enter__(self) -> SharedConsumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._closed:
            raise UsageError("this shared consumer is closed")
