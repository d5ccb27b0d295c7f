"""A service's desk (meshq.core.rpc.desk, meshq.io.rpc): requests answered by the serving thread on a
socket of its own, between real Nodes in one process (ZeroMQ on 127.0.0.1)."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

import meshq
from meshq.core import wire
from meshq.core.rpc.desk import REPORT_S
from tests.integration import test_rpc
from tests.integration.test_rpc import instances_seen, wait_for
from tests.procs import free_port

pytestmark = pytest.mark.timeout(90)
mesh = test_rpc.mesh  # (the fixture: three storage nodes on loopback)


def own_service(node, name: str) -> dict:
    return next(s for s in node.status()["services"] if s["service"] == name and s["node_id"] == node.node_id)


def test_requests_go_to_the_desk_and_are_counted_in_status(mesh):
    n1, n2, _n3 = mesh
    n1.serve("desk.echo", lambda payload: payload.upper())
    n1.serve("pool.echo", lambda payload: payload, concurrency=2)
    wait_for(lambda: instances_seen(n2, "pool.echo") == ["n1"], what="n2 sees n1's services")
    desk = own_service(n1, "desk.echo")["desk"]
    assert desk is not None and desk.startswith("tcp://127.0.0.1:") and desk != n1.address
    assert own_service(n1, "pool.echo")["desk"] is None  # concurrency 2: a pool of threads, no desk
    wait_for(lambda: n2.core.rpc.desk("n1", "desk.echo") == desk, what="n2 learns the desk")
    for index in range(20):
        assert n2.request("desk.echo", b"abc%d" % index, timeout=10) == b"ABC%d" % index
    assert n1.request("desk.echo", b"self", timeout=10) == b"SELF"  # the node's own desk, from this thread
    assert n2.status()["requests"]["direct_replies"] >= 20
    wait_for(lambda: own_service(n1, "desk.echo")["served"] == 21, within_s=5 + 10 * REPORT_S,
             what="the desk's counts reach status")
    assert own_service(n1, "desk.echo")["p50_ms"] is not None


def test_one_handler_at_a_time_whichever_way_requests_come(mesh):
    """Requests at the desk (sync, two threads) and through the runtime (pipelined) share the one worker."""
    n1, n2, _n3 = mesh
    running, most = [0], [0]
    lock = threading.Lock()

    def handler(payload: bytes) -> bytes:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        return payload

    n1.serve("one.at.a.time", handler)
    wait_for(lambda: n2.core.rpc.desk("n1", "one.at.a.time") is not None, what="n2 learns the desk")
    errors: list = []

    def sync_caller() -> None:
        try:
            for index in range(30):
                assert n2.request("one.at.a.time", b"s%d" % index, timeout=20) == b"s%d" % index
        except BaseException as exc:  # (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=sync_caller) for _ in range(2)]
    for thread in threads:
        thread.start()
    futures = [n2.request_async("one.at.a.time", b"a%d" % index, timeout=20) for index in range(60)]
    assert [future.result(30) for future in futures] == [b"a%d" % index for index in range(60)]
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert most[0] == 1


def test_withdrawing_a_service_answers_what_waits_at_its_desk(mesh):
    """A request queued at a desk when its service is withdrawn is told ``not_serving`` (the caller then tries
    elsewhere: here nobody is left) instead of waiting out its timeout; the running one finishes."""
    n1, n2, _n3 = mesh
    started = threading.Event()

    def slow(payload: bytes) -> bytes:
        if payload == b"first":
            started.set()
            time.sleep(0.5)
        return payload

    handle = n1.serve("slow.desk", slow)
    wait_for(lambda: n2.core.rpc.desk("n1", "slow.desk") is not None, what="n2 learns the desk")
    outcomes: dict = {}
    warmed = threading.Barrier(3)
    second_go = threading.Event()

    def call(name: str) -> None:
        # (each thread's socket to the desk connects on its first request, which goes through the node's
        # ROUTER meanwhile; a request through the ROUTER handed to the worker before the withdrawal would
        # run, as jobs handed out do: so the measured request waits for this thread's desk connection)
        n2.request("slow.desk", b"warm", timeout=10)
        desk_socket = n2._requester._local.state.sockets[n2.core.rpc.desk("n1", "slow.desk")]
        wait_for(lambda: desk_socket.poll(0, zmq.POLLOUT), what="the thread's desk connection")  # (IMMEDIATE)
        warmed.wait(10)
        if name == "second":
            second_go.wait(10)
        began = time.monotonic()
        try:
            outcomes[name] = (n2.request("slow.desk", name.encode(), timeout=20), time.monotonic() - began)
        except meshq.MeshqError as exc:
            outcomes[name] = (exc, time.monotonic() - began)

    first = threading.Thread(target=call, args=("first",))
    second = threading.Thread(target=call, args=("second",))
    first.start()
    second.start()
    warmed.wait(10)
    assert started.wait(10)
    second_go.set()
    time.sleep(0.1)  # the second waits at the desk behind the running first
    handle.close()
    first.join(30)
    second.join(30)
    assert outcomes["first"][0] == b"first"
    error, took = outcomes["second"]
    assert isinstance(error, meshq.NoRespondersError), outcomes
    assert took < 5, f"the waiting request took {took:.1f} s to be told"


def test_duplicates_and_garbage_at_the_desk_change_nothing(mesh):
    """The same request sent twice runs once; frames that do not decode are dropped and counted; the desk
    keeps answering."""
    n1, _n2, _n3 = mesh
    ran: list[bytes] = []
    n1.serve("dedup", lambda payload: ran.append(payload) or payload)
    desk = own_service(n1, "dedup")["desk"]
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        dealer.connect(desk)
        frames = wire.encode("rpc", "outsider", "rpc_request", 41,
                             {"service": "dedup", "incarnation": 1, "timeout_ms": 5000}, (b"once",))
        dealer.send_multipart([b"\xc1garbage"])  # not msgpack: dropped, counted
        dealer.send_multipart(frames)
        dealer.send_multipart(frames)  # a duplicate: dropped, counted, not run
        reply = wire.decode(dealer.recv_multipart(), "rpc")
        assert (reply.type, reply.request_id, reply.payloads[0]) == ("rpc_reply", 41, b"once")
        other = wire.encode("rpc", "outsider", "rpc_request", 42,
                            {"service": "elsewhere", "incarnation": 1, "timeout_ms": 5000}, (b"x",))
        dealer.send_multipart(other)
        refusal = wire.decode(dealer.recv_multipart(), "rpc")
        assert (refusal.type, refusal.body["reason"]) == ("rpc_error", "not_serving")
        dealer.setsockopt(zmq.RCVTIMEO, 300)
        with pytest.raises(zmq.Again):  # no second answer to the duplicate
            dealer.recv_multipart()
    finally:
        dealer.close(0)
    assert ran == [b"once"]
    wait_for(lambda: own_service(n1, "dedup")["duplicates"] == 1, within_s=5, what="the duplicate is counted")
    wait_for(lambda: n1.core.invalid_frames()["by_peer"].get("desk") == 1, within_s=5,
             what="the garbage frame is counted")
    assert n1.request("dedup", b"after", timeout=10) == b"after"


def test_requests_whose_callers_gave_up_while_they_waited_are_not_run(mesh):
    """Requests are stamped when the desk first reads them, not when it comes to them: those that waited
    behind others past their caller's timeout are skipped (before, every one of them ran)."""
    n1, n2, _n3 = mesh
    ran: list[bytes] = []

    def slow(payload: bytes) -> bytes:
        ran.append(payload)
        time.sleep(0.2)
        return payload

    n1.serve("slow.stamped", slow)
    wait_for(lambda: n2.core.rpc.desk("n1", "slow.stamped") is not None, what="n2 learns the desk")
    go = threading.Barrier(6)
    outcomes: list = []

    def caller(index: int) -> None:
        n2.request("slow.stamped", b"warm%d" % index, timeout=10)  # (its thread's socket to the desk connects)
        go.wait(10)
        if index:
            time.sleep(0.05)  # behind the first, which runs 0.2 s
        try:
            outcomes.append(n2.request("slow.stamped", b"%s%d" % (b"stale" if index else b"first", index),
                                       timeout=5 if not index else 0.1))
        except meshq.TimeoutError:
            outcomes.append("timeout")

    threads = [threading.Thread(target=caller, args=(index,)) for index in range(5)]
    for thread in threads:
        thread.start()
    go.wait(10)
    for thread in threads:
        thread.join(30)
    assert outcomes.count("timeout") == 4 and b"first0" in outcomes
    stale_runs = [payload for payload in ran if payload.startswith(b"stale")]
    assert len(stale_runs) <= 2, f"{len(stale_runs)} of 4 requests ran after their callers gave up: {stale_runs}"
    started = time.monotonic()
    assert n2.request("slow.stamped", b"fresh", timeout=5) == b"fresh"  # not held up by the given-up ones
    assert time.monotonic() - started < 1.0


