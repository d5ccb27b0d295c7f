"""How every meshq socket is set up and written to: options, heartbeats, connect bounds and the send path.

Shared by the runtime thread (``meshq.io.runtime``) and the sockets callers own on their threads
(``meshq.io.direct``, ``meshq.io.rpc_direct``, ``meshq.io.rpc``'s desks, ``meshq.aio``), so that a socket
behaves the same whoever owns it.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from meshq.core.acl import UNKNOWN as UNKNOWN_CALLER

log = logging.getLogger("meshq.runtime")

# Plain ints: pyzmq's flag constants are enums, and combining or converting them costs a Python
# call on every frame of the hot path.
NOBLOCK = int(zmq.NOBLOCK)
NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
RCVMORE = int(zmq.RCVMORE)
EVENTS = int(zmq.EVENTS)
RCVTIMEO = int(zmq.RCVTIMEO)
POLLIN = int(zmq.POLLIN)
# The socket's own send, below pyzmq's ``Socket.send`` wrapper (which only adds the draft routing_id/group
# arguments meshq never uses): one Python frame less per frame sent. Falls back to the wrapper on a
# pyzmq whose class layout differs.
raw_send = getattr(zmq.Socket.__mro__[1], "send", zmq.Socket.send)
# Frames below this are copied into libzmq; larger ones go zero-copy. Zero-copy hands the
# buffer's release to pyzmq's garbage-collector thread (one more GIL hand-off per frame), which
# costs more than a memcpy of a ~100 KB batch (docs/performance.md: +15 % produce_batch at 1 MiB).
ZERO_COPY_BYTES = 1024 * 1024


# A heal must be noticed in well under a second (issue #19 item 10). A network cut leaves each TCP
# connection across it "established" while its retransmissions back off exponentially (0.2, 0.4, 0.8,
# ... s, up to 2 min): 10 s into a cut the next one is about 3 s away, and everything queued on the
# connection waits for it (measured: heal -> first reply 3.3 s after a 10 s cut). So every socket sends
# ZMTP heartbeats and drops a connection that heard nothing (no message, no PONG) for
# HEARTBEAT_TIMEOUT_MS; a connecting socket keeps its queued messages and connects afresh every
# RECONNECT_IVL (libzmq's default, 100 ms, never backed off here), each attempt given up after
# CONNECT_TIMEOUT_MS (a SYN lost in the cut would otherwise be retried only after 1, 3, 7, ... s). The
# first attempt after the heal gets through: within about CONNECT_TIMEOUT_MS + RECONNECT_IVL (0.2 s in
# the same measurement). CONNECT_TIMEOUT_MS bounds the TCP handshake alone, which the kernel answers even for
# a stopped process and a LAN completes in well under 1 ms: 250 ms (it was 500: heal -> first ack of blocked
# partitions in a 4-minute fault run of splits, seed 31, max 0.86 s with 500 ms; docs/testing.md). A peer
# that is merely slow still answers PINGs from libzmq's I/O thread, as long as its queue of our messages is
# not full (see ROUTER_HEARTBEAT_TIMEOUT_MS).
HEARTBEAT_IVL_MS = 250
HEARTBEAT_TIMEOUT_MS = 1000
CONNECT_TIMEOUT_MS = 250
# The node's ROUTER waits longer: it is the one socket any peer can send to without waiting for answers. libzmq stops
# reading a connection while its queue to the application is full (that is how it holds a fast sender back)
# and then cannot see the peer's traffic either, so the timeout fires though the peer is alive: with 1 s, a
# node that read fewer than ~1,000 of one peer's messages in a second (a burst on a loaded machine) dropped
# that connection and every message queued on it, up to ~10,000 requests lost without a trace
# (tests/io/test_router_backpressure.py). The ROUTER's side of a connection across a cut is never used
# again after the heal (the peer's DEALER connects afresh, see above), so it only has to be freed in time.
ROUTER_HEARTBEAT_TIMEOUT_MS = 60_000


def new_socket(context: zmq.Context, kind: int, max_frame_bytes: int, curve: Any = None,
               endpoint: str | None = None) -> zmq.Socket:
    """A socket set up as every meshq socket is: no linger, the frame size limit, deep queues, heartbeats
    and bounded connect attempts (see ``HEARTBEAT_TIMEOUT_MS``), and CURVE when the node has keys
    (``curve``: a ``meshq.io.curve.Curve``; ``endpoint``: where a client socket connects)."""
    sock = context.socket(kind)
    if curve is not None:
        curve.setup(sock, kind, endpoint)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
    return sock


def frame_peer_address(frame: zmq.Frame) -> str:
    """The IP address a received message came from (libzmq's ``Peer-Address``), "unknown" if none."""
    try:
        return frame.get("Peer-Address") or "unknown"
    except (zmq.ZMQError, UnicodeDecodeError):
        return "unknown"


def frame_user_id(frame: zmq.Frame) -> str:
    """The ZAP ``User-Id`` of a message's sender (``meshq.io.curve``: a client's name, or the cluster's);
    a message without one (cannot happen on a CURVE socket) gets an identity no grant names."""
    try:
        return frame.get("User-Id") or UNKNOWN_CALLER
    except (zmq.ZMQError, UnicodeDecodeError):
        return UNKNOWN_CALLER


def bind_tcp(sock: zmq.Socket, host: str, port: int) -> str:
    if port:
        sock.bind(f"tcp://{host}:{port}")
        return f"tcp://{host}:{port}"
    sock.bind(f"tcp://{host}:*")
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def send_frames(sock: zmq.Socket, frames: list) -> None:
    """Send ``frames`` without blocking; dropped (logged at DEBUG) when the peer is at its high-water mark."""
    try:
        for index in range(len(frames) - 1):
            frame = frames[index]
            raw_send(sock, frame, NOBLOCK_MORE, len(frame) < ZERO_COPY_BYTES)
        frame = frames[-1]
        raw_send(sock, frame, NOBLOCK, len(frame) < ZERO_COPY_BYTES)
    except zmq.Again:
        # High-water mark reached: the peer is not reading. Dropping is safe: every request
        # has a deadline, and the sender's retry (idempotent for produce) recovers.
        log.debug("dropped a message to a peer at its high-water mark")
    except zmq.ZMQError as exc:
        log.debug("send failed: %s", exc)


__all__ = ["CONNECT_TIMEOUT_MS", "EVENTS", "HEARTBEAT_IVL_MS", "HEARTBEAT_TIMEOUT_MS", "NOBLOCK", "NOBLOCK_MORE",
           "POLLIN", "RCVMORE", "RCVTIMEO", "ROUTER_HEARTBEAT_TIMEOUT_MS", "ZERO_COPY_BYTES", "bind_tcp",
           "frame_peer_address", "frame_user_id", "new_socket", "raw_send", "send_frames"]
