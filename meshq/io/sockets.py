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
# not full. A DEALER's receive queue is unbounded (RCVHWM 0): it holds only answers to its own requests, so
# it is bounded by what it sent, and it never stops reading (the abort below needs a queue that is full).
HEARTBEAT_IVL_MS = 250
HEARTBEAT_TIMEOUT_MS = 1000
CONNECT_TIMEOUT_MS = 250
# ROUTER sockets (the node's, and desks') send no ZMTP heartbeats at all. libzmq 4.3.5 aborts the whole process
# (`Assertion failed: !_io_error (stream_engine_base.cpp:310)`) when a socket with ZMTP heartbeats has stopped
# reading a connection because its queue to the application is full and the peer then closes it: the hang-up
# marks the connection failed, and the next heartbeat tick writes to it (tests/io/test_full_queues.py
# reproduces it). A ROUTER is where that happens: a node that was stopped, or starved, wakes to a backlog, and
# its peers' DEALERs, whose pings it does not answer meanwhile, drop their connections (a node died so in a
# 30-minute fault run, 2026-12-07). A ROUTER needs no heartbeats of its own: the connecting DEALERs ping it
# (libzmq answers a ping whatever the socket's own options, while it reads: a ROUTER that reads nothing for over
# a second makes its peer's DEALER drop the connection, which the DEALER sees and recovers from by sending again,
# meshq.io.dropwatch; its own pings used to keep that DEALER waiting), and it only has to free its end of a connection
# across a cut in time, which TCP does: retransmissions given up after ROUTER_MAXRT_MS, idle connections probed
# after ROUTER_KEEPALIVE_IDLE_S. (With heartbeats it had to wait 60 s anyway: with the 1 s of the other sockets,
# a ROUTER whose application did not read for a second dropped the connection and every message queued on it.)
ROUTER_MAXRT_MS = 60_000
ROUTER_KEEPALIVE_IDLE_S, ROUTER_KEEPALIVE_INTVL_S, ROUTER_KEEPALIVE_CNT = 30, 10, 3
# SUB sockets neither: their queue to the application is bounded (the pub/sub high-water mark: a subscriber that
# falls behind makes its publishers drop), so it can be full when a publisher goes away (a peer killed, or one
# whose heartbeats dropped us while we read nothing), and a SUB with heartbeats then aborted the process the same
# way. A SUB only receives: TCP keepalive finds a dead link instead. Its peer's heartbeats arrive twice a second,
# so a live link is never idle and never probed; across a cut, probes start after SUB_KEEPALIVE_IDLE_S and the
# link is given up after SUB_KEEPALIVE_CNT unanswered ones, one per SUB_KEEPALIVE_INTVL_S (~3 s), and the SUB
# connects afresh as a DEALER does; a probe after the heal finds the publisher's end gone (it has heartbeats and
# dropped it) and is reset at once.
SUB_KEEPALIVE_IDLE_S, SUB_KEEPALIVE_INTVL_S, SUB_KEEPALIVE_CNT = 1, 1, 2


def _keepalive(sock: zmq.Socket, idle_s: int, interval_s: int, count: int) -> None:
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, idle_s)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, interval_s)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, count)


def new_socket(context: zmq.Context, kind: int, max_frame_bytes: int, curve: Any = None,
               endpoint: str | None = None) -> zmq.Socket:
    """A socket set up as every meshq socket is: no linger, the frame size limit, deep queues, heartbeats
    (TCP's own bounds for a ROUTER or a SUB: see ``ROUTER_MAXRT_MS``) and bounded connect attempts (see
    ``HEARTBEAT_TIMEOUT_MS``), and CURVE when the node has keys
    (``curve``: a ``meshq.io.curve.Curve``; ``endpoint``: where a client socket connects)."""
    sock = context.socket(kind)
    if curve is not None:
        curve.setup(sock, kind, endpoint)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 0 if kind == zmq.DEALER else 10_000)
    if kind == zmq.ROUTER:  # no ZMTP heartbeats: see ROUTER_MAXRT_MS
        sock.setsockopt(zmq.TCP_MAXRT, ROUTER_MAXRT_MS)
        _keepalive(sock, ROUTER_KEEPALIVE_IDLE_S, ROUTER_KEEPALIVE_INTVL_S, ROUTER_KEEPALIVE_CNT)
    elif kind == zmq.SUB:  # neither (see SUB_KEEPALIVE_IDLE_S)
        _keepalive(sock, SUB_KEEPALIVE_IDLE_S, SUB_KEEPALIVE_INTVL_S, SUB_KEEPALIVE_CNT)
    else:
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
           "POLLIN", "RCVMORE", "RCVTIMEO", "ROUTER_MAXRT_MS", "ZERO_COPY_BYTES", "bind_tcp",
           "frame_peer_address", "frame_user_id", "new_socket", "raw_send", "send_frames"]
