"""Whether a DEALER's connection dropped: ``DropWatch``, a monitor of libzmq's ``EVENT_DISCONNECTED``.

libzmq drops a connection that heard nothing for ``HEARTBEAT_TIMEOUT_MS`` (a lossy link whose TCP
retransmissions back off, a short cut) or that the peer reset, and connects again by itself; a
request already written on the old connection, or the answer coming back on it, is gone. Both
places that wait for answers watch their DEALERs: a calling thread's direct produce
(``meshq.io.direct``: it sends the same bytes again) and the runtime (``meshq.io.runtime``: it
tells the core ``PeerDisconnected``, which fails the requests pending on that peer as retriable).
"""

from __future__ import annotations

import zmq

_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)


class DropWatch:
    """Whether a DEALER's connection dropped since the last look: the DEALER's monitor socket
    (pyzmq's ``get_monitor_socket``, libzmq's ``EVENT_DISCONNECTED`` only), read without blocking
    through a plain socket even when the DEALER is an asyncio one. Used by one thread only."""

    __slots__ = ("_owner", "monitor")

    def __init__(self, sock: zmq.Socket) -> None:
        self._owner = sock.get_monitor_socket(_DISCONNECTED)  # of the DEALER's own class and context
        self._owner.setsockopt(zmq.LINGER, 0)
        self.monitor = zmq.Socket.shadow(self._owner.underlying)

    def dropped(self) -> bool:
        """True when a drop was reported since the last call (every pending event is read)."""
        seen = False
        monitor = self.monitor
        try:
            # (asked through ZMQ_EVENTS first: a recv that finds nothing costs a raised zmq.Again)
            while monitor.getsockopt(_EVENTS) & _POLLIN:
                frames = monitor.recv_multipart(_NOBLOCK)
                seen = seen or (len(frames) == 2 and len(frames[0]) >= 2
                                and int.from_bytes(frames[0][:2], "little") == _DISCONNECTED)
        except zmq.ZMQError:  # closed (the node stops): nothing more to tell
            pass
        return seen

    def close(self) -> None:
        self._owner.close(0)
