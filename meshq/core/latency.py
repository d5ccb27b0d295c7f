"""Durations counted per bucket, for the Prometheus histograms of ``meshq.metrics``.

Pure data: a room that knows when something started and ended (by the ``now_s`` it is given)
calls ``observe``; the metrics endpoint reads ``cumulative()`` from its own thread (a torn read
costs one observation at most: every field is a plain int or float, updated in place).
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds: 0.5 ms to 10 s, Prometheus's upper-bound ("le") convention; slower ones fall in +Inf.
BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """How many durations fell at or below each bound, their count and their sum."""

    __slots__ = ("bounds_s", "counts", "count", "sum_s")

    def __init__(self, bounds_s: tuple[float, ...] = BUCKETS_S) -> None:
        assert list(bounds_s) == sorted(bounds_s), "bucket bounds must be increasing"
        self.bounds_s = bounds_s
        self.counts = [0] * (len(bounds_s) + 1)  # the last: above every bound (+Inf)
        self.count = 0
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds_s, seconds)] += 1
        self.count += 1
        self.sum_s += seconds

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """([(upper bound as text, observations at or below it), ..., ("+Inf", all)], sum of seconds)."""
        counts = list(self.counts)
        buckets = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds_s), "+Inf"), counts):
            running += count
            buckets.append((bound, running))
        return buckets, self.sum_s
