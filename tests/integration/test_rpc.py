"""Request/reply between real Nodes in one process (runtime threads, ZeroMQ on 127.0.0.1)."""

from __future__ import annotations

import threading
import time

import pytest

import meshq

pytestmark = pytest.mark.timeout(90)


def wait_for(condition, within_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {within_s} s"
        time.sleep(0.02)


@pytest.fixture
def mesh(tmp_path):
    """Three storage nodes on loopback (n2 and n3 seeded with n1); all stopped at teardown."""
    nodes = []
    try:
        first = meshq.Node(cluster="rpc", data_dir=tmp_path / "n1", mdns=False, partitions=1, node_id="n1").start()
        nodes.append(first)
        for name in ("n2", "n3"):
            nodes.append(meshq.Node(cluster="rpc", data_dir=tmp_path / name, mdns=False, partitions=1,
                                    node_id=name, seeds=[first.address.removeprefix("tcp://")]).start())
        first.wait_for_members(3, timeout=30)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def instances_seen(node, service) -> list[str]:
    return node.status()["service_instances"].get(service, [])


def test_echo_remote_error_and_no_responders(mesh):
    n1, n2, _n3 = mesh
    handle = n1.serve("echo", lambda payload: payload.upper())
    n1.serve("boom", lambda payload: {}[payload])
    n1.serve("wrong", lambda payload: 42)
    wait_for(lambda: instances_seen(n2, "boom") == ["n1"], what="n2 sees n1's services")
    assert n2.request("echo", b"hello", timeout=10) == b"HELLO"
    assert n2.status()["requests"]["direct_replies"] >= 1  # sent from this thread (meshq.io.rpc_direct)
    assert n1.request("echo", b"self", timeout=10) == b"SELF"  # an instance on the node itself: through its runtime
    assert n2.request("echo", "text", timeout=10) == b"TEXT"
    with pytest.raises(meshq.RemoteError) as info:
        n2.request("boom", b"key", timeout=10)
    assert info.value.error_type == "KeyError" and "key" in info.value.error_message
    with pytest.raises(meshq.RemoteError, match="TypeError"):
        n2.request("wrong", b"", timeout=10)
    started = time.monotonic()
    with pytest.raises(meshq.NoRespondersError, match="nobody"):
        n2.request("nobody", b"x", timeout=10.0)
    assert time.monotonic() - started < 5.0, "no responders is said at once, not after the timeout"
    with pytest.raises(ValueError, match="wildcard"):
        n2.request("a.*", b"x")
    with pytest.raises(meshq.UsageError, match="already served"):
        n1.serve("echo", lambda p: p)
    handle.close()
    wait_for(lambda: "echo" not in n2.status()["service_instances"], what="the withdrawal reaches n2")
    with pytest.raises(meshq.NoRespondersError):
        n2.request("echo", b"x")
    status = n1.status()
    served = {s["service"]: s for s in status["services"] if s["node_id"] == "n1"}
    assert served["boom"]["errors"] == 1 and served["boom"]["p50_ms"] is not None


def test_timeout_and_the_late_reply_is_dropped(mesh):
    n1, n2, _n3 = mesh
    release = threading.Event()

    def slow(payload: bytes) -> bytes:
        if payload == b"slow":
            release.wait(10)
        return payload

    n1.serve("slow", slow, concurrency=2)
    wait_for(lambda: instances_seen(n2, "slow") == ["n1"])
    with pytest.raises(meshq.TimeoutError):
        n2.request("slow", b"slow", timeout=0.3)
    release.set()

    def served_slow() -> int:
        return sum(s["served"] for s in n1.status()["services"] if s["service"] == "slow" and s["node_id"] == "n1")

    wait_for(lambda: served_slow() == 1, what="the slow request answered (late)")
    assert n2.request("slow", b"next", timeout=10) == b"next"  # never the late reply to b"slow"
    wait_for(lambda: n2.status()["requests"]["late_replies"] == 1, what="the late reply is counted")


def test_requests_are_spread_over_two_instances(mesh):
    n1, n2, n3 = mesh
    seen: dict[str, int] = {"n1": 0, "n2": 0}
    lock = threading.Lock()

    def handler_of(name):
        def handle(payload: bytes) -> bytes:
            with lock:
                seen[name] += 1
            time.sleep(0.002)
            return name.encode()
        return handle

    n1.serve("work", handler_of("n1"), concurrency=4)
    n2.serve("work", handler_of("n2"), concurrency=4)
    wait_for(lambda: instances_seen(n3, "work") == ["n1", "n2"])
    futures = [n3.request_async("work", str(i).encode(), timeout=10) for i in range(200)]
    replies = [f.result(15) for f in futures]
    assert sorted(set(replies)) == [b"n1", b"n2"]
    assert min(seen.values()) >= 50, seen  # least outstanding keeps both busy


def test_an_idempotent_request_is_retried_when_its_instance_stops(mesh):
    n1, n2, n3 = mesh
    entered = threading.Event()
    runs: list[str] = []

    def stuck(payload: bytes) -> bytes:
        runs.append("n2")
        entered.set()
        time.sleep(0.5)  # n2 stops meanwhile: this reply never leaves
        return b"n2"

    n1.serve("idem", lambda p: (runs.append("n1"), b"n1")[1], idempotent=True)
    n2.serve("idem", stuck, idempotent=True, concurrency=1)
    wait_for(lambda: instances_seen(n3, "idem") == ["n1", "n2"])
    # keep n1 busy-looking: n3 picks the least outstanding, so send until one lands on n2
    future = None
    for _ in range(50):
        future = n3.request_async("idem", b"x", timeout=20)
        if entered.wait(0.05):
            break
        future.result(5)
    assert entered.is_set()
    n2.stop()
    assert future.result(20) == b"n1"
    assert runs.count("n2") == 1


def test_a_non_idempotent_request_to_a_stopping_instance_fails_outcome_unknown(mesh):
    n1, n2, n3 = mesh
    entered = threading.Event()

    def stuck(payload: bytes) -> bytes:
        entered.set()
        time.sleep(0.5)
        return b"late"

    n2.serve("once", stuck)
    wait_for(lambda: instances_seen(n3, "once") == ["n2"])
    future = n3.request_async("once", b"x", timeout=20)
    assert entered.wait(5)
    n2.stop()
    with pytest.raises(meshq.OutcomeUnknownError, match="outcome is unknown"):
        future.result(20)


def test_prometheus_endpoint_reports_services_and_requests(tmp_path):
    import urllib.request

    from tests.procs import free_port

    port = free_port()

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    with meshq.Node(cluster="it", data_dir=tmp_path / "m", mdns=False, metrics_port=port) as node:
        node.serve("metered.echo", lambda p: p)
        node.serve("metered.boom", lambda p: 1 / 0)
        for _ in range(3):
            assert node.request("metered.echo", b"x", timeout=10) == b"x"  # from this thread, to the service's desk
        with pytest.raises(meshq.RemoteError, match="ZeroDivisionError"):
            node.request("metered.boom", b"x", timeout=10)
        for _ in range(2):  # through the runtime (counted in meshq_rpc_requests), served by the same worker
            assert node.request_async("metered.echo", b"y", timeout=10).result(10) == b"y"
        with pytest.raises(meshq.RemoteError, match="ZeroDivisionError"):
            node.request_async("metered.boom", b"y", timeout=10).result(10)
        deadline = time.monotonic() + 5  # a desk tells its counts within REPORT_S (0.1 s)
        text = scrape()
        while 'meshq_rpc_served_total{service="metered.echo"} 5.0' not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            text = scrape()
    assert 'meshq_rpc_served_total{service="metered.echo"} 5.0' in text
    assert 'meshq_rpc_handler_errors_total{service="metered.boom"} 2.0' in text
    assert 'meshq_rpc_requests_total{outcome="replies"} 2.0' in text
    assert 'meshq_rpc_requests_total{outcome="remote_errors"} 1.0' in text
    assert 'meshq_rpc_handler_p99_seconds{service="metered.echo"}' in text


def test_bad_arguments_are_refused_before_anything_is_sent(mesh):
    n1, _n2, _n3 = mesh
    with pytest.raises(meshq.MessageTooLargeError, match="max_frame_bytes"):
        n1.request("echo", b"x" * (n1.config.max_frame_bytes + 1))
    with pytest.raises(meshq.UsageError, match="timeout"):
        n1.request("echo", b"x", timeout=0)
    with pytest.raises(meshq.UsageError, match="concurrency"):
        n1.serve("echo", lambda p: p, concurrency=0)
    with pytest.raises(meshq.UsageError, match="handler"):
        n1.serve("echo", b"not callable")
    with pytest.raises(ValueError, match="whitespace"):
        n1.serve("bad name", lambda p: p)
    with n1.serve("scoped", lambda p: p):  # a handle closes its service on exit
        assert n1.request("scoped", b"in", timeout=10) == b"in"
    with pytest.raises(meshq.NoRespondersError):
        n1.request("scoped", b"out")
