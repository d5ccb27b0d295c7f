"""``Node.produce`` sent from the caller's thread (meshq.io.direct): when it is used, when it is
not, and that retries, timeouts and stops keep the producer's guarantees. Real nodes on 127.0.0.1."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

import meshq

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def storage(tmp_path):
    with meshq.Node(cluster="dp", data_dir=tmp_path / "data", mdns=False, partitions=2) as n:
        yield n


def _client(storage, **options) -> meshq.Node:
    client = meshq.Node(cluster="dp", seeds=[storage.address.removeprefix("tcp://")], mdns=False, role="client",
                        **options)
    client.start()
    client.wait_ready(timeout=10)
    return client


def _values(node: meshq.Node, topic: str, partition: int) -> list[tuple[int, bytes]]:
    """(offset, value) of every record of one partition, read back through a consumer."""
    consumer = node.consumer(topic)
    out = []
    try:
        while True:
            records = consumer.poll(timeout=0.5)
            if not records:
                return out
            out.extend((r.offset, r.value) for r in records if r.partition == partition)
    finally:
        consumer.close()


def _direct(node: meshq.Node) -> dict:
    assert node._direct is not None
    return node._direct.stats()


def test_after_the_first_produce_a_client_sends_from_its_own_thread(storage):
    with _client(storage) as client:
        first = client.produce("t", b"v0", partition=0)  # the topic is unknown yet: through the runtime
        assert _direct(client)["direct_produces"] == 0
        metas = [client.produce("t", f"v{i}".encode(), partition=0, headers={"h": b"x"}, timestamp_ms=1000 + i)
                 for i in range(1, 50)]
        assert _direct(client) == {"direct_produces": 49, "direct_retries": 0}
        assert [m.offset for m in metas] == list(range(first.offset + 1, first.offset + 50))
        assert [m.timestamp_ms for m in metas] == [1000 + i for i in range(1, 50)]
        assert _values(storage, "t", 0) == [(i, f"v{i}".encode()) for i in range(50)]
        consumer = client.consumer("t")
        (record, *_) = [r for r in consumer.poll(timeout=2) if r.offset == 1 and r.partition == 0]
        consumer.close()
        assert record.headers == {"h": b"x"} and record.timestamp_ms == 1001


def test_keyed_and_keyless_records_pick_partitions_like_the_runtime(storage):
    with _client(storage) as client:
        client.produce("k", b"first", key=b"a")
        via_runtime = client.produce("k", b"runtime", key=b"same-key")
        direct = client.produce("k", b"direct", key=b"same-key")
        assert _direct(client)["direct_produces"] == 2
        assert direct.partition == via_runtime.partition
        keyless = {client.produce("k", b"x").partition for _ in range(6)}
        assert keyless == {0, 1}, "keyless records rotate over the partitions"
        with pytest.raises(meshq.UsageError, match="partition 7 does not exist"):
            client.produce("k", b"v", partition=7)


def test_a_produce_after_unacknowledged_async_records_keeps_their_order(storage):
    with _client(storage, linger_s=0.5) as client:
        client.produce("o", b"warm", partition=0)
        client.produce("o", b"direct", partition=0)
        before = _direct(client)["direct_produces"]
        futures = [client.produce_async("o", f"a{i}".encode(), partition=0) for i in range(20)]
        client.produce("o", b"after", partition=0)  # must not overtake the buffered records
        assert _direct(client)["direct_produces"] == before
        assert all(f.done() for f in futures)
        values = [v for _, v in _values(storage, "o", 0)]
        assert values == [b"warm", b"direct"] + [f"a{i}".encode() for i in range(20)] + [b"after"]


def test_a_storage_node_that_leads_the_partition_produces_through_its_runtime(storage):
    storage.produce("self", b"a", partition=0)
    storage.produce("self", b"b", partition=0)
    assert _direct(storage)["direct_produces"] == 0
    assert [v for _, v in _values(storage, "self", 0)] == [b"a", b"b"]


def test_threads_are_separate_producers_and_keep_their_own_order(storage):
    with _client(storage) as client:
        client.produce("m", b"warm", partition=0)
        errors: list[BaseException] = []

        def run(name: str) -> None:
            try:
                for i in range(40):
                    client.produce("m", f"{name}-{i}".encode(), partition=0)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(f"w{n}",)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors
        assert _direct(client)["direct_produces"] == 160
        values = [v.decode() for _, v in _values(storage, "m", 0)][1:]
        assert len(values) == len(set(values)) == 160, "no record lost or stored twice"
        for n in range(4):
            mine = [v for v in values if v.startswith(f"w{n}-")]
            assert mine == [f"w{n}-{i}" for i in range(40)]


def test_a_stale_leader_is_retried_after_a_metadata_refresh_and_stored_once(tmp_path):
    with meshq.Node(cluster="dp", data_dir=tmp_path / "a", mdns=False, partitions=2) as a:
        with meshq.Node(cluster="dp", data_dir=tmp_path / "b", mdns=False, partitions=2,
                        seeds=[a.address.removeprefix("tcp://")]) as b:
            b.wait_for_members(2, timeout=20)
            with _client(a) as client:
                client.create_topic("s", partitions=1, replication_factor=1)
                first = client.produce("s", b"v0", partition=0, acks="leader", timeout=10)
                leader = client.core.metadata["s"]["leaders"][0]
                other = b.node_id if leader == a.node_id else a.node_id
                client.core.metadata["s"]["leaders"][0] = other  # as if leadership had moved away
                before = _direct(client)
                md = client.produce("s", b"v1", partition=0, acks="leader", timeout=10)
                assert md.offset == first.offset + 1
                after = _direct(client)
                assert after["direct_produces"] == before["direct_produces"] + 1
                assert after["direct_retries"] == before["direct_retries"] + 1
                owner = a if leader == a.node_id else b
                assert [v for _, v in _values(owner, "s", 0)] == [b"v0", b"v1"]


class _Silent:
    """A ROUTER that takes requests and never answers: a leader whose answers are lost."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def received(self) -> int:
        count = 0
        while self.sock.poll(0):
            self.sock.recv_multipart()
            count += 1
        return count

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def silent():
    s = _Silent()
    yield s
    s.close()


