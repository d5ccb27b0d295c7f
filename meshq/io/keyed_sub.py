"""A keyed node's SUB side: one SUB socket per peer PUB, each made with that peer's server key.

Theory of operation
-------------------
An unkeyed node subscribes to every peer's PUB with one shared SUB socket. A keyed node cannot:
pub/sub data must come with the identity of its source, and a frame's own claim proves nothing.
So it connects one SUB per peer PUB (``subscribe``), with ``curve_serverkey`` set to the key
that peer listens with (the cluster key for a storage member, a client member's gossiped key):
only the holder of that key's secret completes the handshake, and every frame read on that
socket comes from that node (the ``via`` the runtime hands ``on_data``). Each socket subscribes
to the control prefix and to the data prefix naming this node's key; the peer's PUB is an XPUB
that takes that data subscription only from this key (``meshq.io.xpub``).

The runtime's loop polls the sockets (``node_of``: socket -> node id) and drains them; the core
decides when to subscribe and unsubscribe (``Subscribe`` / ``Unsubscribe`` effects, by endpoint).
Everything here runs on the runtime thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq

from meshq.core.pubsub import frames as pubsub_frames

log = logging.getLogger("meshq.pubsub")


class KeyedSubs:
    """The per-peer SUB sockets of a keyed node (see the module docstring)."""

    def __init__(self, members: Callable[[], Any], new_socket: Callable[[], zmq.Socket], own_prefix: bytes,
                 server_key: Callable[[str], bytes], poller: zmq.Poller, hwm: int) -> None:
        self._members = members  # -> the core's member table (or None before there is one)
        self._new_socket = new_socket  # -> a fresh CURVE SUB socket
        self._own_prefix = own_prefix  # the data prefix naming this node's key
        self._server_key = server_key  # PUB endpoint -> the key its node listens with
        self._poller = poller
        self._hwm = hwm
        self._by_endpoint: dict[str, zmq.Socket] = {}
        self.node_of: dict[zmq.Socket, str] = {}  # socket -> the node whose PUB it reaches (polled by the loop)

    def subscribe(self, endpoint: str) -> None:
        """(Re)connect a SUB to the PUB at ``endpoint``, trusting only the key its member listens with."""
        self.unsubscribe(endpoint)
        members = self._members()
        member = None if members is None else next(
            (m for m in members.members.values() if m.pub_address == endpoint), None)
        if member is None:
            log.warning("cannot subscribe to %s: no member announces that PUB endpoint", endpoint)
            return
        sock = self._new_socket()
        sock.setsockopt(zmq.SUBSCRIBE, pubsub_frames.CONTROL_PREFIX)
        sock.setsockopt(zmq.SUBSCRIBE, self._own_prefix)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        sock.curve_serverkey = self._server_key(endpoint)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            log.warning("cannot subscribe to %s: %s", endpoint, exc)
            return
        self._by_endpoint[endpoint] = sock
        self.node_of[sock] = member.node_id
        self._poller.register(sock, zmq.POLLIN)

    def unsubscribe(self, endpoint: str) -> None:
        sock = self._by_endpoint.pop(endpoint, None)
        if sock is not None:
            self.node_of.pop(sock, None)
            self._poller.unregister(sock)
            sock.close(0)

    def close(self) -> None:
        for sock in list(self._by_endpoint.values()):
            sock.close(0)
        self._by_endpoint.clear()
        self.node_of.clear()
