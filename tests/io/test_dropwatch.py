"""``DropWatch`` never wedges libzmq's I/O thread (meshq.io.dropwatch).

libzmq writes a monitor event from its I/O thread with a blocking send. If the reading PAIR is closed while
the watched socket still lives, the next event blocks that thread for good, and every socket of the context
(every node of a process on ``zmq.Context.instance()``) stops moving data. A node closes a peer's DEALER when
the peer goes away, which is exactly when the other end drops the connection: the integration suite hung this
way, nodes started later in the same process never heard an answer. These tests close a watch, make the
watched socket's connection drop while the socket still lives, and require a fresh pair of sockets of the
same context to exchange a message.
"""

from __future__ import annotations

import time

import pytest
import zmq

from meshq.io.dropwatch import DropWatch

pytestmark = pytest.mark.timeout(60)

# more drops than libzmq's default high-water marks of the monitor pipe's two ends (1000 + 1000 messages)
ROUNDS = 2100


def _connected_pair(context: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return router, dealer


def _exchanges(context: zmq.Context, within_s: float) -> bool:
    """Whether a fresh DEALER/ROUTER pair of ``context`` gets one message across within ``within_s``."""
    router, dealer = _connected_pair(context)
    try:
        dealer.send(b"ping")
        return bool(router.poll(int(within_s * 1000)))
    finally:
        dealer.close(0)
        router.close(0)


def _drop_after_close(context: zmq.Context) -> None:
    """A watched DEALER whose watch is closed sees its connection drop while it is still open."""
    router, dealer = _connected_pair(context)
    watch = DropWatch(dealer)
    dealer.send(b"hello")
    assert router.poll(5000), "no connection within 5 s"
    router.recv_multipart()
    watch.close()
    router.close(0)  # the DEALER's connection drops now: libzmq would write EVENT_DISCONNECTED
    time.sleep(0.2)
    dealer.close(0)


def test_a_closed_watch_leaves_the_context_working_when_its_socket_drops_a_connection_afterwards():
    context = zmq.Context()
    working = False
    try:
        for _ in range(5):
            _drop_after_close(context)
        working = _exchanges(context, 5.0)
        assert working, "the context's I/O thread is blocked: a monitor event was written after its reader closed"
    finally:
        if working:  # a wedged context would never terminate: leave it to the process exit
            context.term()


def test_events_nobody_reads_for_a_while_never_block_the_context():
    """A watch nobody reads (a thread producer that stays idle while its peer flaps) collects the events;
    they are all there when it looks, and the context keeps working meanwhile."""
    context = zmq.Context()
    working = False
    try:
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # a message goes to a live connection only, not to a dropped one
        watch = DropWatch(dealer)
        for _ in range(ROUNDS):
            router = context.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            port = router.bind_to_random_port("tcp://127.0.0.1")
            dealer.connect(f"tcp://127.0.0.1:{port}")
            dealer.send(b"x")
            assert router.poll(5000), "no connection within 5 s"
            router.close(0)
            deadline = time.monotonic() + 5
            while dealer.getsockopt(zmq.EVENTS) & zmq.POLLOUT:  # until the connection is seen gone
                assert time.monotonic() < deadline, "the connection was not dropped within 5 s"
                time.sleep(0.005)
        working = _exchanges(context, 5.0)
        assert working, "the context's I/O thread is blocked: the monitor's pipe filled up"
        deadline = time.monotonic() + 5
        while not watch.dropped():
            assert time.monotonic() < deadline, "the drops were not reported"
            time.sleep(0.01)
        watch.close()
        dealer.close(0)
    finally:
        if working:
            context.term()
