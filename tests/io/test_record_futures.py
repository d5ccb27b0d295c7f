"""``meshq.producer.RecordFuture``: produce_async's futures, settled a stored batch at a time, behave as Futures."""

from __future__ import annotations

import concurrent.futures
import threading
import time

from meshq.errors import TimeoutError as MeshqTimeoutError
from meshq.producer import FutureListWaiter, RecordFuture, _OpenBuffer, _Tracker


def buffered(count: int) -> tuple[_OpenBuffer, list[RecordFuture], list[tuple]]:
    buffer = _OpenBuffer(1e9)
    records = [(None, b"v%d" % i, {}, 1000 + i) for i in range(count)]  # (key, value, headers, timestamp)
    for record in records:
        buffer.records.append(record)
        buffer.futures.append(RecordFuture(buffer))
    return buffer, list(buffer.futures), records


def settle(buffer: _OpenBuffer, indexes: list[int], records: list, base: int, error=None) -> None:
    tracker = _Tracker()
    tracker.add()
    FutureListWaiter(buffer, tracker).settle(indexes, [records[i] for i in indexes], "t", 0, base, error)


def test_waiters_callbacks_and_result_all_hear_of_a_settled_batch():
    buffer, futures, records = buffered(4)
    seen = []
    futures[1].add_done_callback(lambda f: seen.append(f.result().offset))
    results: dict = {}
    waiting = threading.Thread(target=lambda: results.update(
        waited=concurrent.futures.wait(futures[:2], timeout=5.0), value=futures[0].result(timeout=5.0)))
    waiting.start()
    time.sleep(0.05)
    settle(buffer, [0, 1], records, 10)
    waiting.join(5.0)
    done, not_done = results["waited"]
    assert len(done) == 2 and not not_done
    assert results["value"].offset == 10 and seen == [11]
    assert not futures[2].done() and futures[3].cancel() and futures[3].cancelled()
    settle(buffer, [2, 3], records, 12, MeshqTimeoutError("no ack"))  # the cancelled one keeps its state
    assert isinstance(futures[2].exception(0), MeshqTimeoutError) and futures[3].cancelled()
    late = []
    futures[2].add_done_callback(late.append)  # after settling: called at once
    assert late == [futures[2]]


def test_two_threads_waiting_on_overlapping_sets_never_deadlock():
    # Records of one buffer are settled under one condition; wait() must not lock that one
    # condition for each of them (it would sit at several places of wait()'s id order, and
    # two waits over overlapping sets deadlocked: found in review, 2026-12-07).
    buffer, ours, _records = buffered(100)

    class Plain(concurrent.futures.Future):
        __slots__ = ("_a", "_b", "_c", "_d", "_e", "_f", "_g", "_h")

    plain = [Plain() for _ in range(100)]
    first, middle, last = next((s1, p, s2) for p in plain for s1 in ours for s2 in ours if id(s1) < id(p) < id(s2))
    stop = time.monotonic() + 1.0

    def waits(futures) -> None:
        while time.monotonic() < stop:
            concurrent.futures.wait(futures, timeout=0)

    threads = [threading.Thread(target=waits, args=([first, middle, last],), daemon=True),
               threading.Thread(target=waits, args=([middle, last],), daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10.0)
    assert not any(thread.is_alive() for thread in threads), "concurrent.futures.wait deadlocked"
