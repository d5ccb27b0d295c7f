"""A service's desk: requests that reach the serving thread's own socket (one at a time, issue #15).

Theory of operation
-------------------
Through the node's ROUTER a request crosses three threads on the serving side: the runtime
thread reads it and admits it, a worker runs the handler, and the runtime thread is woken again
to send the answer. Each wake-up of a sleeping thread costs 20-40 µs on a small machine, so a
request answered one at a time spent most of its time being handed over. A service served
with ``concurrency=1`` by a handler function (not a coroutine) on a node without CURVE keys
gets a *desk* instead: its one worker thread binds a ROUTER of its own, the node advertises
that endpoint (advert kind ``desks``: ``{service: endpoint}``), and a caller sending from its
own thread (``meshq.io.rpc_direct``) sends ``rpc_request`` there. The worker reads it, runs the
handler and answers on the same socket: one wake-up on each side, as a bare echo server has.

The worker still runs the jobs the core hands it (requests that came through the node's ROUTER:
pipelined ``rpc_batch``, requests from callers without a desk in view), one after the other with
the desk's requests, so ``concurrency=1`` still means one handler at a time.

This module holds what the desk decides, pure and without I/O, so that it can be tested alone:
which requests run (``Desk.admit``: the message type and service, a duplicate check of its own
with the ``rpc`` room's ``SeenKeys``, the caller's deadline), what each answer says (``Desk.answer``,
``Desk.refusal``; the same ``rpc_reply`` / ``rpc_error`` the room sends), and the counts the
desk hands to the room now and then (``Desk.report``: a ``DeskServed`` command), so that
``status`` counts a service's requests whichever way they came. The socket and the thread are
the shell's (``meshq.io.rpc``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from meshq.core import wire
from meshq.core.events import DeskServed, HandlerDone
from meshq.errors import MeshqError, error_code

DESKS = "desks"  # the advert kind (meshq.core.mesh.adverts): {service: endpoint of its desk}
SEEN_LIMIT = 65_536  # request keys remembered to run a duplicated request once
REPORT_S = 0.1  # the desk hands its counts to the room at most this often (and when it closes)

RUN, DROP, REFUSE = "run", "drop", "refuse"


class SeenKeys:
    """The last ``limit`` request keys (caller node, incarnation, request id), oldest first.

    An ``OrderedDict``: evicting a plain dict's first key again and again (``del d[next(iter(d))]``)
    rescans the deleted slots each time; at the limit that cost 25 µs per request."""

    __slots__ = ("_keys", "limit")

    def __init__(self, limit: int = SEEN_LIMIT) -> None:
        self._keys: OrderedDict[tuple, None] = OrderedDict()
        self.limit = limit

    def first_time(self, key: tuple) -> bool:
        """True the first time ``key`` is seen (and remembers it), False for a duplicate."""
        keys = self._keys
        if key in keys:
            return False
        keys[key] = None
        if len(keys) > self.limit:
            keys.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._keys)


def desks_of(value: Any) -> dict[str, str]:
    """The desks a peer's advert names, ``{service: endpoint}``; malformed entries are left out."""
    if type(value) is not dict:
        return {}
    return {name: endpoint for name, endpoint in value.items()
            if type(name) is str and type(endpoint) is str and endpoint.startswith("tcp://") and len(endpoint) < 300}


class Desk:
    """What the desk of ``service`` decides (see the module docstring). One per desk, used by its thread."""

    __slots__ = ("service", "node_id", "cluster", "seen", "served", "errors", "expired", "duplicates", "refused",
                 "invalid", "times_s", "_reported_s")

    def __init__(self, service: str, node_id: str, cluster: str) -> None:
        self.service = service
        self.node_id = node_id
        self.cluster = cluster
        self.seen = SeenKeys()
        self._reported_s = float("-inf")
        self._reset()

    def _reset(self) -> None:
        self.served = self.errors = self.expired = self.duplicates = self.refused = self.invalid = 0
        self.times_s: list[float] = []

    def admit(self, message: wire.Message, now_s: float) -> tuple[str, Any]:
        """What to do with ``message`` (decoded): ``(RUN, deadline_s)``; ``(DROP, None)`` for a
        duplicate or a message that is not a request (counted); ``(REFUSE, frames)`` with the
        ``rpc_error`` to send back (a request for another service: the caller tries another instance)."""
        if message.type != "rpc_request" or not message.request_id:
            self.invalid += 1
            return DROP, None
        body = message.body
        if body["service"] != self.service:
            self.refused += 1
            return REFUSE, self.refusal(message.request_id, "not_serving",
                                        f"{body['service']!r} has no desk on {self.node_id}")
        if not self.seen.first_time((message.sender, body["incarnation"], message.request_id)):
            self.duplicates += 1
            return DROP, None
        return RUN, now_s + body["timeout_ms"] / 1000.0

    def answer(self, request_id: int, done: HandlerDone) -> list[bytes] | None:
        """The frames answering a request the handler ran for (``done``: its outcome, as a worker
        makes it), or None when it was not run (its deadline had passed: its caller gave up)."""
        if done.expired:
            self.expired += 1
            return None
        self.times_s.append(done.elapsed_s)
        if done.reply is not None:
            self.served += 1
            return wire.encode(self.cluster, self.node_id, "rpc_reply", request_id, {}, (done.reply,))
        self.errors += 1
        return wire.encode(self.cluster, self.node_id, "rpc_error", request_id,
                           {"reason": "raised", "error_type": done.error_type[:200],
                            "message": done.error_message[:4096]})

    def bad_request(self, request_id: int, error: MeshqError) -> list[bytes]:
        """The frames of the ``error`` answering a request that does not decode (as the node's ROUTER answers it)."""
        return wire.encode(self.cluster, self.node_id, "error", request_id,
                           {"code": error_code(error), "message": str(error)[:4096], "retriable": False})

    def refusal(self, request_id: int, reason: str, text: str) -> list[bytes]:
        """The frames of an ``rpc_error`` saying the request did not run here (``busy``/``not_serving``)."""
        return wire.encode(self.cluster, self.node_id, "rpc_error", request_id,
                           {"reason": reason, "error_type": "", "message": text[:4096]})

    def report(self, now_s: float, force: bool = False) -> DeskServed | None:
        """The counts since the last report, as a command for the room; None when there is nothing
        to tell, or the last report was less than ``REPORT_S`` ago (unless ``force``)."""
        if not self.pending_report() or (not force and now_s - self._reported_s < REPORT_S):
            return None
        command = DeskServed(self.service, self.served, self.errors, self.expired, self.duplicates, self.refused,
                             self.invalid, tuple(self.times_s))
        self._reset()
        self._reported_s = now_s
        return command

    def pending_report(self) -> bool:
        """Some counts are not told yet (the shell then wakes up in time to tell them)."""
        return bool(self.served or self.errors or self.expired or self.duplicates or self.refused or self.invalid)


__all__ = ["DESKS", "DROP", "Desk", "REFUSE", "REPORT_S", "RUN", "SeenKeys", "desks_of"]
