"""The examples with their parts on different "hosts" (network namespaces on one bridge), finding
the mesh by mDNS alone on each host's own address: what a user does on several machines of a LAN.
Skipped unless root with iproute2."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.netns.lab import REPO, can_use_netns, child_env

pytestmark = [pytest.mark.skipif(not can_use_netns(), reason="network-namespace tests need root and iproute2 (ip netns)"),
              pytest.mark.timeout(300)]

EXAMPLES = os.path.join(REPO, "examples")


def example_argv(host, name: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", host.netns, sys.executable, os.path.join(EXAMPLES, name), *args,
            "--cluster", host.lab.cluster, "--interface", host.address]


def run_example(host, name: str, *args: str, timeout_s: float = 120.0) -> str:
    result = subprocess.run(example_argv(host, name, *args), capture_output=True, timeout=timeout_s, cwd=REPO,
                            env=child_env())
    assert result.returncode == 0, f"{name} {args} on {host.netns}: {result.stderr.decode()[-3000:]}"
    return result.stdout.decode()


class Background:
    """Example processes started in namespaces; each stopped by its PID at the end, even on failure."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, host, name: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(example_argv(host, name, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=REPO, env=child_env())
        self.procs.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen, timeout_s: float = 120.0) -> str:
        out, err = proc.communicate(timeout=timeout_s)
        assert proc.returncode == 0, err.decode()[-3000:]
        return out.decode()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # by PID: only processes this test started
                proc.wait(10)


@pytest.fixture
def background():
    procs = Background()
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def mesh(lab):
    """Storage nodes on h1 and h2; h3 runs only example processes (clients)."""
    h1, h2, _h3 = lab.hosts
    lab.start_node(h1)
    lab.start_node(h2)
    return lab


def test_rpc_pool_worker_on_one_host_answers_requests_from_another(mesh, background):
    h1, h2, h3 = mesh.hosts
    worker = background.start(h3, "rpc_pool.py", "worker", "--rounds", "10", "--seconds", "60")
    assert b"serving pool.hash" in worker.stdout.readline()
    out = run_example(h2, "rpc_pool.py", "ask", "--count", "50", "--wait", "30")
    assert "50 replies from 1 workers" in out, out  # all answered by the one worker, on h3
    worker.kill()


def test_chat_people_on_two_hosts_hear_each_other(mesh, background):
    h1, h2, h3 = mesh.hosts
    alice = background.start(h3, "chat.py", "--name", "alice", "--room", "lan", "--count", "2", "--listen", "90")
    assert b"alice joined" in alice.stderr.readline()
    run_example(h2, "chat.py", "--name", "bob", "--room", "lan", "--say", "hi alice", "--say", "bye",
                "--listen", "1", "--wait-for-others", "30")
    assert background.finish(alice).splitlines() == ["bob: hi alice", "bob: bye"]


def test_telemetry_dashboard_on_one_host_sees_sensors_on_others(mesh, background):
    h1, h2, h3 = mesh.hosts
    board = background.start(h3, "telemetry.py", "dashboard", "--pattern", "sensors.*.temp", "--count", "6",
                             "--seconds", "120")
    assert b"dashboard listening" in board.stdout.readline()
    for host, room in ((h1, "kitchen"), (h2, "hall")):
        out = run_example(host, "telemetry.py", "sensor", "--room", room, "--kind", "temp", "--count", "3",
                          "--interval", "0.01", "--wait-for-dashboard", "30")
        assert f"published 3 readings to sensors.{room}.temp" in out
    out = background.finish(board)
    assert "sensors.kitchen.temp: 3 readings" in out and "sensors.hall.temp: 3 readings" in out


def test_work_queue_workers_on_two_hosts_share_the_jobs(mesh, background):
    h1, h2, h3 = mesh.hosts
    assert "60 jobs queued" in run_example(h3, "work_queue.py", "produce", "--count", "60", "--poison-every", "20")
    workers = [background.start(host, "work_queue.py", "worker", "--name", name, "--idle", "6",
                                *(["--flaky"] if name == "w3" else []))
               for host, name in ((h2, "w2"), (h3, "w3"))]
    outputs = [background.finish(w, timeout_s=150) for w in workers]
    done = sum(int(out.split(": ")[1].split()[0]) for out in outputs)
    assert done == 57, outputs  # every job once, except the three poison jobs
    deadline = time.monotonic() + 60
    while True:
        out = run_example(h1, "work_queue.py", "dead", "--idle", "2")
        if "3 dead letters" in out or time.monotonic() > deadline:
            break
    assert "3 dead letters: {'max_deliveries': 3}" in out, out
