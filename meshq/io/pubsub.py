"""Pub/sub's I/O shell: publishing from the caller's thread, delivering into subscription queues.

Theory of operation
-------------------
Where a message goes is decided by the pure ``meshq.core.pubsub.room`` (routes cached per
subject, replaced when interest changes). This shell carries it out without the runtime's
command queue, so a publish costs no thread hand-off:

* ``publish`` runs on the caller's thread. Under ``lock`` (shared with the runtime thread,
  which uses the same PUB socket for heartbeats: a ZeroMQ socket may move between threads
  behind a lock) it asks the room for the publish's targets, sends one two-frame message per
  interested node on the runtime's PUB socket, and puts the message in the queues of this
  node's own matching subscriptions. ``NOBLOCK``: a node whose queue at our PUB socket is full
  (its high-water mark: paused, slow) loses the message, counted by the receiver as a gap in
  our sequence numbers; the publisher never waits.
* ``on_data`` runs on the runtime thread for each data frame its SUB socket receives: the
  room decodes and counts it, picks the local subscriptions, and the message is offered to
  each one's bounded queue (full: dropped, counted per subscription).

The lock also serialises publishes between threads, which keeps each thread's messages in
order, the room's per-peer sequence numbers exact, and the ``*_local`` counters race-free.
"""

from __future__ import annotations

import itertools
from typing import Any

import zmq

from meshq.core.events import AddSubscription, RemoveSubscription
from meshq.core.pubsub.frames import check_headers
from meshq.core.pubsub.room import MAX_PAYLOAD_BYTES
from meshq.core.pubsub.subjects import validate_pattern, validate_queue, validate_subject
from meshq.errors import MessageTooLargeError, NodeStoppedError, ProtocolError, UsageError
from meshq.pubsub import Message, Subscription

_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_VALID_SUBJECTS = 4096  # subjects known valid (the set is dropped wholesale when full)


class PubSubShell:
    """See the module docstring. ``node`` is the ``meshq.Node`` it serves."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.runtime = node.runtime
        self.room = node.core.pubsub
        self.lock = node.runtime.pub_lock
        self.subscriptions: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._valid: set[str] = set()
        self.max_payload_bytes = min(MAX_PAYLOAD_BYTES, node.core.config.max_frame_bytes - 64 * 1024)
        self.closed = False
        node.runtime.on_data = self.on_data

    # ------------------------------------------------------------------ caller threads
    def publish(self, subject: str, data: Any, headers: Any = None) -> None:
        if subject not in self._valid:
            validate_subject(subject)
            if len(self._valid) >= _VALID_SUBJECTS:
                self._valid = set()
            self._valid.add(subject)
        if type(data) is not bytes:
            data = _as_bytes(data)
        if len(data) > self.max_payload_bytes:
            raise MessageTooLargeError(f"a message of {len(data)} bytes is over the {self.max_payload_bytes}-byte "
                                       f"limit of pub/sub; send large data as a topic record or in pieces")
        if headers:
            headers = check_headers(headers)
        with self.lock:
            pub = self.runtime.pub
            if self.closed or pub is None or pub.closed:
                raise NodeStoppedError("the node was stopped; nothing was published")
            local, sends = self.room.prepare(subject, headers)
            for _node, frame in sends:
                try:
                    pub.send(frame, _NOBLOCK_MORE)
                    pub.send(data, _NOBLOCK)
                except zmq.Again:  # (PUB drops at its high-water mark rather than raising; kept for safety)
                    pass
            if local:
                message = Message(subject, data, headers, self.room.node_id)
                subscriptions = self.subscriptions
                for sub_id in local:
                    sub = subscriptions.get(sub_id)
                    if sub is not None:
                        sub._offer_local(message)

    def subscribe(self, pattern: str, queue: str | None, max_pending: int, timeout_s: float) -> Subscription:
        validate_pattern(pattern)
        validate_queue(queue)
        if type(max_pending) is not int or max_pending < 1:
            raise UsageError(f"max_pending must be a positive number of messages, not {max_pending!r}")
        sub = Subscription(self, next(self._ids), pattern, queue, max_pending)
        self.subscriptions[sub.sub_id] = sub
        try:
            self.node._call(AddSubscription(sub.sub_id, pattern, queue, sub.stats), timeout_s)
        except BaseException:
            self.subscriptions.pop(sub.sub_id, None)
            sub._closed = True
            raise
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscriptions.pop(sub.sub_id, None)
        if self.closed:
            return
        try:
            self.node._call(RemoveSubscription(sub.sub_id), 5.0)
        except NodeStoppedError:
            pass  # the node stopped meanwhile: nothing to withdraw

    def close(self) -> None:
        """The node stops: every subscription ends (a blocked ``recv`` raises, iteration ends)."""
        self.closed = True
        for sub in list(self.subscriptions.values()):
            sub.close()

    # ------------------------------------------------------------------ the runtime thread
    def on_data(self, frame: bytes, data: bytes) -> None:
        room = self.room
        try:
            source, subject, queues, headers = room.received(frame)
        except ProtocolError:
            return  # counted by the room
        message = None
        subscriptions = self.subscriptions
        for sub_id in room.deliveries(subject, queues):
            sub = subscriptions.get(sub_id)
            if sub is not None:
                if message is None:
                    message = Message(subject, data, headers, source)
                sub._offer(message)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise UsageError(f"published data must be bytes (or str), not {type(value).__name__}")


__all__ = ["PubSubShell"]
