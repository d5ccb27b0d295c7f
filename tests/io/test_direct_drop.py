"""A synchronous produce whose connection drops while it waits sends its batch again at once
(``meshq.io.direct``: "A dropped connection sends again"; issue #19 item 10).

A fake leader on 127.0.0.1 (a ROUTER made by ``new_socket``) takes the first attempt and then drops the
connection without answering: it closes its socket and binds a fresh one on the same port, as a node whose
connection libzmq dropped (heartbeat timeout on a lossy link) still runs and takes the DEALER's next
connection. The request and any answer on the old connection are gone. Without the drop monitor nothing sends
the batch again and the call waits for its deadline; with it the same bytes (a new request id) reach the new
connection within a reconnect interval, and the answer to them completes the call.
"""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import pytest
import zmq

from meshq.core import wire
from meshq.core.batch import parse_header
from meshq.io.direct import DirectProducer, DropWatch
from meshq.io.sockets import new_socket

pytestmark = pytest.mark.timeout(60)

CLUSTER = "drops"
DEADLINE_S = 10.0  # the call's: far beyond the bound below, so waiting it out cannot pass
RESENT_WITHIN_S = 3.0  # the drop is seen at once (the peer closed), the reconnect takes 100 ms: slack for load


def _fake_node(endpoint: str) -> SimpleNamespace:
    config = SimpleNamespace(cluster=CLUSTER, request_timeout_s=30.0, batch_max_bytes=1 << 20,
                             max_frame_bytes=1 << 20)
    core = SimpleNamespace(config=config, node_id="client-1", peer_endpoints={"leader-1": endpoint}, members={},
                           client=SimpleNamespace(leader_of=lambda topic, partition: "leader-1"))
    return SimpleNamespace(core=core, clock=SimpleNamespace(now_s=time.monotonic),
                           runtime=SimpleNamespace(curve=None, endpoint="tcp://127.0.0.1:1"))


def _bind(context: zmq.Context, port: int | None) -> tuple[zmq.Socket, int]:
    sock = new_socket(context, zmq.ROUTER, 1 << 20)
    if port is None:
        return sock, sock.bind_to_random_port("tcp://127.0.0.1")
    deadline = time.monotonic() + 5
    while True:
        try:
            sock.bind(f"tcp://127.0.0.1:{port}")
            return sock, port
        except zmq.ZMQError:  # the old socket's port is released by libzmq's I/O thread
            assert time.monotonic() < deadline, f"port {port} not free again"
            time.sleep(0.01)


def _receive(sock: zmq.Socket, within_s: float) -> list[bytes] | None:
    return sock.recv_multipart() if sock.poll(int(within_s * 1000)) else None


def test_a_produce_whose_connection_drops_is_sent_again_at_once():
    context = zmq.Context()
    leader, port = _bind(context, None)
    producer = DirectProducer(_fake_node(f"tcp://127.0.0.1:{port}"), context, random.Random(7))
    outcome: list = []

    def produce() -> None:
        state = producer._state()
        call = state.start("t", 0, (None, b"value", None, 1), "quorum", time.monotonic() + DEADLINE_S, 30.0,
                           1 << 20)
        started = time.monotonic()
        try:
            outcome.append((producer._run(state, producer._call_steps(call, f"tcp://127.0.0.1:{port}")),
                            time.monotonic() - started))
        except BaseException as exc:
            outcome.append((exc, time.monotonic() - started))
        finally:
            state.close_sockets()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        first = _receive(leader, 5.0)
        assert first is not None, "the first attempt never arrived"
        leader.close(0)  # the connection drops with the request unanswered
        dropped_at = time.monotonic()
        leader, _ = _bind(context, port)
        again = _receive(leader, DEADLINE_S + 2)
        assert again is not None, "the batch was never sent again"
        resent_after = time.monotonic() - dropped_at
        one, two = wire.decode(first[1:], CLUSTER), wire.decode(again[1:], CLUSTER)
        assert two.type == "produce" and two.request_id != one.request_id
        assert two.payloads[0] == one.payloads[0], "a retry must send the same bytes (same producer sequence)"
        assert parse_header(two.payloads[0]).base_sequence == 0
        assert resent_after <= RESENT_WITHIN_S, (
            f"sent again {resent_after:.2f} s after the drop (bound {RESENT_WITHIN_S} s): it waited for its deadline")
        leader.send_multipart([again[0], *wire.encode(CLUSTER, "leader-1", "produce_ok", two.request_id,
                                                      {"topic": "t", "partition": 0, "base_offset": 41,
                                                       "duplicate": False}, ())])
        thread.join(10)
        assert outcome and outcome[0][0] == 41, outcome
        assert outcome[0][1] < RESENT_WITHIN_S + 1
    finally:
        producer.close()
        leader.close(0)
        thread.join(DEADLINE_S + 5)
        context.term()


def _drops_seen_once(context: zmq.Context, dealer_context: zmq.Context) -> None:
    router, port = _bind(context, None)
    dealer = new_socket(dealer_context, zmq.DEALER, 1 << 20)
    watch = DropWatch(dealer)
    try:
        dealer.connect(f"tcp://127.0.0.1:{port}")
        assert not watch.dropped()
        deadline = time.monotonic() + 5
        while not router.poll(10):  # the connection is up once the peer hears a message
            dealer.send(b"x", zmq.NOBLOCK)
            assert time.monotonic() < deadline, "no connection within 5 s"
        assert not watch.dropped(), "a connection that is up has not dropped"
        router.close(0)
        deadline = time.monotonic() + 5
        while not watch.dropped():
            assert time.monotonic() < deadline, "no drop seen within 5 s of the peer closing"
            time.sleep(0.01)
        assert not watch.dropped(), "a drop is reported once"
    finally:
        watch.close()  # before its DEALER (meshq.io.dropwatch)
        dealer.close(0)
        router.close(0)


def test_a_drop_watch_reports_a_drop_once_and_nothing_before_it():
    context = zmq.Context()
    try:
        _drops_seen_once(context, context)
    finally:
        context.term()


def test_a_drop_watch_reads_an_asyncio_dealer_without_a_loop():
    import asyncio

    import zmq.asyncio

    # An asyncio socket's send needs an event loop object (not a running one). Earlier tests that ran
    # asyncio.run() leave the main thread without one, so this test sets its own and removes it after.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    context = zmq.Context()
    async_context = zmq.asyncio.Context()
    try:
        _drops_seen_once(context, async_context)
    finally:
        async_context.term()
        context.term()
        asyncio.set_event_loop(None)
        loop.close()
