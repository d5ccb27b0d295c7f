"""The keyed node's PUB socket: an XPUB that takes a data subscription only from the key it names.

Theory of operation
-------------------
A PUB sends a frame to every connection subscribed to a prefix of it, and lets any connection
subscribe to anything. In a keyed cluster the data frames for a node start with that node's
key (``meshq.core.pubsub.frames.keyed_data_prefix``), and the runtime's PUB is an XPUB with
``ZMQ_XPUB_MANUAL``: libzmq applies no subscription by itself but hands each one to ``drain``,
with the metadata of the connection it came on. The ZAP handler put the connection's verified
CURVE key there (``meshq.io.curve.KEY_PROPERTY``); ``frames.may_subscribe`` decides, and an
accepted (un)subscription is applied with ``setsockopt`` — libzmq applies it to the connection
of the message last received. A refused one is dropped and counted (``subscription_refused``
in the ``pubsub`` status section): a trusted key asking for another key's data runs modified
code. A message without the key is one libzmq made itself: the cancellations of a connection
that closed (libzmq already dropped its subscriptions); it is skipped.

One caveat of ``ZMQ_XPUB_MANUAL`` (libzmq 4.3): the "connection of the message last received"
is a queue of connections kept for (un)subscriptions only, but every message received pops
it, and an XSUB peer may send messages that are no (un)subscription. After such a message the
queue is ahead of the messages, so a subscription would be applied to a later one's
connection. ``drain`` therefore applies nothing from such a message until the socket has
nothing more to receive (then both queues are empty, and in step again), and counts what it
dropped meanwhile (``subscription_unsure``). Honest nodes subscribe with SUB sockets, which
never send such messages; a subscription dropped this way is lost (its node gets no data from
this publisher until it reconnects), which only a trusted key running modified code can cause.

``drain`` runs with ``Runtime.pub_lock`` held (the socket is shared with publishing threads).
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from meshq.core.pubsub.frames import may_subscribe
from meshq.io.curve import KEY_PROPERTY

log = logging.getLogger("meshq.pubsub")
_NOBLOCK = int(zmq.NOBLOCK)
_SUBSCRIBE = int(zmq.SUBSCRIBE)
_UNSUBSCRIBE = int(zmq.UNSUBSCRIBE)
MAX_PER_DRAIN = 1024  # subscriptions handled per drain (the rest wait for the next one)
_LOGGED_KEYS = 1000  # keys whose refusal was logged (beyond: counted only)


def new_keyed_pub(sock: zmq.Socket) -> zmq.Socket:
    """Make ``sock`` (an XPUB) take no subscription by itself: ``SubscriptionGate.drain`` decides."""
    sock.setsockopt(zmq.XPUB_MANUAL, 1)
    return sock


class SubscriptionGate:
    """Applies a keyed XPUB's subscriptions by ``may_subscribe`` (see the module docstring). ``counters``: the
    node's ``pubsub`` counters, where ``subscription_refused`` and ``subscription_unsure`` are added."""

    def __init__(self, sock: zmq.Socket, counters: dict, rule: Any = may_subscribe) -> None:
        self.sock = sock
        self.counters = counters
        counters.setdefault("subscription_refused", 0)
        counters.setdefault("subscription_unsure", 0)
        self.rule = rule
        self._out_of_step = False  # a message that is no (un)subscription was received since the socket was empty
        self._logged: set[str] = set()

    def drain(self) -> None:
        """Handle the subscriptions the XPUB holds (at most ``MAX_PER_DRAIN``); the caller holds the PUB's lock."""
        sock = self.sock
        for _ in range(MAX_PER_DRAIN):
            try:
                frame = sock.recv(_NOBLOCK, copy=False)
            except zmq.Again:
                self._out_of_step = False  # nothing queued: the connection queue is empty too
                return
            except zmq.ZMQError:  # closed meanwhile (stopping)
                return
            body = frame.bytes
            if not body or body[0] > 1:  # only an XSUB sends these: libzmq's queue of connections is now ahead
                self._out_of_step = True
                self._refuse(frame, "subscription_unsure", "sent a message that is no subscription")
                continue
            if self._out_of_step:
                self.counters["subscription_unsure"] += 1
                continue
            topic = body[1:]
            key = _key_of(frame)
            if key is None:  # libzmq's own cancellation for a closed connection (no connection, nothing to apply)
                continue
            if not self.rule(topic, key):
                self._refuse(frame, "subscription_refused", "asked for data addressed to another key")
                continue
            sock.setsockopt(_SUBSCRIBE if body[0] == 1 else _UNSUBSCRIBE, topic)

    def _refuse(self, frame: zmq.Frame, counter: str, what: str) -> None:
        self.counters[counter] += 1
        key = _key_of(frame)
        name = key.decode("ascii", "replace") if key is not None else "(none)"
        if name in self._logged or len(self._logged) >= _LOGGED_KEYS:
            return
        self._logged.add(name)
        log.warning("refused a subscription on this node's PUB: the connection of CURVE key %s (%s) %s; it gets "
                    "no data addressed to other nodes. A trusted key doing this runs modified code: remove it from "
                    "cluster/trusted/ if it should not be trusted", name, _user_id(frame), what)


def _key_of(frame: zmq.Frame) -> bytes | None:
    """The CURVE key (z85) the ZAP handler verified for the connection ``frame`` came on; None: not known."""
    try:
        key = frame.get(KEY_PROPERTY)
    except zmq.ZMQError:  # no such property (a message libzmq made itself, e.g. for a closed connection)
        return None
    return key.encode("ascii") if isinstance(key, str) else None


def _user_id(frame: zmq.Frame) -> str:
    try:
        return str(frame.get("User-Id"))
    except zmq.ZMQError:
        return "?"


__all__ = ["MAX_PER_DRAIN", "SubscriptionGate", "new_keyed_pub"]
