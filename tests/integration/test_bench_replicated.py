"""Smoke test of `meshq bench replication`: it runs end to end with tiny counts and reports well-formed JSON.

Timings are never asserted (SPEC §6): the figures and the PASS/MISS against the targets are
the benchmark's output, not a test result. What is checked: every part ran or says why it
could not, the stored records match the acknowledged ones, and no child process is left.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.procs import pid_alive, run_cli

PARTS = ("baseline", "single_node", "cluster")


@pytest.mark.timeout(240)
def test_bench_replication_runs_end_to_end_with_tiny_counts():
    result = run_cli("bench", "replication", "--records", "2000", "--sync-records", "20", "--batch", "100",
                     "--failover-repeats", "1", "--failover-deadline", "10", "--in-sync-timeout", "5",
                     "--cluster", f"bench-smoke-{uuid.uuid4().hex[:8]}", "--json", timeout_s=220)
    assert result.returncode in (0, 1), result.stderr.decode(errors="replace")[-3000:]
    report = json.loads(result.stdout)

    assert report["scenario"] == "replication"
    assert report["config"]["nodes"] == 3 and report["config"]["replication_factor"] == 3
    assert report["config"]["value_bytes"] == 100
    for part in PARTS:
        assert part in report, f"no {part} in the report"
    assert report["baseline"]["verified"] is True
    assert report["baseline"]["records_per_s"] > 0 and report["baseline"]["sync"]["count"] == 20
    single = report["single_node"]
    assert single["verification"]["ok"], single["verification"]
    assert single["produce_batch"]["records_per_s"] > 0 and single["produce"]["count"] == 20

    cluster = report["cluster"]
    assert "error" not in cluster, cluster.get("error")
    assert len(cluster["node_ids"]) == 3 and len(set(cluster["node_ids"])) == 3
    assert set(cluster["acks"]) == {"leader", "quorum"}
    for acks, phase in cluster["acks"].items():
        for key in ("produce_batch", "produce"):
            row = phase[key]
            # either measured, or the reason it could not be (e.g. acks=quorum before replication works)
            assert ("error" in row) != ("records_per_s" in row), (acks, key, row)
        if "verification" in phase:
            assert phase["verification"]["ok"], (acks, phase["verification"])
    # acks=leader needs no replication: it must always be measured
    assert "records_per_s" in cluster["acks"]["leader"]["produce_batch"]
    assert cluster["acks"]["leader"]["produce"]["count"] == 20

    failover = cluster["failover"]
    assert failover["failure_timeout_s"] > 0 and failover["target_s"] == failover["failure_timeout_s"] + 2
    (repeat,) = failover["repeats"]
    assert repeat.get("victim") in cluster["node_ids"] or "error" in repeat, repeat
    if repeat.get("all_s") is not None:
        assert 0 < repeat["first_s"] <= repeat["all_s"] <= 10
        assert failover["median_s"] == repeat["all_s"]
    else:
        assert "error" in repeat

    names = [t["name"] for t in report["targets"]]
    assert len(names) == 3, names
    for target in report["targets"]:
        assert target["met"] in (True, False, None)
        assert (target["met"] is None) == (target["value"] is None)
    # the exit status says whether anything could not be measured or failed its check
    assert (result.returncode == 0) == (report["errors"] == []), report["errors"]

    for pid in [single["node_pid"], *cluster["node_pids"]]:
        assert not pid_alive(pid), f"the benchmark left process {pid} running"
