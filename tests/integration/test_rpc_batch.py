"""Pipelined requests between two real Nodes (runtime threads, ZeroMQ on 127.0.0.1): gathered
into ``rpc_batch`` messages and answered in ``rpc_batch_ok`` ones, every request still gets
exactly its own reply or error."""

from __future__ import annotations

import time

import pytest

import meshq

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair(tmp_path):
    """Two storage nodes on loopback (n2 seeded with n1); both stopped at teardown."""
    nodes = []
    try:
        first = meshq.Node(cluster="rpcbatch", data_dir=tmp_path / "n1", mdns=False, partitions=1,
                           node_id="n1").start()
        nodes.append(first)
        nodes.append(meshq.Node(cluster="rpcbatch", data_dir=tmp_path / "n2", mdns=False, partitions=1,
                                node_id="n2", seeds=[first.address.removeprefix("tcp://")]).start())
        first.wait_for_members(2, timeout=30)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def wait_for(condition, within_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {within_s} s"
        time.sleep(0.02)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_5000_pipelined_requests_each_get_their_own_reply(pair, concurrency):
    n1, n2 = pair

    def handler(payload: bytes) -> bytes:
        if payload.endswith(b"!"):
            raise ValueError(payload.decode())
        return b"re:" + payload

    n1.serve("batch.echo", handler, concurrency=concurrency)
    wait_for(lambda: n2.status()["service_instances"].get("batch.echo") == ["n1"], what="n2 sees the service")
    payloads = [(b"%d!" if i % 97 == 0 else b"%d") % i for i in range(5000)]
    futures = [n2.request_async("batch.echo", payload, timeout=60.0) for payload in payloads]
    for payload, future in zip(payloads, futures):
        if payload.endswith(b"!"):
            error = future.exception(60)
            assert isinstance(error, meshq.RemoteError) and error.error_message == payload.decode()
        else:
            assert future.result(60) == b"re:" + payload
    calls = n2.status()["requests"]
    assert calls["batches_sent"] >= 1 and calls["batched_requests"] > calls["batches_sent"]  # they went batched
    assert calls["replies"] == sum(not p.endswith(b"!") for p in payloads)
    assert calls["remote_errors"] == sum(p.endswith(b"!") for p in payloads)
    assert calls["in_flight"] == 0 and calls["late_replies"] == 0
    served = next(s for s in n1.status()["services"] if s["service"] == "batch.echo")
    assert served["served"] + served["errors"] == 5000 and served["in_flight"] == 0


def test_requests_that_time_out_inside_a_batch_fail_alone_and_their_late_replies_are_dropped(pair):
    n1, n2 = pair

    def handler(payload: bytes) -> bytes:
        if payload == b"slow":
            time.sleep(1.0)
        return payload

    n1.serve("batch.slow", handler)
    wait_for(lambda: n2.status()["service_instances"].get("batch.slow") == ["n1"], what="n2 sees the service")
    slow = n2.request_async("batch.slow", b"slow", timeout=0.3)
    quick = [n2.request_async("batch.slow", b"q%d" % i, timeout=0.3) for i in range(20)]  # queued behind "slow"
    patient = [n2.request_async("batch.slow", b"p%d" % i, timeout=30.0) for i in range(20)]
    assert isinstance(slow.exception(10), meshq.TimeoutError)
    for future in quick:
        assert isinstance(future.exception(10), meshq.TimeoutError)
    assert [f.result(30) for f in patient] == [b"p%d" % i for i in range(20)]
    wait_for(lambda: n2.status()["requests"]["late_replies"] >= 1, what="the late reply to 'slow' is counted")
    served = next(s for s in n1.status()["services"] if s["service"] == "batch.slow")
    assert served["expired"] >= 1  # the quick ones' callers had given up before a worker came to them
