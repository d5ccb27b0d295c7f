"""A real Node (runtime thread, ZeroMQ on 127.0.0.1, file log) used in-process."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import zmq

import meshq

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def node(tmp_path):
    with meshq.Node(cluster="it", data_dir=tmp_path / "data", mdns=False, partitions=4) as n:
        yield n


def drain(consumer, idle_s: float = 0.5) -> list:
    out = []
    while True:
        records = consumer.poll(timeout=idle_s)
        if not records:
            return out
        out.extend(records)


def test_produce_variants_and_consume_everything_in_order(node):
    first = node.produce("orders", b"sync", key=b"k1")
    futures = [node.produce_async("orders", f"async-{i}".encode(), key=b"k1") for i in range(300)]
    node.flush(timeout=10)
    batch = node.produce_batch("orders", [b"b1", b"b2"], keys=[b"k1", b"k1"]).result(10)
    offsets = [first.offset] + [f.result().offset for f in futures] + [md.offset for md in batch]
    assert offsets == list(range(first.offset, first.offset + 303)), "one key, one partition, dense offsets"
    records = drain(node.consumer("orders"))
    mine = [r for r in records if r.key == b"k1"]
    assert [r.value for r in mine] == [b"sync"] + [f"async-{i}".encode() for i in range(300)] + [b"b1", b"b2"]
    assert all(r.partition == first.partition for r in mine)


def test_records_keep_headers_and_timestamps(node):
    md = node.produce("h", b"v", headers={"trace": b"abc"}, timestamp_ms=1234)
    assert md.timestamp_ms == 1234
    (record,) = drain(node.consumer("h"))
    assert record.headers == {"trace": b"abc"} and record.timestamp_ms == 1234 and record.offset == md.offset


def test_group_commit_resume_and_start_positions(node):
    node.create_topic("g", partitions=1)
    node.produce_batch("g", [f"{i}".encode() for i in range(10)], partition=0).result(10)
    consumer = node.consumer("g", group="billing", auto_commit=False)
    got = consumer.poll(timeout=2, max_records=4)
    assert [r.offset for r in got] == [0, 1, 2, 3]
    consumer.commit()
    consumer.close()
    resumed = node.consumer("g", group="billing")
    assert [r.offset for r in drain(resumed)] == list(range(4, 10))
    resumed.close()  # auto-commit stores its position on close
    latest = node.consumer("g", start="latest")
    assert drain(latest, 0.2) == []
    node.produce("g", b"new", partition=0)
    assert [r.value for r in drain(latest)] == [b"new"]
    from_offset = node.consumer("g", start=7)
    assert [r.offset for r in drain(from_offset)] == [7, 8, 9, 10]
    from_offset.seek(0, "earliest")
    assert drain(from_offset)[0].offset == 0
    by_time = node.consumer("g", start=dt.datetime.now() + dt.timedelta(hours=1))
    assert drain(by_time, 0.2) == []
    lag = {p["partition"]: p["lag"] for g in node.status()["groups"] if g["group"] == "billing"
           for p in g["partitions"]}
    assert lag == {0: 1}


def test_data_and_topic_config_survive_a_restart(tmp_path):
    data = tmp_path / "data"
    with meshq.Node(cluster="it", data_dir=data, mdns=False) as n:
        n.create_topic("kept", partitions=3, retention_ms=60_000)
        n.produce_batch("kept", [b"a", b"b", b"c"], partition=2, acks="leader").result(10)
        node_id = n.node_id
    with meshq.Node(cluster="it", data_dir=data, mdns=False, partitions=8) as n:
        assert n.node_id == node_id
        config = n.topic("kept")
        assert (config.partitions, config.retention_ms) == (3, 60_000)
        assert [r.value for r in drain(n.consumer("kept"))] == [b"a", b"b", b"c"]


def test_a_second_node_on_the_same_data_dir_is_refused(tmp_path, node):
    with pytest.raises(meshq.DataDirLockedError, match="already used by another meshq node"):
        meshq.Node(cluster="it", data_dir=node.config.data_dir, mdns=False).start()


def test_a_data_dir_of_another_cluster_is_refused(tmp_path):
    with meshq.Node(cluster="one", data_dir=tmp_path / "d", mdns=False):
        pass
    with pytest.raises(meshq.ConfigError, match="belongs to cluster 'one'"):
        meshq.Node(cluster="two", data_dir=tmp_path / "d", mdns=False).start()


def test_client_role_node_produces_and_consumes_through_a_seed(node):
    seed = node.address.removeprefix("tcp://")
    with meshq.Node(cluster="it", seeds=[seed], mdns=False, role="client") as client:
        client.wait_ready(timeout=10)
        md = client.produce("via-client", b"hello", acks="leader")
        assert md.offset == 0
        assert [r.value for r in drain(client.consumer("via-client"))] == [b"hello"]
        members = {m["node_id"]: m["role"] for m in client.status()["members"]}
        assert members[node.node_id] == "storage" and members[client.node_id] == "client"


def test_a_client_of_another_cluster_is_not_served(node):
    seed = node.address.removeprefix("tcp://")
    with meshq.Node(cluster="other", seeds=[seed], mdns=False, role="client") as stranger:
        with pytest.raises(meshq.TimeoutError):
            stranger.wait_ready(timeout=1.0)
    assert node.status()["counters"]["frames_invalid"] >= 1


def test_misuse_gets_clear_errors(tmp_path, node):
    with pytest.raises(meshq.UsageError, match="acks must be one of"):
        node.produce("t", b"v", acks="most")
    with pytest.raises(meshq.InvalidTopicError, match="invalid topic name"):
        node.produce("bad topic!", b"v")
    with pytest.raises(meshq.UsageError, match="bytes"):
        node.produce("t", 12345)
    with pytest.raises(meshq.UsageError, match="start"):
        node.consumer("t", start=-3)
    with pytest.raises(meshq.ConfigError, match="data_dir"):
        meshq.Node(role="storage")
    unstarted = meshq.Node(cluster="it", data_dir=tmp_path / "x", mdns=False)
    with pytest.raises(meshq.UsageError, match="start"):
        unstarted.produce("t", b"v")


def test_client_without_reachable_storage_fails_in_time():
    started = time.monotonic()
    with meshq.Node(cluster="it", seeds=["127.0.0.1:1"], mdns=False, role="client") as client:
        with pytest.raises(meshq.TimeoutError, match="seed|storage"):
            client.produce("t", b"v", timeout=1.0)
    assert time.monotonic() - started < 10


def test_prometheus_endpoint_reports_the_node(tmp_path):
    import urllib.request

    from tests.procs import free_port

    port = free_port()
    with meshq.Node(cluster="it", data_dir=tmp_path / "m", mdns=False, metrics_port=port) as n:
        n.produce_batch("metered", [b"x"] * 10, partition=0, acks="leader").result(10)
        junk = zmq.Context.instance().socket(zmq.DEALER)  # three frames no node accepts, from 127.0.0.1
        try:
            junk.setsockopt(zmq.LINGER, 0)
            junk.connect(n.address)
            for _ in range(3):
                junk.send(b"\xc1 not msgpack")
            deadline = time.monotonic() + 10
            while n.status()["invalid_frames"][n.node_id]["total"] < 3:
                assert time.monotonic() < deadline, "the junk frames were never counted"
                time.sleep(0.05)
        finally:
            junk.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    assert "meshq_records_produced_total 10.0" in text
    assert "meshq_invalid_frames_total 3.0" in text
    assert 'meshq_invalid_frames_by_peer_total{peer="127.0.0.1"} 3.0' in text
    assert 'meshq_high_watermark{partition="0",topic="metered"} 10.0' in text
    assert "meshq_under_replicated_partitions 0.0" in text  # one member: one replica is all there is
    assert "meshq_handoffs_in_progress 0.0" in text
