"""Pub/sub between real Nodes in one process (ZeroMQ on 127.0.0.1), and `meshq pub` / `meshq sub`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

import meshq
from meshq.errors import InvalidSubjectError, MessageTooLargeError, SubscriptionClosedError
from tests.procs import child_env, end_process

pytestmark = pytest.mark.timeout(90)
CLUSTER = "ps-it"


def wait_for(condition, within_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {within_s} s"
        time.sleep(0.02)


def interested(node: meshq.Node, subject: str, count: int, plain: tuple[str, ...] = (), members: int = 0) -> None:
    """Wait until ``node`` routes ``subject`` to ``count`` other nodes (plain or queue members),
    ``plain`` among the nodes without a queue group, and ``members`` queue group members."""
    def ready() -> bool:
        route = node.core.pubsub.route(subject)
        nodes = set(route.remote) | {member[0] for group in route.groups for member in group.members}
        nodes.discard(node.node_id)
        return (len(nodes) >= count and set(plain) <= set(route.remote)
                and sum(len(group.members) for group in route.groups) >= members)
    wait_for(ready, what=f"interest in {subject} from {count} nodes")


@pytest.fixture
def mesh(tmp_path):
    """A storage node and two client nodes joined through it."""
    storage = meshq.Node(cluster=CLUSTER, data_dir=tmp_path / "s", mdns=False, replication_factor=1).start()
    nodes = [storage]
    try:
        seed = storage.address.removeprefix("tcp://")
        for _ in range(2):
            nodes.append(meshq.Node(cluster=CLUSTER, role="client", mdns=False, seeds=[seed]).start())
        for node in nodes[1:]:
            node.wait_ready(10)
        yield nodes
    finally:
        for node in reversed(nodes):
            node.stop()


def test_wildcards_reach_matching_subscriptions_on_every_node_and_locally(mesh):
    a, b, c = mesh
    on_b = b.subscribe("sensors.*.temp")
    on_c = c.subscribe("sensors.>")
    on_a = a.subscribe("sensors.kitchen.temp")
    interested(a, "sensors.kitchen.temp", 2)
    a.publish("sensors.kitchen.temp", b"21.5", headers={"unit": b"C"})
    a.publish("sensors.kitchen.humidity", b"40")
    a.publish("other.kitchen.temp", b"nobody")
    for sub in (on_a, on_b, on_c):
        message = sub.recv(timeout=5)
        assert (message.subject, message.data, message.headers, message.source) == \
            ("sensors.kitchen.temp", b"21.5", {"unit": b"C"}, a.node_id)
    assert on_c.recv(timeout=5).subject == "sensors.kitchen.humidity"
    for sub in (on_a, on_b, on_c):
        with pytest.raises(meshq.TimeoutError):
            sub.recv(timeout=0.3)


def test_the_runtime_flush_never_waits_behind_a_publisher(mesh):
    """A publisher mid-burst holds the publish lock: the runtime thread's flush does not queue behind it
    (they took turns for the lock and the GIL, costing the publisher ~12 % of its rate), it looks again
    shortly, and the tail of the burst still goes out."""
    a, b, _c = mesh
    sub = b.subscribe("burst.tail")
    interested(a, "burst.tail", 1)
    shell = a._pubsub
    flushed = threading.Event()
    with shell.lock:  # as a publishing thread holds it
        shell._buffers[b.node_id] = [("burst.tail", None, None, b"tail")]  # its buffer, not yet full
        helper = threading.Thread(target=lambda: (shell._flush_from_runtime(), flushed.set()))
        helper.start()
        assert flushed.wait(2), "the flush waited for the publisher's lock"
        assert b.node_id in shell._buffers  # nothing sent under the publisher's feet
    helper.join(5)
    message = sub.recv(timeout=5)  # sent by the flush's second look, on the runtime thread
    assert (message.subject, message.data) == ("burst.tail", b"tail")


def test_mid_burst_a_publisher_sends_what_the_runtime_flush_could_not(mesh):
    """The runtime thread's flush gives way to a publisher mid-burst: so the publisher sends every buffer
    once that flush has waited over 1 ms, and a message its burst does not push out (another node) is not
    held for as long as the burst lasts."""
    a, b, c = mesh
    on_b, on_c = b.subscribe("burst.hot"), c.subscribe("burst.cold")
    interested(a, "burst.hot", 1)
    interested(a, "burst.cold", 1)
    shell = a._pubsub
    with shell.lock:  # a flush asked for long ago and still waiting (it gives way while a publisher holds the lock)
        shell._buffers[c.node_id] = [("burst.cold", None, None, b"waiting")]
        shell._flush_asked = True
        shell._asked_s = time.monotonic() - 1.0
    a.publish("burst.hot", b"new")  # the burst's next message: to another node
    assert on_c.recv(timeout=5).data == b"waiting"
    assert on_b.recv(timeout=5).data == b"new"


def test_a_queue_group_splits_messages_each_to_exactly_one_member(mesh):
    a, b, c = mesh
    members = [b.subscribe("jobs.*", queue="workers"), c.subscribe("jobs.*", queue="workers"),
               c.subscribe("jobs.>", queue="workers")]
    watcher = b.subscribe("jobs.*")  # not in the group: sees everything
    interested(a, "jobs.x", 2, plain=(b.node_id,), members=3)
    total = 600
    for i in range(total):
        a.publish("jobs.x", b"%d" % i)
    seen = [watcher.recv(timeout=5).data for _ in range(total)]
    assert seen == [b"%d" % i for i in range(total)]  # and in order
    got: list[list[bytes]] = [[] for _ in members]
    wait_for(lambda: sum(m.pending for m in members) == total, what="every job delivered")
    for index, member in enumerate(members):
        while member.pending:
            got[index].append(member.recv(timeout=1).data)
    everything = Counter(data for one in got for data in one)
    assert len(everything) == total and set(everything.values()) == {1}, "each job to exactly one member"
    assert all(len(one) > total // 10 for one in got), [len(one) for one in got]  # spread across members
    for one in got:
        assert one == sorted(one, key=int)  # each member sees the publisher's order


def test_closing_withdraws_interest_and_a_publisher_without_subscribers_sends_nothing(mesh):
    a, b, _c = mesh
    sub = b.subscribe("news.>")
    interested(a, "news.today", 1)
    a.publish("news.today", b"first")
    assert sub.recv(timeout=5).data == b"first"
    sub.close()
    wait_for(lambda: not a.core.pubsub.route("news.today").remote, what="interest withdrawn")
    sent_before = a.core.pubsub.peers[b.node_id].sent
    no_interest_before = a.core.pubsub.counters["no_interest"]
    for _ in range(100):
        a.publish("news.today", b"to nobody")
    assert a.core.pubsub.peers[b.node_id].sent == sent_before  # not one frame sent
    assert a.core.pubsub.counters["no_interest"] == no_interest_before + 100
    with pytest.raises(SubscriptionClosedError):
        sub.recv(timeout=1)


def test_a_slow_subscriber_drops_and_counts_without_blocking_the_publisher(mesh):
    a, b, _c = mesh
    slow = b.subscribe("load", max_pending=100)
    fast = b.subscribe("load")
    interested(a, "load", 1)
    for i in range(2000):
        a.publish("load", b"%d" % i)
    # (2,000 frames fit in the sockets' high-water marks: only the slow queue can drop)
    wait_for(lambda: fast.delivered == 2000, what="the burst arrived")
    assert slow.delivered == 100 and slow.dropped == 1900
    status = a.status()
    (b_report,) = [n for n in status["pubsub"]["nodes"] if n["node_id"] == b.node_id]
    by_id = {s["id"]: s for s in b_report["subscriptions"]}
    assert by_id[slow.sub_id]["dropped"] == slow.dropped and by_id[slow.sub_id]["pattern"] == "load"
    assert [slow.recv(timeout=1).data for _ in range(3)] == [b"0", b"1", b"2"]  # the first ones were kept


def test_bad_input_is_refused_with_the_rule(mesh):
    a = mesh[0]
    with pytest.raises(ValueError, match="empty token"):
        a.publish("a..b", b"x")
    with pytest.raises(InvalidSubjectError, match="wildcard"):
        a.publish("a.*", b"x")
    with pytest.raises(ValueError, match="'>' may only be the last token"):
        a.subscribe("a.>.b")
    with pytest.raises(ValueError, match="whitespace"):
        a.subscribe("a b")
    with pytest.raises(MessageTooLargeError, match="limit"):
        a.publish("big", b"x" * (2 * 1024 * 1024))


def test_iteration_ends_when_the_subscription_is_closed_from_another_thread(mesh):
    a = mesh[0]
    sub = a.subscribe("chat.*")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(m.data for m in sub))
    reader.start()
    for i in range(5):
        a.publish("chat.room", b"%d" % i)
    wait_for(lambda: len(got) == 5)
    sub.close()
    reader.join(5)
    assert not reader.is_alive() and got == [b"0", b"1", b"2", b"3", b"4"]


def test_stopping_the_node_ends_its_subscriptions(tmp_path):
    node = meshq.Node(cluster=CLUSTER, data_dir=tmp_path / "d", mdns=False, replication_factor=1).start()
    sub = node.subscribe("x")
    node.stop()
    with pytest.raises(SubscriptionClosedError):
        sub.recv(timeout=1)
    with pytest.raises(meshq.NodeStoppedError):
        node.publish("x", b"late")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshq", *args]


def test_cli_pub_and_sub_json_with_a_queue_group_and_count(mesh):
    a = mesh[0]
    seed = a.address.removeprefix("tcp://")
    connection = ["--cluster", CLUSTER, "--seed", seed, "--no-mdns"]
    sub = subprocess.Popen(_cli("sub", "greet.*", "--count", "3", "--json", "--timeout", "30", *connection),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        wait_for(lambda: any(n.get("subscriptions") for n in a.status()["pubsub"]["nodes"]
                             if n["node_id"] != a.node_id), within_s=30, what="the CLI subscriber")
        pub = subprocess.run(_cli("pub", "greet.world", *connection), input=b"hello\nwie gehts\n\xff\n",
                             capture_output=True, timeout=60, env=child_env())
        assert pub.returncode == 0, pub.stderr.decode()
        assert b"published 3 messages" in pub.stderr
        out, err = sub.communicate(timeout=30)
        assert sub.returncode == 0, err.decode()
        lines = [json.loads(line) for line in out.decode().splitlines()]
        assert [line.get("data", line.get("data_b64")) for line in lines] == ["hello", "wie gehts", "/w=="]
        assert all(line["subject"] == "greet.world" for line in lines)
    finally:
        end_process(sub)


def test_cli_refuses_a_bad_pattern_naming_the_rule():
    result = subprocess.run(_cli("sub", "a.>.b", "--seed", "127.0.0.1:9", "--no-mdns"), capture_output=True,
                            timeout=60, env=child_env())
    assert result.returncode != 0 and b"'>' may only be the last token" in result.stderr


def test_prometheus_endpoint_reports_subscriptions(tmp_path):
    import urllib.request

    from tests.procs import free_port

    port = free_port()
    with meshq.Node(cluster=CLUSTER, data_dir=tmp_path / "m", mdns=False, metrics_port=port,
                    replication_factor=1) as node:
        sub = node.subscribe("m.*", queue="q", max_pending=2)
        for _ in range(5):
            node.publish("m.x", b"v")
        node.publish("nobody", b"v")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        sub.close()
    labels = f'pattern="m.*",queue="q",subscription="{sub.sub_id}"'
    assert f"meshq_pubsub_delivered_total{{{labels}}} 2.0" in text
    assert f"meshq_pubsub_dropped_total{{{labels}}} 3.0" in text
    assert "meshq_pubsub_published_total 6.0" in text and "meshq_pubsub_no_interest_total 1.0" in text
