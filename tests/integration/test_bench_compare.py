"""Smoke test of `meshq bench compare`: meshq's whole path with tiny counts, a peer that is not installed.

Timings are never asserted (SPEC §6): the figures and the targets' verdicts are the benchmark's
output, not a test result. What is checked: the 3-node cluster, the one consumer reads exactly what
was stored and the consumer group every stored record (at least once), a peer missing from the PATH
is reported as not measured, the report is well-formed JSON, and no process the run started is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.procs import MESHQ, TIME_SCALE, pid_alive, run_cli


@pytest.mark.timeout(240)
def test_bench_compare_measures_meshq_and_reports_a_missing_peer():
    # the PATH holds only this Python's directory: nats-server is "not installed" even where it is
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    result = subprocess.run([*MESHQ, "bench", "compare", "--records", "3000", "--sync-records", "20",
                             "--batch", "100", "--rounds", "1", "--peers", "nats", "--consumers", "2",
                             "--cluster", f"bench-compare-{uuid.uuid4().hex[:8]}", "--json"],
                            capture_output=True, env=env, timeout=220 * TIME_SCALE)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    report = json.loads(result.stdout)
    assert report["scenario"] == "compare" and report["errors"] == []
    body = report["compare"]
    assert body["systems"]["meshq"] == "measured"
    assert "not installed: not measured" in body["systems"]["nats"]
    assert set(body["rounds"]) == {"meshq"}
    assert body["meshq"]["fsync"] == "interval" and body["meshq"]["acks"] == "quorum"

    (round_,) = body["rounds"]["meshq"]
    assert "error" not in round_, round_
    # the one consumer read everything the round stored: 3000 + 100 warm-up async, 20 + 20 warm-up sync
    assert round_["produce"]["ops"] == 3000
    assert round_["sync"]["ops"] == 20 and round_["sync"]["p50_us"] > 0
    assert round_["consume"]["ops"] == 3000 + 100 + 20 + 20
    group = round_["consume_group"]
    assert group["members"] == 2 and len(group["per_member"]) == 2 and all(group["per_member"])
    assert group["ops"] == sum(group["per_member"]) == 3000 + 5 * 100  # produce_batch's 5 warm-up batches
    # every stored record read by some member (else an error above); at-least-once: a rebalance during the
    # read may make a member read some again, never fewer
    assert group["read_again"] >= 0
    for part in ("produce", "sync", "consume", "consume_group"):
        assert round_[part]["ops_per_s"] > 0 and round_[part]["cpu_client_us_per_op"] >= 0

    summary = body["summary"]["meshq"]
    assert summary["rounds_measured"] == 1 and summary["consume"]["ops_per_s"]["median"] > 0
    assert body["ratios"]["pipelined produce, msg/s"] == {}  # no peer measured, no ratio made up
    verdicts = {t["name"]: t for t in body["targets"]}
    assert all(t["met"] is None for name, t in verdicts.items() if "JetStream" in name)
    assert verdicts["one consumer of a 3-replica topic >= 1,000,000 rec/s"]["value"] == round_["consume"]["ops_per_s"]
    assert verdicts["a consumer group of 3 >= 2,000,000 rec/s total"]["met"] is None  # a group of 2 here

    pids = body["server_pids"]["meshq"]
    assert len(pids) == 3 + 2  # three nodes, two group members
    assert not [pid for pid in pids if pid_alive(pid)], "bench compare left processes running"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", [
    (("--peers", "kafka"), "--peers: unknown kafka"),
    (("--consumers", "9"), "--consumers must be from 0 to 8"),
    (("--rounds", "0"), "--rounds must be at least 1"),
])
def test_bench_compare_refuses_bad_arguments(args, message):
    result = run_cli("bench", "compare", *args, timeout_s=50)
    assert result.returncode == 2
    assert message in result.stderr.decode()
