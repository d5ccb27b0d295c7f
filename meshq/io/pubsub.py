"""Pub/sub's I/O shell: publishing from the caller's thread, delivering into subscription queues.

Theory of operation
-------------------
Where a message goes is decided by the pure ``meshq.core.pubsub.room`` (routes cached per
subject, replaced when interest changes). This shell carries it out without the runtime's
command queue, so a publish costs no thread hand-off:

* ``publish`` runs on the caller's thread. Under ``lock`` it asks the room for the publish's
  targets, puts the message in the queues of this node's own matching subscriptions, and
  appends it to a buffer per interested node. A buffer is sent as one batch (two frames, see
  ``meshq.core.pubsub.frames``) on the runtime's PUB socket when it holds ``BATCH_MESSAGES``
  messages or ``BATCH_BYTES`` bytes — by the publishing thread itself — or else as soon as the
  runtime thread runs the flush that the first message of the buffer asked for
  (``Runtime.call_later(0, ...)``). So a lone message leaves within a thread wake-up, and a
  burst leaves in batches whose size grows with the load, with no timer to tune.
* Keyed, a batch's first frame names the receiving node's key after ``DATA_MARK``
  (``frames.keyed_data_prefix``): the runtime's XPUB hands a node's data only to the connection
  of that key (``meshq.io.xpub``).
* The runtime's PUB socket is shared with the runtime thread (heartbeats, adverts): every
  use holds ``Runtime.pub_lock`` (a ZeroMQ socket may move between threads behind a lock).
  Sends are ``NOBLOCK``: a node whose queue at our PUB socket is full (its high-water mark:
  paused, slow) loses the batch, counted by the receiver as a gap in our sequence numbers;
  the publisher never waits.
* ``on_data`` runs on the runtime thread for each batch its SUB socket receives: the room
  decodes and counts it, picks the local subscriptions of each message, and each
  subscription is offered its messages at once (its bounded queue drops what does not fit,
  counted per subscription).

The lock also serialises publishes between threads, which keeps each thread's messages in
order, the room's per-peer sequence numbers exact, and the ``*_local`` counters race-free.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import zmq

from meshq.core.events import AddSubscription, RemoveSubscription
from meshq.core.pubsub.frames import add_key, check_headers
from meshq.core.pubsub.room import MAX_PAYLOAD_BYTES
from meshq.core.pubsub.subjects import validate_pattern, validate_queue, validate_subject
from meshq.errors import MessageTooLargeError, NodeStoppedError, ProtocolError, UsageError
from meshq.io.sockets import NOBLOCK, NOBLOCK_MORE
from meshq.pubsub import Message, Subscription

BATCH_MESSAGES = 512  # a buffer is sent by the publishing thread once it holds this many messages...
BATCH_BYTES = 64 * 1024  # ...or this many bytes of data (counted once messages are over 256 bytes:
# below that, BATCH_MESSAGES bounds a batch to 128 KiB anyway)
_VALID_SUBJECTS = 4096  # subjects known valid (the set is dropped wholesale when full)
_FLUSH_RETRY_S = 0.001  # the runtime thread found a publisher mid-burst: it looks again this much later
_STALE_S = 0.001  # mid-burst, a publisher sends every buffer once the runtime's flush has waited this long
_monotonic = time.monotonic


class PubSubShell:
    """See the module docstring. ``node`` is the ``meshq.Node`` it serves."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.runtime = node.runtime
        self.room = node.core.pubsub
        self.node_id = node.core.node_id
        self.lock = node.runtime.pub_lock
        self.subscriptions: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._valid: set[str] = set()
        self._buffers: dict[str, list] = {}  # node -> messages not sent yet: (subject, queues, headers, data)
        self._flush_asked = False
        self._asked_s = 0.0  # when the runtime thread was last asked to flush (or a publisher sent what waited)
        self.max_payload_bytes = min(MAX_PAYLOAD_BYTES, node.core.config.max_frame_bytes - 64 * 1024)
        self.closed = False
        self.keyed = node.runtime.curve is not None
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
        else:
            headers = None
        with self.lock:
            if self.closed or self.runtime.left.is_set():
                raise NodeStoppedError("the node was stopped (or left the cluster); nothing was published")
            local, nodes = self.room.plan(subject)
            if nodes:
                buffers = self._buffers
                grouped = type(nodes) is dict
                for node in nodes:
                    entry = (subject, nodes[node] or None, headers, data) if grouped else (subject, None, headers, data)
                    buffer = buffers.get(node)
                    if buffer is None:
                        buffers[node] = [entry]
                        if not self._flush_asked:
                            self._flush_asked = True
                            self._asked_s = _monotonic()
                            self.runtime.call_later(0.0, self._flush_from_runtime)
                        elif _monotonic() - self._asked_s > _STALE_S:
                            self._send_stale()
                    else:
                        buffer.append(entry)
                        if len(buffer) >= BATCH_MESSAGES:
                            self._send(node, buffers.pop(node))
                            if _monotonic() - self._asked_s > _STALE_S:
                                self._send_stale()
                        elif len(data) > 256 and sum(len(e[3]) for e in buffer) >= BATCH_BYTES:
                            self._send(node, buffers.pop(node))
            if local:
                message = Message(subject, data, headers, self.node_id)
                subscriptions = self.subscriptions
                for sub_id in local:
                    sub = subscriptions.get(sub_id)
                    if sub is not None:
                        sub._offer_local(message)

    def _send_stale(self) -> None:
        """Mid-burst (the lock is held), the runtime thread's flush has waited over ``_STALE_S``: send every
        buffer now, so a message the burst does not push out (another node, another subject) is not held."""
        self._send_all()
        self._asked_s = _monotonic()

    def _send_all(self) -> None:
        """Send every buffer (the lock is held); emptied in place: ``publish`` holds it in a local."""
        buffers = self._buffers
        for node in sorted(buffers):
            self._send(node, buffers[node])
        buffers.clear()

    def _send(self, node: str, entries: list) -> None:
        """Send one batch (the lock is held)."""
        pub = self.runtime.pub
        frames = self.room.batch(node, entries)
        if pub is None or pub.closed:
            return
        first = frames[0]
        if self.keyed:  # the prefix names the key the node listens with (meshq.core.pubsub.frames)
            first = add_key(first, self.runtime.data_key(node))
        try:
            pub.send(first, NOBLOCK_MORE)
            pub.send(frames[1], NOBLOCK)
        except zmq.ZMQError:  # (PUB drops at its high-water mark rather than raising; kept for safety)
            pass

    def flush(self) -> None:
        """Send every buffered message now."""
        with self.lock:
            self._flush_asked = False
            self._send_all()

    def _flush_from_runtime(self) -> None:
        # A publisher holding the lock is mid-burst: it sends its full batches itself, and with them
        # whatever has waited over _STALE_S (``_send_stale``), so the runtime thread does not queue
        # behind it (and take turns with it for the lock and the GIL); it looks again shortly, for the
        # tail of the burst.
        if not self.lock.acquire(blocking=False):
            self.runtime.call_later(_FLUSH_RETRY_S, self._flush_from_runtime)
            return
        try:
            self._flush_asked = False
            self._send_all()
        finally:
            self.lock.release()

    def subscribe(self, pattern: str, queue: str | None, max_pending: int, timeout_s: float) -> Subscription:
        sub, command = self.prepare_subscription(Subscription, pattern, queue, max_pending)
        try:
            self.node._call(command, timeout_s)
        except BaseException:
            self.abandon_subscription(sub)
            raise
        return sub

    def prepare_subscription(self, kind: Any, pattern: str, queue: str | None, max_pending: int,
                             *extra: Any) -> tuple[Any, AddSubscription]:
        """A new subscription of class ``kind`` (``Subscription``, or meshq.aio's), registered here
        so it receives from now on, and the command that tells the core of its interest."""
        validate_pattern(pattern)
        validate_queue(queue)
        if type(max_pending) is not int or max_pending < 1:
            raise UsageError(f"max_pending must be a positive number of messages, not {max_pending!r}")
        sub = kind(self, next(self._ids), pattern, queue, max_pending, *extra)
        self.subscriptions[sub.sub_id] = sub
        return sub, AddSubscription(sub.sub_id, pattern, queue, sub.stats)

    def abandon_subscription(self, sub: Subscription) -> None:
        """The core did not take the subscription's interest."""
        self.subscriptions.pop(sub.sub_id, None)
        sub._closed = True

    def unsubscribe(self, sub: Subscription) -> None:
        command = self.unsubscribe_command(sub)
        if command is None:
            return
        try:
            self.node._call(command, 5.0)
        except NodeStoppedError:
            pass  # the node stopped meanwhile: nothing to withdraw

    def unsubscribe_command(self, sub: Subscription) -> RemoveSubscription | None:
        """Stop delivering to ``sub``; the command that withdraws its interest (None: the node stopped)."""
        self.subscriptions.pop(sub.sub_id, None)
        return None if self.closed else RemoveSubscription(sub.sub_id)

    def close(self) -> None:
        """The node stops: what is buffered is sent, every subscription ends (a blocked ``recv``
        raises, iteration ends)."""
        self.flush()
        with self.lock:
            self.closed = True
        for sub in list(self.subscriptions.values()):
            self.subscriptions.pop(sub.sub_id, None)
            sub._node_stopped()

    # ------------------------------------------------------------------ the runtime thread
    def on_data(self, frame: bytes, payloads: bytes, via: str | None = None) -> None:
        room = self.room
        try:
            source, entries = room.received(frame, payloads, via)
        except ProtocolError:
            return  # counted by the room
        subscriptions = self.subscriptions
        deliveries = room.deliveries
        if not entries:
            return  # (every message refused: its source may not publish them)
        if len(entries) == 1:
            subject, queues, headers, data = entries[0]
            message = None
            for sub_id in deliveries(subject, queues):
                sub = subscriptions.get(sub_id)
                if sub is not None:
                    if message is None:
                        message = Message(subject, data, headers, source)
                    sub._offer([message])
            return
        per_sub: dict[int, list[Message]] = {}
        last_subject = None
        targets: list[int] = []
        for subject, queues, headers, data in entries:
            if queues is not None or subject != last_subject:  # (a queue group picks a member per message)
                targets = deliveries(subject, queues)
                last_subject = None if queues is not None else subject
            if not targets:
                continue
            message = Message(subject, data, headers, source)
            for sub_id in targets:
                batch = per_sub.get(sub_id)
                if batch is None:
                    per_sub[sub_id] = [message]
                else:
                    batch.append(message)
        for sub_id, messages in per_sub.items():
            sub = subscriptions.get(sub_id)
            if sub is not None:
                sub._offer(messages)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise UsageError(f"published data must be bytes (or str), not {type(value).__name__}")


__all__ = ["BATCH_BYTES", "BATCH_MESSAGES", "PubSubShell"]
