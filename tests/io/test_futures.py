"""``meshq.io.futures``: request futures that share one condition behave as plain Futures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from meshq.io.futures import FutureFactory, SharedFuture


@pytest.fixture
def make() -> FutureFactory:
    factory = FutureFactory()
    assert factory.shared, "this Python's Future is not shaped as SharedFuture expects (plain futures in use)"
    return factory


def later(delay_s: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), action()), daemon=True)
    thread.start()
    return thread


def test_a_shared_future_is_a_future_and_settles_like_one(make):
    ok, bad = make(), make()
    assert isinstance(ok, concurrent.futures.Future) and isinstance(ok, SharedFuture)
    assert ok._condition is bad._condition
    ok.set_result(b"reply")
    bad.set_exception(ValueError("boom"))
    assert ok.done() and ok.result(0) == b"reply" and ok.exception(0) is None
    with pytest.raises(ValueError, match="boom"):
        bad.result(0)
    assert isinstance(bad.exception(0), ValueError)
    with pytest.raises(concurrent.futures.InvalidStateError):
        ok.set_result(b"again")
    with pytest.raises(concurrent.futures.InvalidStateError):
        bad.set_exception(ValueError("again"))


def test_waiting_on_one_is_not_ended_by_another_settling(make):
    # With a shared condition, settling ``other`` wakes a thread waiting on ``mine``: it must wait on.
    mine, other = make(), make()
    later(0.05, lambda: other.set_result(1))
    later(0.30, lambda: mine.set_result(2))
    started = time.monotonic()
    assert mine.result(timeout=5.0) == 2
    assert time.monotonic() - started >= 0.25
    third, fourth = make(), make()
    later(0.05, lambda: fourth.set_result(1))
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        third.result(timeout=0.3)  # the wake-up for ``fourth`` is not reported as a timeout early, nor as a result
    assert time.monotonic() - started >= 0.25
    with pytest.raises(concurrent.futures.TimeoutError):
        third.exception(timeout=0.05)


def test_cancel_callbacks_wait_and_as_completed_work(make):
    futures = [make() for _ in range(4)]
    seen = []
    futures[0].add_done_callback(lambda f: seen.append(f.result()))
    assert futures[3].cancel() and futures[3].cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        futures[3].result(0)
    later(0.02, lambda: [f.set_result(i) for i, f in enumerate(futures[:3])])
    done, not_done = concurrent.futures.wait(futures[:3], timeout=5.0)
    assert len(done) == 3 and not not_done
    assert seen == [0]
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures[:3], timeout=5.0)) == [0, 1, 2]


def test_asyncio_can_await_one(make):
    future = make()

    async def main() -> bytes:
        later(0.02, lambda: future.set_result(b"x"))
        return await asyncio.wrap_future(future)

    assert asyncio.run(main()) == b"x"


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
