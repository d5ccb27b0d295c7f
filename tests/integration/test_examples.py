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
                      str(port), "--events", "5", "--run-for", "0")
    assert "read back 5 of my events" in out


def test_embedded_service_second_instance_joins_the_first_and_stores_its_events(tmp_path):
    """Run as its docstring says: the first instance keeps serving, so the second one's writes find
    their leaders (it used to exit a second after starting: NotEnoughReplicasError on the second)."""
    port = free_port()
    first = start_example("embedded_service.py", "--cluster", "ex2", "--data", str(tmp_path / "svc1"), "--port",
                          str(port), "--seed", f"127.0.0.1:{port}", "--events", "5")
    try:
        lines = []
        for line in first.stdout:
            lines.append(line.decode())
            if line.startswith(b"serving as a storage member"):
                break
        assert any("read back 5 of my events" in line for line in lines), lines
        out = run_example("embedded_service.py", "--cluster", "ex2", "--data", str(tmp_path / "svc2"), "--port",
                          str(free_port()), "--seed", f"127.0.0.1:{port}", "--events", "5", "--run-for", "0")
        assert "read back 5 of my events" in out
        assert first.poll() is None  # still serving
    finally:
        first.terminate()
        try:
            first.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            first.kill()
            first.communicate()
    assert first.returncode == 0


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


def start_example(name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(EXAMPLES, name), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_chat_two_people_in_a_room_hear_each_other(node_processes):
    from tests.procs import end_process

    node = node_processes("n1")
    connection = ["--cluster", node.cluster, "--seed", node.seed]
    alice = start_example("chat.py", *connection, "--name", "alice", "--room", "lobby", "--count", "2",
                          "--listen", "60")
    try:
        assert b"alice joined" in alice.stderr.readline()
        bob = run_example("chat.py", *connection, "--name", "bob", "--room", "lobby", "--say", "hi alice",
                          "--say", "bye", "--listen", "0.5")
        assert "bob" not in bob  # nobody else spoke; bob does not hear himself
        out, err = alice.communicate(timeout=60)
        assert alice.returncode == 0, err.decode()
        assert out.decode().splitlines() == ["bob: hi alice", "bob: bye"]
    finally:
        end_process(alice)


def test_telemetry_dashboard_sees_the_matching_sensors_only(node_processes):
    from tests.procs import end_process

    node = node_processes("n1")
    connection = ["--cluster", node.cluster, "--seed", node.seed]
    board = start_example("telemetry.py", "dashboard", *connection, "--pattern", "sensors.*.temp", "--count", "6",
                          "--seconds", "60")
    try:
        assert b"dashboard listening" in board.stdout.readline()
        for room in ("kitchen", "hall"):
            out = run_example("telemetry.py", "sensor", *connection, "--room", room, "--kind", "temp",
                              "--count", "3", "--interval", "0.01")
            assert f"published 3 readings to sensors.{room}.temp" in out
        run_example("telemetry.py", "sensor", *connection, "--room", "hall", "--kind", "humidity", "--count", "2",
                    "--interval", "0.01", "--wait-for-dashboard", "0.5")
        out_bytes, err = board.communicate(timeout=60)
        assert board.returncode == 0, err.decode()
        out = out_bytes.decode()
        assert "sensors.kitchen.temp: 3 readings" in out and "sensors.hall.temp: 3 readings" in out
        assert "humidity" not in out
    finally:
        end_process(board)


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
