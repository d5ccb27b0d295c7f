"""The outbox: what a node's rooms ask of the outside world, and the waits they keep.

Theory of operation
-------------------
Every room of the core (``meshq.core.node`` lists them) reaches the world only through this
one object, so the runtime and the simulator each have a single thing to drain:

* **effects** (``meshq.core.events``): a room appends them with ``emit``; the root hands
  the list to its runtime at the end of each call (``take``);
* **timers**: a heap of ``(deadline_s, seq, kind, key)``. ``kind`` names the room's duty
  (``request``, ``fetch``, ``acks``, ``heartbeat``...); the root routes each due timer to
  the room registered for its kind. ``seq`` keeps equal deadlines in the order they were
  set, so a run is reproducible;
* **pending requests**: each request this node sent, by request id, with what to do with
  its reply or error; a ``request`` timer (for a batch: one ``requests`` timer, at its earliest
  deadline) fails it with ``TimeoutError`` when no reply
  came. A request addressed to this node itself is not encoded: it goes straight to the
  root's dispatch, and its reply comes back through a local inbox drained at the end of
  the call (no recursion, no sockets);
* **connections**: the endpoint of every peer key a DEALER is open to (``connect``).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from meshq.core import wire
from meshq.core.events import Connect, Disconnect, Reply, Send
from meshq.errors import MeshqError, NotLeaderError, TimeoutError, error_code, error_from_code

# Request types answered, besides ``<type>_ok`` or ``error``, with another reply type.
OTHER_REPLIES = {"raft_propose": ("leave_ok",),  # a leave proposed to the metadata leader
                 "advert_get": ("advert_ok",),
                 "rpc_request": ("rpc_reply", "rpc_error")}


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """Reply handle for a request this node sent to itself."""

    request_id: int


@dataclass(slots=True)
class PendingRequest:
    """A request sent and not yet answered: its reply goes to ``on_reply``, a failure to ``on_error``."""

    request_id: int
    peer: str
    type: str
    deadline_s: float
    on_reply: Callable[[wire.Message], None]
    on_error: Callable[[MeshqError], None]


class Outbox:
    """Effects, timers, pending requests and connections of one node (see the module docstring)."""

    def __init__(self, cluster: str, node_id: str, serve: Callable[[Any, wire.Message, float], None]) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self._serve = serve  # the root's dispatch, for requests this node sends to itself
        self._effects: list = []
        self._timers: list[tuple[float, int, str, Any]] = []
        self._timer_seq = 0
        self.pending: dict[int, PendingRequest] = {}
        self._next_request_id = 1
        self._local_inbox: deque = deque()
        self.peer_endpoints: dict[str, str] = {}  # peer key -> endpoint its DEALER is connected to
        self.late_replies: dict[str, int] = {}  # replies that matched no pending request, by type
        # reply types that answer several requests at once: type -> function splitting one into the
        # single replies it carries (each then matched to its pending request as any reply)
        self.splitters: dict[str, Callable[[wire.Message], list[wire.Message]]] = {}

    # ------------------------------------------------------------------ effects
    def emit(self, effect: Any) -> None:
        self._effects.append(effect)

    def take(self) -> list:
        effects, self._effects = self._effects, []
        return effects

    # ------------------------------------------------------------------ timers
    def schedule(self, deadline_s: float, kind: str, key: Any) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline_s, self._timer_seq, kind, key))

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def due(self, now_s: float) -> Iterator[tuple[str, Any]]:
        """Pop the timers due at ``now_s``, earliest first (timers set meanwhile are included)."""
        while self._timers and self._timers[0][0] <= now_s:
            _deadline, _seq, kind, key = heapq.heappop(self._timers)
            yield kind, key

    # ------------------------------------------------------------------ connections
    def connect(self, peer: str, endpoint: str) -> None:
        if self.peer_endpoints.get(peer) != endpoint:
            self.peer_endpoints[peer] = endpoint
            self._effects.append(Connect(peer, endpoint))

    def disconnect(self, peer: str) -> bool:
        """Close the DEALER to ``peer``; False if none was open."""
        if self.peer_endpoints.pop(peer, None) is None:
            return False
        self._effects.append(Disconnect(peer))
        return True

    # ------------------------------------------------------------------ requests and replies
    def request(self, peer: str, type_: str, body: dict, payloads: tuple, now_s: float, timeout_s: float,
                on_reply: Callable[[wire.Message], None], on_error: Callable[[MeshqError], None]) -> int:
        """Send a request; its reply goes to ``on_reply``, a failure to ``on_error``. Returns its id."""
        request_id = self._next_request_id
        self._next_request_id += 1
        self.pending[request_id] = PendingRequest(request_id, peer, type_, now_s + timeout_s, on_reply, on_error)
        self.schedule(now_s + timeout_s, "request", request_id)
        if peer == self.node_id:
            self._serve(LocalRoute(request_id), wire.Message(type_, self.node_id, request_id, body, payloads), now_s)
        else:
            frames = wire.encode(self.cluster, self.node_id, type_, request_id, body, payloads)
            self._effects.append(Send(peer, frames))
        return request_id

    def request_batch(self, peer: str, type_: str, body: dict, payloads: tuple, entries: list) -> list[int]:
        """Several requests in one ``type_`` message to ``peer`` (another node). ``entries`` are their
        pending entries, each shaped as a ``PendingRequest`` (``peer``, ``type``: the single request
        each stands for, ``deadline_s``, ``on_reply``, ``on_error``; a room may pass its own objects
        so as not to build one more per request), given its ``request_id`` here. Each is answered,
        matched and failed exactly as if sent alone; the message itself (request id 0) is never
        answered. ``body`` gets ``ids``. Returns the ids."""
        first = request_id = self._next_request_id
        self._next_request_id += len(entries)
        pending = self.pending
        earliest = None
        for entry in entries:
            entry.request_id = request_id
            pending[request_id] = entry
            if earliest is None or entry.deadline_s < earliest:
                earliest = entry.deadline_s
            request_id += 1
        # One timer for the lot (a timer per request kept one heap entry per answered request until
        # its deadline: with 30 s timeouts, over a million at 45,000 requests/s)
        if earliest is not None:
            self.schedule(earliest, "requests", (first, len(entries)))
        body["ids"] = ids = list(range(first, request_id))
        self._effects.append(Send(peer, wire.encode(self.cluster, self.node_id, type_, 0, body, payloads)))
        return ids

    def expire_batch(self, key: tuple[int, int], now_s: float) -> None:
        """The ``requests`` timer of a ``request_batch`` fired: fail those of its requests still
        unanswered whose own deadline has passed, and look again at the next deadline of the rest."""
        first, count = key
        pending = self.pending
        later = None
        looked = False
        try:
            for request_id in range(first, first + count):
                request = pending.get(request_id)
                if request is None:
                    continue
                if request.deadline_s <= now_s:
                    self.expire(request_id)
                elif later is None or request.deadline_s < later:
                    later = request.deadline_s
            looked = True
        finally:
            if not looked:  # a callback raised: the rest of the batch must not lose its timer
                deadlines = [r.deadline_s for r in map(pending.get, range(first, first + count)) if r is not None]
                later = min(deadlines) if deadlines else None
            if later is not None:
                self.schedule(later, "requests", key)

    def fail_pending(self, request_id: int, error: MeshqError) -> None:
        """Fail one pending request now (a later reply to it is dropped as late)."""
        request = self.pending.pop(request_id, None)
        if request is not None:
            request.on_error(error)

    def send_oneway(self, peer: str, type_: str, body: dict, payloads: tuple, now_s: float) -> None:
        """A request nobody waits for (acks=none, Raft); request id 0 means 'do not reply'."""
        if peer == self.node_id:
            self._serve(LocalRoute(0), wire.Message(type_, self.node_id, 0, body, payloads), now_s)
        else:
            self.send(peer, type_, body, payloads)

    def send(self, peer: str, type_: str, body: dict, payloads: tuple = ()) -> None:
        """A one-way message over an open DEALER (the caller connected it)."""
        self._effects.append(Send(peer, wire.encode(self.cluster, self.node_id, type_, 0, body, payloads)))

    def expire(self, request_id: int) -> None:
        """The ``request`` timer of ``request_id`` fired: fail it if it is still unanswered."""
        request = self.pending.pop(request_id, None)
        if request is not None:
            request.on_error(TimeoutError(f"no reply from {request.peer} to {request.type} in time"))

    def on_reply(self, message: wire.Message, now_s: float) -> None:
        split = self.splitters.get(message.type)
        if split is not None:
            for single in split(message):
                self.on_reply(single, now_s)
            return
        request = self.claim(message.request_id, message.sender, message.type)
        if request is None:
            return
        if message.type == "error":
            body = message.body
            request.on_error(error_from_code(body["code"], body["message"], body.get("leader")))
        else:
            try:
                request.on_reply(message)
            except MeshqError as exc:
                request.on_error(exc)

    def claim(self, request_id: int, sender: str, type_: str) -> PendingRequest | None:
        """The pending request a reply of ``type_`` from ``sender`` answers, taken off the pending
        table; None (counted as late) if there is none, or if it cannot be the answer to it."""
        request = self.pending.get(request_id)
        if request is None:
            # late reply after a timeout: the request was already failed or retried; dropped and counted
            self.late_replies[type_] = self.late_replies.get(type_, 0) + 1
            return None
        if (type_ != "error" and type_ != request.type + "_ok" and type_ not in OTHER_REPLIES.get(request.type, ())) or (
                sender != request.peer and not request.peer.startswith("seed:")):
            # A reply to a request an earlier incarnation of this node sent under the same id
            # (request ids start again at every start), arriving late: not ours; ours may still come.
            self.late_replies[type_] = self.late_replies.get(type_, 0) + 1
            return None
        del self.pending[request_id]
        return request

    def reply(self, route: Any, request_id: int, type_: str, body: dict, payloads: tuple = ()) -> None:
        if request_id == 0:
            return
        if isinstance(route, LocalRoute):
            self._local_inbox.append(wire.Message(type_, self.node_id, request_id, body, payloads))
        else:
            frames = wire.encode(self.cluster, self.node_id, type_, request_id, body, payloads)
            self._effects.append(Reply(route, frames))

    def reply_many(self, route: Any, type_: str, body: dict, payloads: tuple) -> None:
        """A message answering several requests of one peer (request id 0: each answer inside
        names its request; ``splitters`` on the other side take it apart)."""
        self._effects.append(Reply(route, wire.encode(self.cluster, self.node_id, type_, 0, body, payloads)))

    def answer(self, route: Any, request_id: int, type_: str, body: dict) -> Callable[[MeshqError | None], None]:
        """A callback that replies ``type_``/``body`` on success, or the error it is given."""

        def answer(error: MeshqError | None) -> None:
            if error is None:
                self.reply(route, request_id, type_, body)
            else:
                self.reply_error(route, request_id, error)

        return answer

    def reply_error(self, route: Any, request_id: int, error: MeshqError) -> None:
        body = {"code": error_code(error), "message": str(error)[:4096], "retriable": error.retriable}
        leader = getattr(error, "leader", None)
        if leader is not None:
            body["leader"] = leader
        self.reply(route, request_id, "error", body)

    def drain_local(self, now_s: float) -> None:
        while self._local_inbox:
            self.on_reply(self._local_inbox.popleft(), now_s)

    def fail_requests_to(self, peer: str, state: str) -> None:
        """A peer went silent (``state``: suspect, dead) or our connection to it dropped (``disconnected``): fail
        what waits on it with a retriable error, so callers try again, elsewhere if the peer is gone, rather
        than wait for a timeout (a produce retries with the same sequence numbers, so nothing is stored twice;
        an rpc request is sent again only to an idempotent service)."""
        if state == "disconnected":
            why, then = "dropped the connection (a request or its answer may be lost with it)", "is retried"
        else:
            why, then = f"is {state} (silent)", "is retried elsewhere"
        for request_id in sorted(rid for rid, request in self.pending.items() if request.peer == peer):
            request = self.pending.pop(request_id)
            request.on_error(NotLeaderError(f"{peer} {why}; {request.type} {then}"))

    def fail_all(self, error: MeshqError) -> None:
        """The node stops: every pending request fails with ``error``."""
        for request in list(self.pending.values()):
            request.on_error(error)
        self.pending.clear()
