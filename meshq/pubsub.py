"""The public side of pub/sub: a received ``Message`` and a ``Subscription`` to read them from.

``Node.subscribe`` returns a ``Subscription``; ``recv(timeout=...)`` returns the next
``Message`` (``.subject .data .headers .source``), ``for msg in sub:`` reads until the
subscription is closed, ``close()`` withdraws the interest. Each subscription has a bounded
queue (``max_pending`` messages): when the application reads too slowly, what does not fit is
dropped and counted (``dropped``), never blocking the publisher or the node.
"""

from __future__ import annotations

import queue as queue_module
from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple

from meshq.core.pubsub.room import SubscriptionStats
from meshq.errors import SubscriptionClosedError, TimeoutError

DEFAULT_MAX_PENDING = 65_536


class Message(NamedTuple):
    """A published message as a subscriber receives it (a named tuple: cheap to build per message)."""

    subject: str
    data: bytes
    headers: dict[str, bytes] | None
    source: str  # the node id of the publisher


_CLOSED = object()  # put in the queue by close(): wakes a blocked recv


class Subscription:
    """Messages published to subjects matching ``pattern`` (see the module docstring).

    Messages arrive in lists (a batch from a peer, or one from this node) on a ``SimpleQueue``;
    ``recv`` keeps the rest of a list in a buffer of its own. What is pending is counted by
    three monotonic counters, each written by one thread only: messages accepted from peers
    (the runtime thread), from this node's publishers (under the publish lock), and read.
    """

    __slots__ = ("sub_id", "pattern", "queue", "max_pending", "stats", "_queue", "_buffer", "_read", "_closed",
                 "_shell", "__weakref__")

    def __init__(self, shell: Any, sub_id: int, pattern: str, queue: str | None, max_pending: int) -> None:
        self.sub_id = sub_id
        self.pattern = pattern
        self.queue = queue
        self.max_pending = max_pending
        self.stats = SubscriptionStats()
        self._queue: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self._buffer: deque[Message] = deque()
        self._read = 0
        self._closed = False
        self._shell = shell

    @property
    def delivered(self) -> int:
        """Messages accepted into this subscription's queue so far."""
        return self.stats.delivered + self.stats.delivered_local

    @property
    def dropped(self) -> int:
        """Messages dropped because the queue held ``max_pending`` unread messages."""
        return self.stats.dropped + self.stats.dropped_local

    @property
    def pending(self) -> int:
        """Messages received and not read yet."""
        return self.stats.delivered + self.stats.delivered_local - self._read

    @property
    def closed(self) -> bool:
        return self._closed

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; waits up to ``timeout`` seconds (None: forever). Raises
        ``meshq.TimeoutError`` when none came, ``SubscriptionClosedError`` once closed and drained."""
        buffer = self._buffer
        if not buffer:
            try:
                item = self._queue.get(timeout=timeout)
            except queue_module.Empty:
                raise TimeoutError(f"no message on {self.pattern!r} within {timeout} s") from None
            return self._unpack(item)
        self._read += 1
        return buffer.popleft()

    def _unpack(self, item: Any) -> Message:
        """The first message of a list taken from the queue (the rest to the buffer), or the end."""
        if item is _CLOSED:
            self._queue.put(_CLOSED)  # every later recv (and other waiting threads) see it too
            raise SubscriptionClosedError(f"the subscription to {self.pattern!r} is closed; subscribe again "
                                          f"to receive more")
        self._read += 1
        if len(item) == 1:
            return item[0]
        self._buffer.extend(item[1:])
        return item[0]

    def __iter__(self) -> Iterator[Message]:
        """Every message until the subscription is closed (from another thread, or the node stops)."""
        while True:
            try:
                yield self.recv()
            except SubscriptionClosedError:
                return

    def close(self) -> None:
        """Stop receiving: the interest is withdrawn from the mesh; messages already queued can still
        be read. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._shell.unsubscribe(self)
        finally:
            self._queue.put(_CLOSED)

    def _node_stopped(self) -> None:
        """The node stops (``PubSubShell.close``): end the subscription; there is nothing to withdraw."""
        if not self._closed:
            self._closed = True
            self._queue.put(_CLOSED)

    def _offer(self, messages: list[Message]) -> None:
        """From the thread reading the SUB socket: queue what fits under ``max_pending``; drop and
        count the rest."""
        stats = self.stats
        room = self.max_pending - (stats.delivered + stats.delivered_local - self._read)
        if room < len(messages):
            if room <= 0:
                stats.dropped += len(messages)
                return
            stats.dropped += len(messages) - room
            messages = messages[:room]
        stats.delivered += len(messages)
        self._queue.put(messages)

    def _offer_local(self, message: Message) -> None:
        """From a publishing thread of this node (under the publish lock)."""
        stats = self.stats
        if stats.delivered + stats.delivered_local - self._read >= self.max_pending:
            stats.dropped_local += 1
        else:
            stats.delivered_local += 1
            self._queue.put([message])

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        queue = f", queue={self.queue!r}" if self.queue else ""
        return f"<Subscription {self.pattern!r}{queue} delivered={self.delivered} dropped={self.dropped}>"


__all__ = ["DEFAULT_MAX_PENDING", "Message", "Subscription"]
