"""Whether a DEALER's connection dropped: ``DropWatch``, a monitor of libzmq's ``EVENT_DISCONNECTED``.

libzmq drops a connection that heard nothing for ``HEARTBEAT_TIMEOUT_MS`` (a lossy link whose TCP
retransmissions back off, a short cut) or that the peer reset, and connects again by itself; a
request already written on the old connection, or the answer coming back on it, is gone. Both
places that wait for answers watch their DEALERs: a calling thread's direct produce
(``meshq.io.direct``: it sends the same bytes again) and the runtime (``meshq.io.runtime``: it
tells the core ``PeerDisconnected``, which fails the requests pending on that peer as retriable).

Two rules keep a monitor from wedging the whole context. libzmq writes each event to the
monitor's PAIR socket from its I/O thread with a *blocking* send, and that I/O thread serves
every socket of the context (every node of the process on ``zmq.Context.instance()``):

* the reading PAIR is connected with ``RCVHWM`` 0 (no limit), so events that nobody read for a
  while (a thread producer that stays idle while its peer flaps) never fill the pipe;
* ``close`` first stops the monitor (``zmq_socket_monitor(sock, NULL, 0)``, which takes the same
  lock as an event being written, so no event is written after it returns) and only then closes
  the reading PAIR: an event written to a PAIR whose peer is gone blocks forever. Callers close the
  watch before the DEALER it watches.

Each monitor gets an inproc endpoint name of its own (pyzmq's default names one after the
socket's file descriptor, which a new socket may reuse before the old endpoint is gone).
"""

from __future__ import annotations

import itertools
import logging

import zmq

from meshq.io.sockets import EVENTS, NOBLOCK, POLLIN

log = logging.getLogger("meshq.runtime")

_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
_NAMES = itertools.count()


class DropWatch:
    """Whether a DEALER's connection dropped since the last look: a PAIR socket reading the
    DEALER's ``EVENT_DISCONNECTED`` events, read without blocking through a plain socket even
    when the DEALER is an asyncio one. Used by the DEALER's thread only."""

    __slots__ = ("_sock", "_owner", "monitor")

    def __init__(self, sock: zmq.Socket) -> None:
        endpoint = f"inproc://meshq.dropwatch.{next(_NAMES)}"
        sock.monitor(endpoint, _DISCONNECTED)
        # of the DEALER's own context class (an asyncio one for an asyncio DEALER); read through a plain shadow.
        # An inproc PAIR that only ever carries libzmq's own event messages, never a peer's frame.
        owner = sock.context.socket(zmq.PAIR)
        try:
            owner.setsockopt(zmq.LINGER, 0)
            owner.setsockopt(zmq.RCVHWM, 0)
            owner.connect(endpoint)
        except zmq.ZMQError:
            owner.close(0)
            sock.monitor(None, 0)
            raise
        self._sock = sock
        self._owner = owner
        self.monitor = zmq.Socket.shadow(owner.underlying)

    def dropped(self) -> bool:
        """True when a drop was reported since the last call (every pending event is read)."""
        seen = False
        monitor = self.monitor
        try:
            # (asked through ZMQ_EVENTS first: a recv that finds nothing costs a raised zmq.Again)
            while monitor.getsockopt(EVENTS) & POLLIN:
                frames = monitor.recv_multipart(NOBLOCK)
                seen = seen or (len(frames) == 2 and len(frames[0]) >= 2
                                and int.from_bytes(frames[0][:2], "little") == _DISCONNECTED)
        except zmq.ZMQError:  # closed (the node stops): nothing more to tell
            pass
        return seen

    def close(self) -> None:
        """Stop the monitor, then close the reading end (in that order: see the module docstring).
        Call it before closing the watched DEALER."""
        try:
            if not self._sock.closed:
                self._sock.monitor(None, 0)
        except zmq.ZMQError:  # the DEALER is gone already: its monitor went with it
            pass
        self._owner.close(0)


class DropWatches:
    """The runtime's drop monitors: one ``DropWatch`` per peer DEALER, its reading end registered with the
    runtime's poller. ``peer_of`` maps each reading end to its peer (the runtime looks ready sockets up there)."""

    def __init__(self, poller: zmq.Poller) -> None:
        self._poller = poller
        self._by_peer: dict[str, DropWatch] = {}
        self.peer_of: dict[zmq.Socket, str] = {}  # read only outside this class

    def add(self, peer: str, sock: zmq.Socket) -> None:
        """Watch ``peer``'s new DEALER ``sock``. A monitor that cannot be made is logged and left out: requests
        on that connection still end at their timeout."""
        try:
            watch = DropWatch(sock)
        except zmq.ZMQError as exc:
            log.warning("cannot watch the connection to %s for drops: %s", peer, exc)
            return
        self._by_peer[peer] = watch
        self.peer_of[watch.monitor] = peer
        self._poller.register(watch.monitor, zmq.POLLIN)

    def dropped(self, peer: str) -> bool:
        """Whether ``peer``'s connection dropped since the last look (its monitor was readable)."""
        watch = self._by_peer.get(peer)
        return watch is not None and watch.dropped()

    def close(self, peer: str) -> None:
        """Stop watching ``peer``'s DEALER: call it before closing that DEALER."""
        watch = self._by_peer.pop(peer, None)
        if watch is not None:
            self._poller.unregister(watch.monitor)
            del self.peer_of[watch.monitor]
            watch.close()

    def close_all(self) -> None:
        for peer in list(self._by_peer):
            self.close(peer)
