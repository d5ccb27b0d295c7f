"""The producer that writes through ``bench rebalance``'s partition moves: what a move costs producers.

Theory of operation
-------------------
With ``--load-rate N|max``, a producer thread (``produce_batch`` of ``LOAD_BATCH`` records,
``LOAD_WINDOW`` in flight, ``acks=quorum``, paced to N records/s) writes from ``LOAD_BEFORE_S``
before the join to the end. Each batch's submission and completion are recorded from its
Future's callback, so any time window can be summarised afterwards: throughput and batch
latency in the ``LOAD_BEFORE_S`` before each move and during it. A failed batch's records may
or may not be stored: the final check allows for them.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Any

from meshq.bench.errors import _error_text
from meshq.bench.stats import _percentiles_us

LOAD_WINDOW = 4  # produce_batch calls in flight of the producer that writes during the moves
LOAD_BATCH = 100  # records per call of that producer (small: many latency samples per second)
LOAD_TIMEOUT_S = 10.0  # timeout of each of its batches
LOAD_BEFORE_S = 5.0  # it writes this long before a move: the "before" figures


class _LoadWriter:
    """A producer thread running through the moves: ``produce_batch`` of ``len(values)`` records at
    ``acks``, at most ``LOAD_WINDOW`` batches in flight, paced to ``rate`` records/s (None: as fast
    as acknowledgements come back). Each batch's (submitted, acknowledged or failed, records, error)
    is recorded from its Future's callback, so any time window can be summarised afterwards."""

    def __init__(self, client: Any, topic: str, values: list[bytes], acks: str, rate: int | None) -> None:
        self.client = client
        self.topic = topic
        self.values = values
        self.acks = acks
        self.rate = rate
        self.batches: list[tuple[float, float, int, str | None]] = []
        self.stop_event = threading.Event()
        self._slots = threading.Semaphore(LOAD_WINDOW)
        self.thread = threading.Thread(target=self._run, name="bench-load-writer", daemon=True)
        self.error: str | None = None  # why the writer stopped early, if it did

    def start(self) -> None:
        self.thread.start()

    def _done(self, future: Future, submitted: float) -> None:
        exc = future.exception()
        self.batches.append((submitted, time.monotonic(), len(self.values), None if exc is None else type(exc).__name__))
        self._slots.release()

    def _run(self) -> None:
        interval = len(self.values) / self.rate if self.rate else 0.0
        next_at = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if not self._slots.acquire(timeout=0.1):
                    continue
                if interval:
                    now = time.monotonic()
                    if next_at > now and self.stop_event.wait(next_at - now):
                        self._slots.release()
                        break
                    next_at = max(next_at + interval, time.monotonic() - interval)  # no burst after a stall
                submitted = time.monotonic()
                try:
                    future = self.client.produce_batch(self.topic, self.values, acks=self.acks,
                                                       timeout=LOAD_TIMEOUT_S)
                except Exception:
                    self._slots.release()
                    raise
                future.add_done_callback(lambda f, s=submitted: self._done(f, s))
        except Exception as exc:  # e.g. the client stopped under us: say so in the report
            self.error = _error_text(exc)

    def stop(self) -> None:
        """Stop submitting and wait (bounded) for the batches in flight."""
        self.stop_event.set()
        self.thread.join(LOAD_TIMEOUT_S + 5.0)
        for _ in range(LOAD_WINDOW):
            self._slots.acquire(timeout=LOAD_TIMEOUT_S + 5.0)

    def totals(self) -> tuple[int, int]:
        """(records acknowledged, records of failed batches: stored or not, nobody knows)."""
        batches = list(self.batches)
        return (sum(n for _s, _e, n, error in batches if error is None),
                sum(n for _s, _e, n, error in batches if error is not None))

    def window(self, begin: float, end: float) -> dict[str, Any]:
        """Throughput (batches acknowledged within [begin, end]) and latency (batches submitted in it)."""
        batches = list(self.batches)
        seconds = max(end - begin, 1e-9)
        acked = [(s, e, n) for s, e, n, error in batches if error is None and begin <= e <= end]
        latencies = [int((e - s) * 1e9) for s, e, _n, error in batches if error is None and begin <= s < end]
        failed = collections.Counter(error for _s, e, _n, error in batches if error is not None and begin <= e <= end)
        previous, stall = begin, 0.0
        for _s, e, _n in sorted(acked, key=lambda b: b[1]):
            stall, previous = max(stall, e - previous), e
        out: dict[str, Any] = {"seconds": round(end - begin, 3), "records": sum(n for _s, _e, n in acked),
                               "records_per_s": sum(n for _s, _e, n in acked) / seconds,
                               "failed_batches": dict(failed), "longest_stall_s": round(max(stall, end - previous), 3)}
        if latencies:
            out["batch_latency"] = _percentiles_us(latencies)
        return out
