"""``meshq.producer.RecordFuture``: produce_async's futures, settled a stored batch at a time, behave as Futures."""

from __future__ import annotations

import concurrent.futures
import threading
import time

from meshq.errors import TimeoutError as MeshqTimeoutError
from meshq.producer import FutureListWaiter, RecordFuture, _OpenBuffer, _Tracker
from tests.io.waits import assert_overlapping_waits_never_deadlock


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


def test_a_record_settled_by_an_earlier_batch_is_not_told_again_by_a_later_one():
    buffer, (first, second), records = buffered(2)
    settle(buffer, [0], records, 10)  # nobody watching yet
    other = concurrent.futures.Future()  # never done
    results: dict = {}

    def wait() -> None:
        started = time.monotonic()
        results["waited"] = concurrent.futures.wait([first, second, other], timeout=0.5)
        results["elapsed"] = time.monotonic() - started

    waiting = threading.Thread(target=wait)
    waiting.start()
    time.sleep(0.1)
    settle(buffer, [1], records, 11)
    waiting.join(5.0)
    done, not_done = results["waited"]
    assert not_done == {other} and done == {first, second}
    assert results["elapsed"] >= 0.45  # a second telling of ``first`` would have ended the wait early


def test_a_waiter_that_finds_a_record_pending_is_told_once_when_settling_lets_go_of_the_buffer_in_between():
    # Settling lets go of the buffer's condition before it settles a record that has a condition
    # of its own; a wait() in that gap must see it pending and be told exactly once.
    buffer, (record,), records = buffered(1)
    record._condition  # noqa: B018 (it has its own condition: e.g. an earlier wait timed out)
    released, go = threading.Event(), threading.Event()

    class Pausing(threading.Condition):
        def __exit__(self, *exc):
            result = super().__exit__(*exc)
            if threading.current_thread().name == "settler" and not released.is_set():
                released.set()
                go.wait(5.0)
            return result

    buffer.condition = Pausing()
    settler = threading.Thread(target=settle, args=(buffer, [0], records, 10), name="settler")
    settler.start()
    assert released.wait(5.0)
    other = concurrent.futures.Future()
    results: dict = {}

    def wait() -> None:
        started = time.monotonic()
        results["waited"] = concurrent.futures.wait([record, other], timeout=0.5)
        results["elapsed"] = time.monotonic() - started

    waiting = threading.Thread(target=wait)
    waiting.start()
    time.sleep(0.1)
    go.set()
    settler.join(5.0)
    waiting.join(5.0)
    done, not_done = results["waited"]
    assert done == {record} and not_done == {other} and results["elapsed"] >= 0.45
    assert record.result(0).offset == 10


def test_two_threads_waiting_on_overlapping_sets_never_deadlock():
    # Records of one buffer are settled under one condition; wait() must not lock that one
    # condition for each of them (it would sit at several places of wait()'s id order, and
    # two waits over overlapping sets deadlocked: found in review, 2026-12-07).
    buffer = _OpenBuffer(1e9)
    assert_overlapping_waits_never_deadlock(lambda: RecordFuture(buffer), len(RecordFuture.__slots__))
