"""Shared (work-queue) subscriptions on a real in-process Node (ZeroMQ on 127.0.0.1, file log)."""

from __future__ import annotations

import time

import pytest

import meshq
from meshq.errors import UsageError

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def node(tmp_path):
    with meshq.Node(cluster="sh", data_dir=tmp_path / "data", mdns=False, partitions=2,
                    replication_factor=1) as n:
        yield n


def poll_until(consumer, want: int, timeout_s: float = 20.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline:
        out.extend(consumer.poll(timeout=0.5))
    return out


def test_each_record_goes_to_one_member_and_acks_are_durable(node):
    node.create_topic("jobs", partitions=2, replication_factor=1)
    node.produce_batch("jobs", [f"j{i}".encode() for i in range(200)]).result(10)
    a = node.consumer("jobs", group="w", mode="shared", ack_timeout=30.0)
    b = node.consumer("jobs", group="w", mode="shared", ack_timeout=30.0, prefetch=20)
    seen: list = []
    acked_by_a: set = set()
    deadline = time.monotonic() + 20
    while len(seen) < 200 and time.monotonic() < deadline:
        for consumer in (a, b):
            for record in consumer.poll(timeout=0.2, max_records=10):
                seen.append(record.value)
                assert record.headers["meshq-delivery-count"] == b"1"
                consumer.ack(record)
                if consumer is a:
                    acked_by_a.add(record.value)
    assert sorted(seen) == sorted(f"j{i}".encode() for i in range(200)), "every record once, no duplicate"
    a.flush_acks()
    b.flush_acks()
    assert a.stats["acked"] + b.stats["acked"] == 200
    assert a.stats["stale"] == b.stats["stale"] == 0
    with pytest.raises(UsageError, match="not held by this consumer"):
        (a if record.value in acked_by_a else b).ack(record)  # acked already: refused, nothing changes
    a.close()
    b.close()
    c = node.consumer("jobs", group="w", mode="shared")
    assert c.poll(timeout=1.0) == [], "acked records are never handed out again"
    c.close()
    groups = {g["group"]: g for g in node.status()["groups"]}
    assert groups["w"]["mode"] == "shared"
    assert sum(p["acked"] for p in groups["w"]["partitions"]) == 200
    assert all(p["lag"] == 0 and p["in_flight"] == 0 for p in groups["w"]["partitions"])


def test_redelivery_after_timeout_then_dead_letter(node):
    node.create_topic("retry", partitions=1, replication_factor=1)
    node.produce("retry", b"poison", key=b"k")
    c = node.consumer("retry", group="w", mode="shared", ack_timeout=0.3, max_deliveries=3)
    counts = []
    for record in poll_until(c, 3, 15):
        counts.append(int(record.headers["meshq-delivery-count"]))  # never acked: times out
    assert counts == [1, 2, 3]
    assert c.poll(timeout=1.5) == [], "a dead-lettered record is not delivered again"
    assert node.topic("retry.dlq").partitions == 1, "created by the leader like its source topic"
    dlq = node.consumer("retry.dlq")
    (dead,) = poll_until(dlq, 1, 15)
    assert dead.value == b"poison" and dead.key == b"k"
    assert dead.headers["meshq-dlq-reason"] == b"max_deliveries"
    assert dead.headers["meshq-original-partition"] == b"0"
    assert dead.headers["meshq-original-offset"] == b"0"
    c.close()


def test_nack_delay_and_reject(node):
    node.create_topic("n", partitions=1, replication_factor=1)
    node.produce("n", b"again")
    node.produce("n", b"bad")
    c = node.consumer("n", group="w", mode="shared")
    first = poll_until(c, 2)
    by_value = {r.value: r for r in first}
    c.nack(by_value[b"again"], delay=0.5)
    c.nack(by_value[b"bad"], requeue=False)
    started = time.monotonic()
    (again,) = poll_until(c, 1)
    assert again.value == b"again" and again.headers["meshq-delivery-count"] == b"2"
    assert time.monotonic() - started >= 0.3, "a nack delay holds the record back"
    c.ack(again)
    c.flush_acks()
    (dead,) = poll_until(node.consumer("n.dlq"), 1)
    assert dead.value == b"bad" and dead.headers["meshq-dlq-reason"] == b"rejected"
    c.close()


def test_delayed_and_prioritised_records(node):
    node.create_topic("d", partitions=1, replication_factor=1)
    now = time.time()
    node.produce("d", b"later", delay=1.0)
    node.produce("d", b"at", deliver_at=now + 1.0)
    node.produce("d", b"low", priority=0)
    node.produce("d", b"high", priority=9)
    node.produce("d", b"normal")
    c = node.consumer("d", group="w", mode="shared", prefetch=1)
    order = []
    for _ in range(3):
        (record,) = c.poll(timeout=5, max_records=1)
        order.append(record.value)
        c.ack(record)
    assert order == [b"high", b"normal", b"low"]
    late = poll_until(c, 2, 10)
    assert sorted(r.value for r in late) == [b"at", b"later"]
    assert time.time() >= int((now + 1.0) * 1000) / 1000  # deliver-at has millisecond resolution
    c.close()


@pytest.mark.parametrize("kwargs, rule", [
    ({"delay": -1}, "delay must be"),
    ({"delay": 1, "deliver_at": 5}, "not both"),
    ({"priority": 10}, "priority must be"),
    ({"priority": "9"}, "priority must be"),
])
def test_bad_scheduling_arguments_are_refused(node, kwargs, rule):
    with pytest.raises(UsageError, match=rule):
        node.produce("bad", b"v", **kwargs)


def test_a_stream_consumer_gets_a_delayed_record_no_earlier_than_its_time_in_partition_order(node):
    node.create_topic("s", partitions=1, replication_factor=1)
    due = time.time() + 1.0
    node.produce("s", b"first")
    node.produce("s", b"delayed", deliver_at=due)
    node.produce("s", b"after")
    c = node.consumer("s", group="readers")
    got = []
    deadline = time.monotonic() + 15
    while len(got) < 3 and time.monotonic() < deadline:
        for record in c.poll(timeout=0.5):
            got.append((record.value, time.time()))
    assert [v for v, _t in got] == [b"first", b"delayed", b"after"]
    due = int(due * 1000) / 1000  # deliver-at has millisecond resolution
    assert got[1][1] >= due and got[2][1] >= due, "the delayed record holds back its partition until due"
    c.close()


def test_acks_and_delays_survive_a_restart_of_the_node(tmp_path):
    data = tmp_path / "restart"
    options = dict(cluster="shr", data_dir=data, mdns=False, partitions=1, replication_factor=1)
    with meshq.Node(**options) as node:
        node.create_topic("r", partitions=1, replication_factor=1)
        node.produce_batch("r", [f"j{i}".encode() for i in range(10)]).result(10)
        due = time.time() + 12.0
        node.produce("r", b"late", deliver_at=due)
        c = node.consumer("r", group="w", mode="shared")
        got = poll_until(c, 10)
        for record in got[:6]:
            c.ack(record)
        c.close()  # acks confirmed; the four records it still holds are given back
    restarted_at = time.time()
    with meshq.Node(**options) as node:  # the shared state is replayed from the partition's control batches
        c = node.consumer("r", group="w", mode="shared", ack_timeout=1.0)
        again = poll_until(c, 4, 20)
        assert sorted(r.value for r in again) == sorted(r.value for r in got[6:]), "acked records stay acked"
        for record in again:
            c.ack(record)
        assert [r.headers["meshq-delivery-count"] for r in again] == [b"2"] * 4
        (late,) = poll_until(c, 1, 30)
        # (deliver-at has millisecond resolution: the header holds unix ms)
        assert late.value == b"late" and time.time() >= int(due * 1000) / 1000 and due > restarted_at, \
            "not before its time, after a restart"
        c.ack(late)
        c.close()
