"""Summaries of timed samples: latency percentiles and the median of repeated runs.

Theory of operation
-------------------
A latency is taken per call with ``perf_counter_ns`` and the samples are summarised as
nearest-rank percentiles (p50, p90, p99), max and mean, in microseconds. A short pipelined
run is repeated; the run with the median rate is reported together with every run's rate,
so the spread stays visible.
"""

from __future__ import annotations

import statistics
from typing import Any


def _percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)

    def pick(q: float) -> float:
        return ordered[min(n - 1, max(0, int(round(q * n)) - 1))] / 1000.0

    return {
        "p50_us": pick(0.50),
        "p90_us": pick(0.90),
        "p99_us": pick(0.99),
        "max_us": ordered[-1] / 1000.0,
        "mean_us": statistics.fmean(ordered) / 1000.0,
        "count": n,
    }


def _summarize_runs(runs: list[dict[str, Any]], value_bytes: int) -> dict[str, Any]:
    """The median run (by records/s) plus every run's rate."""
    ordered = sorted(runs, key=lambda r: r["records_per_s"])
    median = ordered[len(ordered) // 2]
    out = dict(median)
    out["mb_per_s"] = median["records_per_s"] * value_bytes / 1e6
    out["runs_records_per_s"] = [round(r["records_per_s"]) for r in runs]
    out["repeats"] = len(runs)
    return out
