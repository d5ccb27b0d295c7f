"""Smoke test of `meshq bench rebalance`: preload, a join and (when meshq has it) a leave, under a light
producer, end to end with tiny sizes, reporting well-formed JSON.

Timings are never asserted (SPEC §6); what is checked: both moves finished, moved exactly the
partitions the ring predicts, the producer kept writing, the stored records match the
acknowledged ones, and no child process is left.
"""

from __future__ import annotations

import json
import uuid

import pytest

from meshq.node import Node
from tests.procs import pid_alive, run_cli


@pytest.mark.timeout(90)
def test_bench_rebalance_runs_end_to_end_with_tiny_sizes():
    result = run_cli("bench", "rebalance", "--records", "5000", "--batch", "100", "--load-rate", "2000",
                     "--move-timeout", "30", "--cluster", f"bench-rebalance-{uuid.uuid4().hex[:8]}", "--json",
                     timeout_s=80)
    assert result.returncode in (0, 1), result.stderr.decode(errors="replace")[-3000:]
    report = json.loads(result.stdout)
    assert report["errors"] == [], report["errors"]
    assert result.returncode == 0

    assert report["scenario"] == "rebalance"
    config = report["config"]
    assert config["nodes"] == 3 and config["replication_factor"] == 3 and config["partitions"] == 12
    cluster = report["cluster"]
    partitions = cluster["partitions"]
    assert cluster["preload"]["acknowledged"] >= 5000
    assert set(cluster["bytes_after_preload"]) == {"node1", "node2", "node3"}
    assert all(size > 5000 * 100 for size in cluster["bytes_after_preload"].values())

    moves = [cluster["join"]]
    if callable(getattr(Node, "leave", None)):
        moves.append(cluster["leave"])
    else:
        assert "skipped" in cluster["leave"]
    for move in moves:
        assert move["done_s"] is not None and move["done_s"] > 0, move
        assert move["moved"] == move["predicted_moved"] and move["moved"], move
        assert move["replicas_in_ring_order"] == partitions
        assert move["moved_bytes"] > 0 and move["received_bytes"] > 0
        assert len(move["final_placement"]) == partitions
        assert all(len(replicas) == 3 for replicas in move["final_placement"].values())
        for window in ("load_before", "load_during"):
            assert move[window]["records"] > 0, (move["move"], window, move[window])
    join = cluster["join"]
    assert join["node"] == "node4" and join["node_id"] in join["members_after"]
    assert all(join["node_id"] in replicas for replicas in (join["final_placement"][str(p)] for p in join["moved"]))
    if len(moves) == 2:
        leave = cluster["leave"]
        assert leave["node_id"] not in leave["members_after"]
        assert all(leave["node_id"] not in replicas for replicas in leave["final_placement"].values())
        assert leave["process_exit_code"] == 0 and cluster["leave"]["bytes_after"][leave["node"]] < 5000 * 100

    load = cluster["load"]
    assert load["error"] is None and load["acknowledged"] > 0
    verification = cluster["verification"]
    assert verification["ok"], verification
    assert verification["acknowledged"] == cluster["preload"]["acknowledged"] + load["acknowledged"]

    for pid in cluster["node_pids"]:
        assert not pid_alive(pid), f"the benchmark left process {pid} running"
