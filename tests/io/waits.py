"""A check shared by the futures tests: ``concurrent.futures.wait`` from two threads never deadlocks."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable


def assert_overlapping_waits_never_deadlock(make: Callable[[], concurrent.futures.Future], slots: int) -> None:
    """Two threads wait (``timeout=0``, for 1 s) on overlapping sets: thread A on s1 < p < s2 in id
    order (the order ``wait`` locks futures in), s1 and s2 made by ``make``, p a plain ``Future``;
    thread B on p and s2. A lock shared by s1 and s2 sits at two places of that order and deadlocks
    them. p's class has ``slots`` slots, as many as ``make``'s futures, so that both come from the
    same allocator pool and their ids interleave."""
    plain_class = type("Plain", (concurrent.futures.Future,), {"__slots__": tuple(f"_s{i}" for i in range(slots))})
    ours, plain = [], []
    for _ in range(100):
        ours.append(make())
        plain.append(plain_class())
    first, middle, last = next((s1, p, s2) for p in plain for s1 in ours for s2 in ours if id(s1) < id(p) < id(s2))
    stop = time.monotonic() + 1.0

    def waits(futures: list) -> None:
        while time.monotonic() < stop:
            concurrent.futures.wait(futures, timeout=0)

    threads = [threading.Thread(target=waits, args=([first, middle, last],), daemon=True),
               threading.Thread(target=waits, args=([middle, last],), daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10.0)
    assert not any(thread.is_alive() for thread in threads), "concurrent.futures.wait deadlocked"
