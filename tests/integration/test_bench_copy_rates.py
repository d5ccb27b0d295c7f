"""``meshq bench rebalance --copy-rates``: parsing, per-run figures and the summary (no cluster)."""

from __future__ import annotations

import pytest

from meshq.bench.throttle import _run_figures, _spread, parse_copy_rates
from tests.procs import run_cli

pytestmark = pytest.mark.timeout(60)


def test_copy_rates_parse_and_refuse_bad_values():
    assert parse_copy_rates("0,10,30.5") == [0.0, 10.0, 30.5]
    for bad in ("", "x", "-1", "inf", "1,,nan"):
        with pytest.raises(ValueError):
            parse_copy_rates(bad)


def test_a_run_gives_the_p99_ratio_of_during_over_idle():
    cluster = {"join": {"done_s": 4.0, "moved_mb_per_s": 25.0, "cpu": {"ours_percent": 80.0, "other_percent": 5.0},
                        "load_before": {"batch_latency": {"p99_us": 5000.0}},
                        "load_during": {"batch_latency": {"p99_us": 8000.0}}}}
    figures = _run_figures(cluster)
    assert figures["p99_ratio"] == pytest.approx(1.6)
    assert (figures["idle_p99_ms"], figures["during_p99_ms"], figures["join_s"]) == (5.0, 8.0, 4.0)
    assert "error" in _run_figures({"error": "boom", "join": {}})


def test_the_summary_is_median_min_max():
    assert _spread([3.0, 1.0, 2.0, None]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert _spread([None]) is None


def test_the_cli_refuses_bad_copy_rates_before_starting_anything():
    result = run_cli("bench", "rebalance", "--copy-rates", "fast", timeout_s=60)
    assert result.returncode != 0
    assert "--copy-rates must be comma-separated numbers" in result.stderr.decode() + result.stdout.decode()
