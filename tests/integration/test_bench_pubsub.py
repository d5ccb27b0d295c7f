"""``meshq bench pubsub`` runs end to end with small numbers (figures are not checked: benchmarks, not tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.procs import child_env

pytestmark = pytest.mark.timeout(300)


def test_bench_pubsub_reports_every_system_and_the_wildcard_cost():
    result = subprocess.run([sys.executable, "-m", "meshq", "bench", "pubsub", "--records", "2000", "--rounds", "1",
                             "--json"], capture_output=True, timeout=280, env=child_env())
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = json.loads(result.stdout)
    for subscribers in (1, 3):
        for system in ("pyzmq", "meshq"):
            (one_round,) = report["results"][f"{system}_{subscribers}"]["rounds"]
            assert len(one_round["received"]) == subscribers
        assert report["results"][f"meshq_{subscribers}"]["rounds"][0]["received"] == [2000] * subscribers
    assert report["nats"] == "measured" or "not installed" in report["nats"]
    assert set(report["wildcard"]) >= {"10", "10000", "ratio_large_to_small"}


def test_bench_pubsub_refuses_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "meshq", "bench", "pubsub", "--records", "10"],
                            capture_output=True, timeout=60, env=child_env())
    assert result.returncode == 2 and b"--records" in result.stderr
