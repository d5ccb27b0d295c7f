"""CLI commands that find the cluster by mDNS alone (issue #16 item 1; SPEC §4.2: "every command that talks to a
cluster works with mDNS alone"): three `meshq node` processes with mDNS pinned to 127.0.0.1, and client commands
with no --seed."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from tests.multinode.helpers import node_id, wait_until
from tests.procs import MESHQ, TIME_SCALE, child_env

pytestmark = pytest.mark.timeout(240)


def cli(*args: str, input_bytes: bytes | None = None, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
    """``meshq ARGS`` with no seed or interface from the environment: only what the test says."""
    env = child_env()
    for name in ("MESHQ_SEEDS", "MESHQ_INTERFACES", "MESHQ_CLUSTER"):
        env.pop(name, None)
    return subprocess.run([*MESHQ, *args], input=input_bytes, capture_output=True, env=env,
                          timeout=timeout_s * TIME_SCALE)


def by_mdns(cluster: str) -> list[str]:
    return ["--cluster", cluster, "--interface", "127.0.0.1"]


def status_json(cluster: str) -> dict | None:
    result = cli("status", "--json", *by_mdns(cluster))
    return json.loads(result.stdout) if result.returncode == 0 else None


def test_status_produce_consume_with_mdns_alone_and_clients_leave_when_done(mesh):
    nodes = mesh.start(3, mdns=True)
    ids = {node_id(n) for n in nodes}

    def all_alive() -> dict | None:
        status = status_json(mesh.cluster)
        if status is None:
            return None
        storage = {m["node_id"] for m in status["members"] if m["role"] == "storage" and m["state"] == "alive"}
        return status if storage == ids else None

    status = wait_until(all_alive, 60 * TIME_SCALE, "meshq status (no --seed) to list the 3 nodes as alive")
    assert status["cluster"] == mesh.cluster

    values = [f"mdns-{i}" for i in range(50)]
    produced = cli("produce", "by-mdns", "--json", *by_mdns(mesh.cluster),
                   input_bytes="".join(v + "\n" for v in values).encode())
    assert produced.returncode == 0, produced.stderr.decode()
    assert len(produced.stdout.decode().splitlines()) == len(values)

    consumed = cli("consume", "by-mdns", "--timeout", "3", "--max", str(len(values)), *by_mdns(mesh.cluster))
    assert consumed.returncode == 0, consumed.stderr.decode()
    assert sorted(consumed.stdout.decode().splitlines()) == sorted(values)

    # The produce and consume clients said goodbye when they ended: a status asked now lists one client, itself.
    def only_this_client() -> list[dict] | None:
        status = status_json(mesh.cluster)
        if status is None:
            return None
        clients = [m for m in status["members"] if m["role"] == "client"]
        return clients if len(clients) == 1 else None

    clients = wait_until(only_this_client, 30 * TIME_SCALE, "status to list no client but the asking one")
    assert clients[0]["state"] == "alive"
    assert clients[0]["address"].startswith("tcp://127.0.0.1:")  # it reached the cluster through loopback


def test_a_cluster_nobody_serves_is_named_with_the_cluster_that_answered(mesh):
    mesh.start(1, mdns=True)
    nobody = f"nobody-{uuid.uuid4().hex[:8]}"
    result = cli("status", *by_mdns(nobody), timeout_s=60)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for expected in (repr(nobody), "127.0.0.1", repr(mesh.cluster), "--cluster"):
        assert expected in lines[0], lines[0]


def test_a_cluster_nobody_serves_fails_in_seconds_not_the_command_timeout():
    nobody = f"nobody-{uuid.uuid4().hex[:8]}"
    # produce waits up to --timeout 120 s for each record; finding nobody must not wait for that
    result = cli("produce", "t", "--timeout", "120", *by_mdns(nobody), input_bytes=b"x\n", timeout_s=60)
    assert result.returncode == 1
    message = result.stderr.decode().strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert repr(nobody) in message and "127.0.0.1" in message and "mDNS" in message, message


@pytest.mark.parametrize("command", [["status"], ["produce", "t"], ["consume", "t"], ["topics", "list"],
                                     ["leave", "--node-id", "n1"]])
def test_no_mdns_without_seed_is_a_usage_error(command):
    result = cli(*command, "--no-mdns", "--cluster", "x", input_bytes=b"", timeout_s=30)
    assert result.returncode == 2
    message = result.stderr.decode().strip()
    assert len(message.splitlines()) == 1 and "--no-mdns" in message and "--seed" in message, message


def test_an_interface_that_does_not_exist_is_one_line_and_exit_2(tmp_path):
    for command in (["status", "--cluster", "x"],
                    ["node", "--data", str(tmp_path / "n"), "--port", "0", "--cluster", "x"]):
        result = cli(*command, "--interface", "10.254.254.254", timeout_s=30)
        assert result.returncode == 2, result.stderr.decode()
        message = result.stderr.decode().strip()
        assert len(message.splitlines()) == 1 and "Traceback" not in message, message
        assert "--interface 10.254.254.254" in message, message


def test_bench_produce_measures_a_cluster_found_by_mdns(mesh):
    node = mesh.start(1, mdns=True)[0]
    result = cli("bench", "produce", "--records", "2000", "--sync-records", "20", "--batch", "100", "--json",
                 *by_mdns(mesh.cluster), timeout_s=120)
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["config"]["node"] == f"external {node.seed}"
    assert report["meshq"]["verification"]["ok"] is True


def test_bench_scenarios_that_start_their_own_nodes_refuse_interface():
    for scenario in ("replication", "rebalance"):
        result = cli("bench", scenario, "--interface", "127.0.0.1", timeout_s=30)
        assert result.returncode == 2
        assert "--interface" in result.stderr.decode(), result.stderr.decode()
