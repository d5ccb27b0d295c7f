"""``meshq.io.futures``: request futures that make their condition only when needed behave as plain Futures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from meshq.io.futures import FutureFactory, LazyFuture
from tests.io.waits import assert_overlapping_waits_never_deadlock


@pytest.fixture
def make() -> FutureFactory:
    factory = FutureFactory()
    assert factory.lazy, "this Python's Future is not shaped as LazyFuture expects (plain futures in use)"
    return factory


def later(delay_s: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), action()), daemon=True)
    thread.start()
    return thread


def test_a_future_settled_before_anyone_waits_never_builds_a_condition(make):
    ok, bad = make(), make()
    assert isinstance(ok, concurrent.futures.Future) and isinstance(ok, LazyFuture)
    ok.set_result(b"reply")
    bad.set_exception(ValueError("boom"))
    assert ok.done() and ok.result(0) == b"reply" and ok.exception(0) is None
    with pytest.raises(ValueError, match="boom"):
        bad.result(0)
    assert isinstance(bad.exception(0), ValueError)
    assert ok._cond is None and bad._cond is None
    with pytest.raises(concurrent.futures.InvalidStateError):
        ok.set_result(b"again")
    with pytest.raises(concurrent.futures.InvalidStateError):
        bad.set_exception(ValueError("again"))


def test_a_waiter_gets_the_result_set_later_from_another_thread_and_times_out_on_its_own(make):
    mine, other = make(), make()
    later(0.05, lambda: other.set_result(1))
    later(0.20, lambda: mine.set_result(2))
    started = time.monotonic()
    assert mine.result(timeout=5.0) == 2
    assert time.monotonic() - started < 2.0  # woken when it was settled, not at its timeout
    assert mine._cond is not None  # the waiter made it, and the settling thread used it
    failing = make()
    later(0.05, lambda: failing.set_exception(KeyError("k")))
    assert isinstance(failing.exception(timeout=5.0), KeyError)
    never = make()
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        never.result(timeout=0.2)
    assert time.monotonic() - started >= 0.15


def test_done_callbacks_run_once_whether_added_before_or_after_settling(make):
    seen = []
    before, after = make(), make()
    before.add_done_callback(lambda f: seen.append(("before", f.result())))
    assert before._cond is None  # no condition made to hold a callback
    before.set_result(1)
    after.set_result(2)
    after.add_done_callback(lambda f: seen.append(("after", f.result())))
    assert seen == [("before", 1), ("after", 2)]


def test_cancel_wait_and_as_completed_work(make):
    futures = [make() for _ in range(4)]
    assert futures[3].cancel() and futures[3].cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        futures[3].result(0)
    with pytest.raises(concurrent.futures.InvalidStateError):
        futures[3].set_result(3)
    later(0.02, lambda: [f.set_result(i) for i, f in enumerate(futures[:3])])
    done, not_done = concurrent.futures.wait(futures[:3], timeout=5.0)
    assert len(done) == 3 and not not_done
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures[:3], timeout=5.0)) == [0, 1, 2]


def test_asyncio_can_await_one(make):
    future = make()

    async def main() -> bytes:
        later(0.02, lambda: future.set_result(b"x"))
        return await asyncio.wrap_future(future)

    assert asyncio.run(main()) == b"x"


def test_two_threads_waiting_on_overlapping_sets_never_deadlock(make):
    # A condition shared by several futures sits at several places of the id order that
    # concurrent.futures.wait locks futures in, and two waits can then deadlock (a review found
    # it in the first version of this module). Each future here locks its own condition.
    assert_overlapping_waits_never_deadlock(make, len(LazyFuture.__slots__))


def test_many_threads_each_get_their_own_result(make):
    futures = [make() for _ in range(200)]
    results: dict[int, object] = {}

    def wait(index: int) -> None:
        results[index] = futures[index].result(timeout=10.0)

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(0, 200, 10)]
    for thread in threads:
        thread.start()
    for index in reversed(range(200)):
        futures[index].set_result(index)
    for thread in threads:
        thread.join(10.0)
    assert results == {i: i for i in range(0, 200, 10)}