def test_a_handler_that_raises_systemexit_does_not_end_the_desk(mesh):
    n1, n2, _n3 = mesh

    def handler(payload: bytes) -> bytes:
        if payload == b"exit":
            raise SystemExit(3)
        return payload

    n1.serve("exits", handler)
    wait_for(lambda: n2.core.rpc.desk("n1", "exits") is not None, what="n2 learns the desk")
    assert n2.request("exits", b"a", timeout=10) == b"a"
    for _ in range(2):  # (the first may go through the node's ROUTER, while the desk's socket connects)
        with pytest.raises(meshq.RemoteError, match="SystemExit"):
            n2.request("exits", b"exit", timeout=10)
    assert n2.request("exits", b"b", timeout=10) == b"b"
    assert n2.request_async("exits", b"c", timeout=10).result(10) == b"c"


def test_a_desk_that_cannot_be_reached_is_gone_around(mesh):
    """A desk port a firewall or NAT does not let through: requests go to the node's ROUTER instead of
    waiting out their timeouts (simulated by advertising a port nothing listens on)."""
    n1, n2, _n3 = mesh
    n1.serve("walled", lambda payload: payload)
    wait_for(lambda: n2.core.rpc.desk("n1", "walled") is not None, what="n2 learns the desk")
    closed = f"tcp://127.0.0.1:{free_port()}"

    def redirect() -> None:  # (on n1's runtime thread, which owns its core)
        n1.core.rpc.served["walled"].desk = closed
        n1.core.rpc._advertise(n1.clock.now_s())

    n1.runtime.call_later(0, redirect)
    wait_for(lambda: n2.core.rpc.desk("n1", "walled") == closed, what="n2 learns the unreachable desk")
    for index in range(3):
        started = time.monotonic()
        assert n2.request("walled", b"x%d" % index, timeout=5) == b"x%d" % index
        assert time.monotonic() - started < 1.0


def test_a_node_with_keys_has_no_desk(tmp_path):
    """With CURVE keys every request goes through the node's ROUTER, where its caller's key is checked."""
    from meshq.keys import keygen

    root = keygen(tmp_path / "keys")
    with meshq.Node(cluster="k", data_dir=tmp_path / "data", mdns=False, keys=root / "cluster",
                    replication_factor=1) as node:
        node.serve("keyed.echo", lambda payload: payload)
        assert own_service(node, "keyed.echo")["desk"] is None
        assert node.request("keyed.echo", b"through the router", timeout=10) == b"through the router"