def test_an_unanswered_attempt_is_resent_with_the_same_sequence(storage, silent):
    with _client(storage, request_timeout_s=0.3) as client:
        client.produce("r", b"v0", partition=0)
        client.core.peer_endpoints[storage.node_id] = silent.endpoint  # the answer will not come
        md = client.produce("r", b"v1", partition=0, timeout=10)  # the refresh reconnects to the real one
        assert silent.received() == 1
        assert md.offset == 1 and _direct(client)["direct_retries"] == 1
        assert [v for _, v in _values(storage, "r", 0)] == [b"v0", b"v1"]


def test_a_produce_whose_fate_is_unknown_starts_a_new_epoch(storage, silent):
    with _client(storage) as client:
        client.produce("u", b"v0", partition=0)
        client.produce("u", b"v1", partition=0)
        state = client._direct._local.state
        client.core.peer_endpoints[storage.node_id] = silent.endpoint
        started = time.monotonic()
        with pytest.raises(meshq.TimeoutError, match="may or may not be stored"):
            client.produce("u", b"lost?", partition=0, timeout=0.5)
        assert time.monotonic() - started < 3
        assert state.epoch == 1 and state.sequences == {}, "the unknown batch is fenced by a new epoch"
        assert "u" in client._direct._stale, "the next call asks for fresh metadata first"
        client.core.peer_endpoints[storage.node_id] = storage.address
        md = client.produce("u", b"v2", partition=0)  # epoch 1, sequence 0: accepted
        assert not client._direct._stale
        assert [v for _, v in _values(storage, "u", 0)] == [b"v0", b"v1", b"v2"] and md.offset == 2


def test_stopping_the_node_ends_a_waiting_produce(storage, silent):
    client = _client(storage)
    try:
        client.produce("w", b"v0", partition=0)
        client.core.peer_endpoints[storage.node_id] = silent.endpoint
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                client.produce("w", b"v1", partition=0, timeout=20)
            except BaseException as exc:  # checked below
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        while not silent.received():
            time.sleep(0.01)
        started = time.monotonic()
    finally:
        client.stop()
    waiter.join(5)
    assert not waiter.is_alive() and time.monotonic() - started < 5
    assert len(outcome) == 1 and isinstance(outcome[0], meshq.NodeStoppedError)
