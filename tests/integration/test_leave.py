"""`meshq leave` and ``Node.leave()``: flags, errors, and a real leave with two in-process storage nodes.

The multi-process scenarios (a leave under load, a join, a member timeout) are in
``tests/multinode/test_rebalance.py``; these are the quick ones.
"""

from __future__ import annotations

import json
import os
import time

import pytest

import meshq
from meshq.cli import build_parser
from tests.procs import free_port, run_cli

pytestmark = pytest.mark.timeout(90)

TOPIC = "leaving"


def topic_dirs(data_dir: str) -> list[str]:
    root = os.path.join(data_dir, "topics")
    return sorted(name for name in os.listdir(root) if name.startswith(f"{TOPIC}-")) if os.path.isdir(root) else []


@pytest.fixture
def pair(tmp_path):
    """Two storage nodes in this process and a topic replicated on both."""
    first = meshq.Node(cluster="leave-it", data_dir=tmp_path / "n1", mdns=False, node_id="n1",
                       replication_factor=2, partitions=4).start()
    second = None
    try:
        second = meshq.Node(cluster="leave-it", data_dir=tmp_path / "n2", mdns=False, node_id="n2",
                            seeds=[first.address.removeprefix("tcp://")], replication_factor=2, partitions=4).start()
        deadline = time.monotonic() + 20
        while first.status(node_id="n1")["metadata"]["voters"] != ["n1", "n2"]:  # both in the agreed membership
            assert time.monotonic() < deadline, "n2 was not admitted to the storage membership"
            time.sleep(0.05)
        first.create_topic(TOPIC, partitions=4, replication_factor=2)
        first.produce_batch(TOPIC, [b"v%d" % i for i in range(200)], keys=[b"k%d" % i for i in range(200)],
                            acks="all").result(20)
        assert len(topic_dirs(str(tmp_path / "n2"))) == 4
        yield first, second
    finally:
        if second is not None:
            second.stop()
        first.stop()


def settled_on_first(node: meshq.Node) -> bool:
    status = node.status(node_id="n1")
    partitions = next(t["partitions"] for t in status["topics"] if t["name"] == TOPIC)
    return status["metadata"]["voters"] == ["n1"] and all(p["replicas"] == ["n1"] and not p["learners"]
                                                           for p in partitions)


def all_values(node: meshq.Node) -> list[bytes]:
    consumer = node.consumer(TOPIC, start="earliest")
    try:
        values: list[bytes] = []
        while True:
            records = consumer.poll(timeout=1.0)
            if not records:
                return sorted(values)
            values.extend(r.value for r in records)
    finally:
        consumer.close()


def test_leave_flags_and_defaults():
    args = build_parser().parse_args(["leave", "--seed", "127.0.0.1:7450"])
    assert (args.node_id, args.timeout, args.seed) == (None, 300.0, ["127.0.0.1:7450"])
    args = build_parser().parse_args(["node", "--data", "d", "--member-timeout", "8"])
    assert args.member_timeout == 8.0
    assert build_parser().parse_args(["node", "--data", "d"]).member_timeout == 300.0

    result = run_cli("leave", "--no-mdns")  # no node named, no seed: refuse rather than guess
    assert result.returncode == 2 and b"--node-id" in result.stderr, result.stderr
    result = run_cli("leave", "--no-mdns", "--timeout", "0", "--node-id", "x")
    assert result.returncode == 2 and b"greater than 0" in result.stderr
    result = run_cli("node", "--data", "d", "--member-timeout", "soon")
    assert result.returncode == 2 and b"number of seconds" in result.stderr


def test_leave_fails_clearly_when_no_node_answers():
    result = run_cli("leave", "--node-id", "x", "--timeout", "2", "--cluster", "nobody", "--no-mdns",
                     "--seed", f"127.0.0.1:{free_port()}", timeout_s=60)
    assert result.returncode == 1, result.stderr
    assert b"meshq leave:" in result.stderr and b"storage node" in result.stderr


