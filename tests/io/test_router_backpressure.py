"""A peer that sends faster than a node reads is held back by ZeroMQ's flow control, not dropped.

libzmq stops reading a connection while the queue to the application is full, so it cannot see the
peer's traffic either: with the 1 s heartbeat timeout every other meshq socket uses, a node's ROUTER
whose application did not read for a second dropped the connection and every message queued on it
(the hostile multinode test's status request was lost this way on a loaded machine, and its client
waited for an answer that never came). The node's ROUTER uses ``ROUTER_HEARTBEAT_TIMEOUT_MS``.
"""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from meshq.io.sockets import HEARTBEAT_TIMEOUT_MS, ROUTER_HEARTBEAT_TIMEOUT_MS, new_socket

pytestmark = pytest.mark.timeout(120)

MESSAGES = 30_000  # three times the ROUTER's receive high-water mark
STALL_S = 2.5 * HEARTBEAT_TIMEOUT_MS / 1000  # the application reads nothing for this long


def _received_after_a_stall(router_timeout_ms: int) -> tuple[int, bool]:
    """A DEALER sends MESSAGES then b"last" to a ROUTER (made as the node makes it) whose application
    stalls for STALL_S first; returns how many messages the ROUTER read and whether b"last" came."""
    context = zmq.Context()
    router = new_socket(context, zmq.ROUTER, 1 << 20)
    router.setsockopt(zmq.HEARTBEAT_TIMEOUT, router_timeout_ms)
    dealer = None
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer = new_socket(context, zmq.DEALER, 1 << 20)
        dealer.connect(f"tcp://127.0.0.1:{port}")

        def send() -> None:
            try:
                for _ in range(MESSAGES):
                    dealer.send(b"x" * 200)  # blocks while the ROUTER holds it back
                dealer.send(b"last")
            except zmq.ZMQError:  # (closed at the end of a failing run)
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(STALL_S)
        got, last = 0, False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not last:
            if router.poll(200):
                got += 1
                last = router.recv_multipart()[1] == b"last"
        return got, last
    finally:
        if dealer is not None:
            dealer.close(0)
        router.close(0)
        context.term()


def test_a_node_router_loses_nothing_from_a_peer_it_reads_too_slowly():
    assert ROUTER_HEARTBEAT_TIMEOUT_MS > 10 * STALL_S * 1000
    assert _received_after_a_stall(ROUTER_HEARTBEAT_TIMEOUT_MS) == (MESSAGES + 1, True)


def test_with_the_short_heartbeat_timeout_the_stalled_router_drops_the_connection_and_its_messages():
    """The mutation: the ROUTER with every other socket's timeout loses messages (the test above can fail)."""
    got, _ = _received_after_a_stall(HEARTBEAT_TIMEOUT_MS)
    assert got < MESSAGES + 1
