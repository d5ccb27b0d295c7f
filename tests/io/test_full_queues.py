"""A ROUTER that reads slower than its peer sends holds the peer back or makes it see a drop, never loses
messages silently; and a ROUTER or SUB that is full when its peer hangs up does not take the process down.

libzmq stops reading a connection while the queue to the application is full, so it cannot see the
peer's traffic either: with the 1 s heartbeat timeout every other meshq socket uses, a node's ROUTER
whose application did not read for a second dropped the connection and every message queued on it,
without a trace (the hostile multinode test's status request was lost this way on a loaded machine, and
its client waited for an answer that never came). And libzmq 4.3.5 aborts the process when a socket
with ZMTP heartbeats is in that state and its peer closes the connection (a node died so in a fault
run). A ROUTER made by ``new_socket`` sends no heartbeats (``meshq.io.sockets.ROUTER_MAXRT_MS``): a
stall of more than a second may make the peer's DEALER, whose pings go unanswered, drop the connection
and what was queued on it, but the DEALER sees that drop (``meshq.io.dropwatch``) and meshq resends.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
import zmq

from meshq.io.dropwatch import DropWatch
from meshq.io.sockets import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, new_socket

pytestmark = pytest.mark.timeout(120)

MESSAGES = 30_000  # three times the ROUTER's receive high-water mark
STALL_S = 2.5 * HEARTBEAT_TIMEOUT_MS / 1000  # the application reads nothing for this long


def _received_after_a_stall(heartbeats: bool) -> tuple[int, bool, bool]:
    """A DEALER sends MESSAGES then b"last" to a ROUTER (made as the node makes it; with ``heartbeats``, those of
    the other sockets added) whose application stalls for STALL_S first; returns how many messages the ROUTER
    read, whether b"last" came, and whether the DEALER saw its connection drop."""
    context = zmq.Context()
    watch = None
    router = new_socket(context, zmq.ROUTER, 1 << 20)
    if heartbeats:
        router.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    dealer = None
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer = new_socket(context, zmq.DEALER, 1 << 20)
        watch = DropWatch(dealer)
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
        return got, last, watch.dropped()
    finally:
        if watch is not None:
            watch.close()
        if dealer is not None:
            dealer.close(0)
        router.close(0)
        context.term()


def test_a_node_router_loses_nothing_silently_from_a_peer_it_reads_too_slowly():
    got, last, dropped = _received_after_a_stall(heartbeats=False)
    assert last and (got == MESSAGES + 1 or dropped), (got, last, dropped)


def test_with_the_other_sockets_heartbeats_the_stalled_router_drops_the_connection_and_its_messages():
    """The mutation: the ROUTER with every other socket's heartbeats (a 1 s timeout) drops the connection itself,
    and what was queued on it (the test above can fail)."""
    got, _, _ = _received_after_a_stall(heartbeats=True)
    assert got < MESSAGES + 1


_HANG_UP_WHILE_FULL = textwrap.dedent("""
    import sys, time, zmq
    from meshq.io.sockets import HEARTBEAT_IVL_MS, new_socket
    context = zmq.Context()
    router = new_socket(context, zmq.ROUTER, 1 << 20)
    router.setsockopt(zmq.RCVHWM, 10)  # (the node's is 10,000: the same state, sooner)
    if sys.argv[1] == "heartbeats":  # as the node's ROUTER had them until 2026-12-07
        router.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 60_000)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    for _ in range(5000):
        dealer.send(b"x" * 100)
    time.sleep(0.5)  # the ROUTER's queue is full: it stopped reading the connection
    dealer.close()  # the peer hangs up
    time.sleep(4 * HEARTBEAT_IVL_MS / 1000)  # a heartbeat tick would write to the failed connection
    print("alive", flush=True)
""")


def _hang_up_while_full(variant: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _HANG_UP_WHILE_FULL, variant], capture_output=True, timeout=60)


def test_a_full_router_whose_peer_hangs_up_does_not_abort_the_process():
    done = _hang_up_while_full("node")
    assert done.returncode == 0 and b"alive" in done.stdout, done.stderr.decode(errors="replace")


def test_with_heartbeats_a_full_router_whose_peer_hangs_up_aborts_the_process():
    """The mutation, and why the ROUTER has none: libzmq 4.3.5 asserts (the test above can fail)."""
    done = _hang_up_while_full("heartbeats")
    assert done.returncode != 0 and b"_io_error" in done.stderr, (done.returncode, done.stderr[-500:])


_PUBLISHER_GONE_WHILE_FULL = textwrap.dedent("""
    import sys, time, zmq
    from meshq.io.sockets import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, new_socket
    context = zmq.Context()
    sub = new_socket(context, zmq.SUB, 1 << 20)
    sub.setsockopt(zmq.RCVHWM, 10)  # (the node's is 1,000: the same state, sooner)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    if sys.argv[1] == "heartbeats":  # as the node's SUB had them until 2026-12-07
        sub.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.5)
    for _ in range(5000):
        pub.send(b"x" * 100)
    time.sleep(0.5)  # the SUB's queue is full: it stopped reading
    pub.close()  # the publisher goes away
    time.sleep(4 * HEARTBEAT_IVL_MS / 1000)
    print("alive", flush=True)
""")


def test_a_full_sub_whose_publisher_goes_away_does_not_abort_the_process():
    done = subprocess.run([sys.executable, "-c", _PUBLISHER_GONE_WHILE_FULL, "node"], capture_output=True, timeout=60)
    assert done.returncode == 0 and b"alive" in done.stdout, done.stderr.decode(errors="replace")


def test_with_heartbeats_a_full_sub_whose_publisher_goes_away_aborts_the_process():
    done = subprocess.run([sys.executable, "-c", _PUBLISHER_GONE_WHILE_FULL, "heartbeats"], capture_output=True,
                          timeout=60)
    assert done.returncode != 0 and b"_io_error" in done.stderr, (done.returncode, done.stderr[-500:])