def test_meshq_leave_of_the_node_at_the_seed_moves_its_partitions_and_stops_it(pair):
    first, second = pair
    seed = second.address.removeprefix("tcp://")
    result = run_cli("leave", "--cluster", "leave-it", "--seed", seed, "--no-mdns", "--timeout", "60", timeout_s=80)
    out = result.stdout.decode()
    assert result.returncode == 0, f"{out}\n{result.stderr.decode()}"
    assert "asking node n2 to leave" in out and "node n2 left the cluster" in out, out
    deadline = time.monotonic() + 10
    while not second.has_left and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.has_left, "the embedded node must stop by itself once it has left"
    with pytest.raises(meshq.NodeStoppedError, match="left the cluster"):
        second.produce(TOPIC, b"late")
    assert settled_on_first(first)
    assert topic_dirs(second.config.data_dir) == [], "the copies of the node that left are deleted"
    assert all_values(first) == sorted(b"v%d" % i for i in range(200))
    # asking again is harmless: it left already
    again = run_cli("leave", "--node-id", "n2", "--cluster", "leave-it", "--no-mdns", "--timeout", "20",
                    "--seed", first.address.removeprefix("tcp://"), timeout_s=60)
    assert again.returncode == 0 and b"left the cluster" in again.stdout, again.stderr


def test_node_leave_hands_everything_over_then_stops_the_node(pair):
    first, second = pair
    answers: list[dict] = []
    second.leave(timeout=60, progress=answers.append)
    assert answers[-1] == {"state": "left", "assigned": 0}
    assert any(a["state"] == "draining" for a in answers), answers
    with pytest.raises(meshq.NodeStoppedError):
        second.status()
    deadline = time.monotonic() + 10
    while not settled_on_first(first) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert settled_on_first(first)
    assert topic_dirs(second.config.data_dir) == []
    assert all_values(first) == sorted(b"v%d" % i for i in range(200))


def test_leave_refuses_unknown_client_and_stopped_nodes(pair, tmp_path):
    first, second = pair
    with pytest.raises(meshq.UsageError, match="no node 'nope'.*n1, n2"):
        first.leave(node_id="nope", timeout=5)
    with meshq.Node(cluster="leave-it", role="client", mdns=False,
                    seeds=[first.address.removeprefix("tcp://")]) as client:
        client.wait_ready(timeout=10)
        with pytest.raises(meshq.UsageError, match="client node holds no partitions"):
            client.leave(timeout=5)
        second.stop()  # a clean stop: still a member, but not running
        with pytest.raises(meshq.NoRespondersError, match="n2 is not running"):
            client.leave(node_id="n2", timeout=5)
    assert first.status()["metadata"]["voters"] == ["n1", "n2"], "a refused leave changes nothing"


def test_a_node_that_stops_just_after_the_first_check_is_reported_not_running(pair, monkeypatch):
    """The check before asking can see a node alive that is stopping (a view not yet updated):
    the asks then go unanswered, and the failure names the stopped node instead of a timeout."""
    first, second = pair
    checks = []
    real_check = meshq.Node._check_can_leave

    def stale_first_view(self, node_id, timeout_s):
        checks.append(node_id)
        if len(checks) == 1:
            return False  # "n2 is alive": what a view from before the stop says
        return real_check(self, node_id, timeout_s)

    monkeypatch.setattr(meshq.Node, "_check_can_leave", stale_first_view)
    second.stop()
    with pytest.raises(meshq.NoRespondersError, match="n2 is not running"):
        first.leave(node_id="n2", timeout=5)
    assert checks == ["n2", "n2"]


def test_meshq_leave_json_prints_one_outcome_object(pair):
    first, second = pair
    result = run_cli("leave", "--json", "--node-id", "n2", "--cluster", "leave-it", "--no-mdns", "--timeout", "60",
                     "--seed", first.address.removeprefix("tcp://"), timeout_s=80)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, lines  # no progress lines, no prose: one object
    outcome = json.loads(lines[0])
    assert outcome["event"] == "left" and outcome["node_id"] == "n2" and outcome["cluster"] == "leave-it"
    assert outcome["assigned"] == 0 and outcome["elapsed_s"] >= 0
    deadline = time.monotonic() + 10
    while not second.has_left and time.monotonic() < deadline:
        time.sleep(0.05)
    assert settled_on_first(first)


def test_meshq_leave_json_failure_names_the_error():
    result = run_cli("leave", "--json", "--node-id", "x", "--timeout", "2", "--cluster", "nobody", "--no-mdns",
                     "--seed", f"127.0.0.1:{free_port()}", timeout_s=60)
    assert result.returncode == 1, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["event"] == "failed" and outcome["node_id"] == "x" and outcome["error"] == "no_responders"
    assert "storage node" in outcome["message"] and b"meshq leave:" in result.stderr
    usage = run_cli("leave", "--json", "--no-mdns")
    assert usage.returncode == 2 and json.loads(usage.stdout)["event"] == "failed"
