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


def test_rpc_pool_spreads_requests_over_its_workers(node_processes):
    node = node_processes("n1")
    connection = ["--cluster", node.cluster, "--seed", node.seed]
    workers = [subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "rpc_pool.py"), "worker", *connection,
                                 "--concurrency", "2", "--rounds", "2000", "--seconds", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        for worker in workers:
            assert worker.stdout.readline().startswith(b"worker "), worker.stderr.read().decode()
        out = run_example("rpc_pool.py", "ask", *connection, "--count", "400", "--window", "16")
        assert out.startswith("400 replies from 2 workers"), out
    finally:
        for worker in workers:
            worker.terminate()  # by PID
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(5)
            worker.stdout.close()
            worker.stderr.close()
