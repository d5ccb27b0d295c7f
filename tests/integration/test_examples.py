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
