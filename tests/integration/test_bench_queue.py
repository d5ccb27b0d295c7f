"""``meshq bench queue`` runs end to end with small numbers and reports its peers (figures are not checked).

RabbitMQ and Redis may or may not be installed where this runs: either the peer was measured
(every record acked in every round, a ratio meshq / peer) or the report says "not installed".
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.procs import child_env

pytestmark = pytest.mark.timeout(300)


def test_bench_queue_reports_meshq_and_its_peers():
    result = subprocess.run([sys.executable, "-m", "meshq", "bench", "queue", "--jobs", "600", "--rounds", "1",
                             "--json"], capture_output=True, timeout=280, env=child_env())
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    cluster = json.loads(result.stdout)["cluster"]
    assert "error" not in cluster, cluster["error"]
    (one_round,) = cluster["rounds"]
    assert one_round["shared"]["acked"] >= 600
    assert set(cluster["peers"]) == {"rabbitmq_quorum_queue", "redis_streams"}
    for name, entry in cluster["peers"].items():
        if isinstance(entry, str):
            assert "not installed" in entry or "did not start" in entry, (name, entry)
            continue
        assert "error" not in entry, (name, entry["error"])
        (peer_round,) = entry["rounds"]
        assert peer_round["acked"] == 600 and sum(peer_round["per_worker"]) == 600
        assert peer_round["acked_per_s"] > 0 and peer_round["meshq_ratio"] > 0
        assert set(entry["summary"]) == {"acked_per_s", "cpu_us_per_record", "meshq_ratio"}


def test_bench_queue_says_not_installed_when_a_peer_is_missing(monkeypatch, tmp_path):
    from meshq.bench import queue_peers

    monkeypatch.setattr(queue_peers.shutil, "which", lambda _name: None)
    running, notes = queue_peers.start_peers(str(tmp_path))
    assert running == {}
    assert notes == {"rabbitmq_quorum_queue": "rabbitmq-server is not installed: not measured",
                     "redis_streams": "redis-server is not installed: not measured"}
