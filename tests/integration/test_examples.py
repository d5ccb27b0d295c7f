"""The examples run as a user would run them, against a real node on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.procs import free_port

pytestmark = pytest.mark.timeout(120)
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def run_example(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], capture_output=True,
                            timeout=90)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def test_producer_then_group_consumer_resumes(node_processes):
    node = node_processes("n1")
    connection = ["--cluster", node.cluster, "--seed", node.seed]
    assert "200 orders acknowledged" in run_example("produce_orders.py", *connection, "--count", "200")
    assert run_example("billing_consumer.py", *connection, "--idle", "2").startswith("200 new orders")
    assert run_example("billing_consumer.py", *connection, "--idle", "1").startswith("0 new orders")


def test_embedded_service_stores_and_reads_its_events(tmp_path):
    port = free_port()
    out = run_example("embedded_service.py", "--cluster", "ex", "--data", str(tmp_path / "svc"), "--port",
                      str(port), "--events", "5")
    assert "read back 5 of my events" in out


def test_work_queue_workers_share_the_jobs_and_poison_lands_in_the_dlq(node_processes):
    node = node_processes("n1")
    connection = ["--cluster", node.cluster, "--seed", node.seed]
    assert "100 jobs queued" in run_example("work_queue.py", "produce", *connection, "--count", "100",
                                            "--poison-every", "25")
    workers = [subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "work_queue.py"), "worker", *connection,
                                 "--name", f"w{i}", "--idle", "4", *(["--flaky"] if i == 1 else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (1, 2)]
    try:
        outputs = [w.communicate(timeout=90)[0].decode() for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert all(w.returncode == 0 for w in workers), outputs
    done = sum(int(out.split(": ")[1].split()[0]) for out in outputs)
    assert done == 96, outputs  # every job once, except the four poison jobs
    assert "4 dead letters: {'max_deliveries': 4}" in run_example("work_queue.py", "dead", *connection, "--idle", "2")
