"""The pub/sub room: local subscriptions, every node's interest, and where each message goes.

Theory of operation
-------------------
*Local subscriptions* (``AddSubscription`` / ``RemoveSubscription``, carried out for
``Node.subscribe`` and ``Subscription.close``) are kept by id with their pattern and queue
group, in a ``Sublist`` for matching. This node's *interest* — one ``[pattern, queue,
members]`` entry per distinct (pattern, queue group) — is offered to the mesh as the
``subs`` advert (``meshq.core.mesh.adverts``), rebuilt at most once per ``ADVERTISE_GAP_S``
so a loop of subscribes costs a handful of adverts. Every other node's interest comes back
through the same adverts (only nodes seen alive: a suspect node's interest is set aside
until it is heard again, checked every heartbeat interval) into a second ``Sublist``.

**Routing a published subject** (``route``) gives a ``Route``: the local subscriptions
without a queue group, the nodes with a matching subscription without a queue group, and
each queue group with a matching member anywhere, its members weighted by how many
subscriptions each node has in it. ``Route.targets`` picks one member per queue group
(round robin from a start drawn from the core's rng, so load spreads across nodes and the
simulator stays deterministic) and returns the local subscriptions to deliver to plus, per
node, the queue groups it was picked for: one frame per node, none at all when no other
node is interested. A node receiving a frame delivers it (``deliveries``) to its own
matching subscriptions without a queue group, and to one of its members of each queue group
it was picked for (a group that has no member here any more loses the message: counted as
``undeliverable``).

Routes are cached per subject and the caches are replaced on every change of interest
(``version`` counts changes). Publishing threads call ``route``/``plan``/``batch``
while the runtime thread applies changes: every structure they read is replaced, never
mutated in place, or is a ``Sublist`` (safe by the same rule), so a publish sees either the
old or the new interest. Counters of the data path live in plain objects that the I/O shell
increments (``SubscriptionStats``, ``PeerStats``); the room reports them in status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshq.core.cluster.access import VIEW_WAIT_S
from meshq.core.events import AddSubscription, Fail, RemoveSubscription, Resolve
from meshq.core.pubsub import frames
from meshq.core.pubsub.subjects import Sublist, validate_pattern, validate_queue
from meshq.core.room import Room
from meshq.errors import (
    AuthorizationError,
    InvalidSubjectError,
    MeshqError,
    NodeStoppedError,
    ProtocolError,
    UsageError,
)

ADVERT_KIND = "subs"
ADVERTISE_GAP_S = 0.01  # interest changes within this long of the last advert go out together
_ROUTE_CACHE = 4096  # subjects whose route is kept (the cache is dropped wholesale when full)
MAX_PAYLOAD_BYTES = 1024 * 1024  # as NATS's default max_payload: larger data is refused


@dataclass(slots=True)
class SubscriptionStats:
    """Counters of one local subscription. ``*_local``: by publishing threads of this node (one at
    a time, under the shell's publish lock); the others by the thread that reads the SUB socket."""

    delivered: int = 0
    dropped: int = 0
    delivered_local: int = 0
    dropped_local: int = 0


@dataclass(slots=True)
class PeerStats:
    """Data frames exchanged with one peer: ``sent`` by publishing threads (under the publish lock),
    the rest by the thread reading the SUB socket; ``dropped``: gaps in its sequence numbers."""

    sent: int = 0
    next_seq: int = 1
    received: int = 0
    dropped: int = 0
    last_seq: int = 0


@dataclass(slots=True)
class LocalSubscription:
    sub_id: int
    pattern: str
    queue: str | None
    stats: SubscriptionStats


class Group:
    """One queue group's members for one subject: ``(node_id, sub_id or None)`` each, picked in turn."""

    __slots__ = ("queue", "members", "next")

    def __init__(self, queue: str, members: tuple, start: int) -> None:
        self.queue = queue
        self.members = members
        self.next = start

    def pick(self) -> tuple[str, int | None]:
        index = self.next % len(self.members)
        self.next = index + 1
        return self.members[index]


@dataclass(slots=True)
class Route:
    """Where messages published to ``subject`` go (see the module docstring)."""

    subject: str
    local: tuple[int, ...]  # local subscriptions without a queue group
    remote: tuple[str, ...]  # nodes with a matching subscription without a queue group
    groups: tuple[Group, ...]
    node_id: str
    refused: str | None = None  # keyed: why this node may not publish to ``subject`` (AuthorizationError)

    @property
    def empty(self) -> bool:
        return not (self.local or self.remote or self.groups)

    def targets(self) -> tuple[list[int], dict[str, list[str]]]:
        """One publish: the local subscriptions to deliver to, and per node the queue groups it was
        picked for (empty: its subscriptions without a queue group only)."""
        local = list(self.local)
        nodes: dict[str, list[str]] = {node: [] for node in self.remote}
        for group in self.groups:
            node, sub_id = group.pick()
            if node == self.node_id:
                local.append(sub_id)  # type: ignore[arg-type]
            else:
                nodes.setdefault(node, []).append(group.queue)
        return local, nodes


class LocalRoute:
    """Which local subscriptions a subject published elsewhere reaches here."""

    __slots__ = ("plain", "groups")

    def __init__(self, plain: tuple[int, ...], groups: dict[str, Group]) -> None:
        self.plain = plain
        self.groups = groups


class PubSub(Room):
    """Local subscriptions, remote interest and routing (see the module docstring)."""

    COMMANDS = {AddSubscription: "add", RemoveSubscription: "remove"}
    TIMERS = {"pubsub_advertise": "_advertise_due", "pubsub_liveness": "_check_liveness"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.local: dict[int, LocalSubscription] = {}
        self._local = Sublist()  # values: (sub_id, queue)
        self._remote = Sublist()  # values: (node_id, queue, members)
        self._remote_entries: dict[str, frozenset] = {}  # node -> its (pattern, queue, members) entries
        self._interest: dict[tuple[str, str | None], int] = {}  # this node's (pattern, queue) -> subscriptions
        self.version = 0
        self._routes: dict[str, Route] = {}
        self._deliveries: dict[str, LocalRoute] = {}
        self.peers: dict[str, PeerStats] = {}
        self.prefix = frames.data_prefix(self.node_id)
        self.counters = {"published": 0, "no_interest": 0, "undeliverable": 0, "frames_invalid": 0,
                         "interest_invalid": 0, "publish_refused": 0, "source_forged": 0}
        # Keyed: the grants' stamp (``Access.stamp``) the cached routes and publish decisions were taken with, and
        # whether a (source node, subject) may publish, as received data is checked.
        self._acl_stamp: tuple | None = None
        self._may_publish: dict[tuple[str, str], bool] = {}
        self._last_advertise_s = float("-inf")
        self._advertise_scheduled = False
        self._liveness_scheduled = False
        core.adverts.watch(ADVERT_KIND, self._on_interest)

    # ------------------------------------------------------------------ local subscriptions
    def add(self, command: AddSubscription, now_s: float) -> None:
        if self.core.stopped:
            self.out.emit(Fail(command.waiter, NodeStoppedError("the node is stopped")))
            return
        # A keyed client node that has not learnt its grants yet holds the subscription (briefly) so that a pattern
        # its key may not subscribe to is refused now, not accepted and never fed.
        self.core.access.when_own_known(("pubsub_add", command.sub_id), lambda now: self._add_now(command, now),
                                        lambda error: self.out.emit(Fail(command.waiter, error)),
                                        now_s + VIEW_WAIT_S, now_s)

    def _add_now(self, command: AddSubscription, now_s: float) -> None:
        try:
            pattern = validate_pattern(command.pattern)
            queue = validate_queue(command.queue)
            if command.sub_id in self.local:
                raise UsageError(f"subscription {command.sub_id} already exists")
            self.core.access.refuse_own_some("subscribe", pattern)
        except MeshqError as exc:
            self.out.emit(Fail(command.waiter, exc))
            return
        stats = command.stats if command.stats is not None else SubscriptionStats()
        self.local[command.sub_id] = LocalSubscription(command.sub_id, pattern, queue, stats)
        self._local.insert(pattern, (command.sub_id, queue))
        key = (pattern, queue)
        self._interest[key] = self._interest.get(key, 0) + 1
        self._changed(local=True)
        self._advertise(now_s)
        self.out.emit(Resolve(command.waiter, None))

    def remove(self, command: RemoveSubscription, now_s: float) -> None:
        self.core.access.release(("pubsub_add", command.sub_id),
                                 NodeStoppedError("the subscription was closed before it started"))
        sub = self.local.pop(command.sub_id, None)
        if sub is not None:
            self._local.remove(sub.pattern, (sub.sub_id, sub.queue))
            key = (sub.pattern, sub.queue)
            left = self._interest[key] - 1
            if left:
                self._interest[key] = left
            else:
                del self._interest[key]
            self._changed(local=True)
            self._advertise(now_s)
        self.out.emit(Resolve(command.waiter, None))

    def interest(self) -> list[list] | None:
        """This node's ``subs`` advert: ``[pattern, queue, members]`` per (pattern, queue group)."""
        if not self._interest:
            return None
        return [[pattern, queue, count] for (pattern, queue), count
                in sorted(self._interest.items(), key=lambda item: (item[0][0], item[0][1] or ""))]

    def _advertise(self, now_s: float) -> None:
        if self._advertise_scheduled:
            return
        if now_s - self._last_advertise_s >= ADVERTISE_GAP_S:
            self._last_advertise_s = now_s
            self.core.adverts.set(ADVERT_KIND, self.interest(), now_s)
        else:
            self._advertise_scheduled = True
            self.out.schedule(self._last_advertise_s + ADVERTISE_GAP_S, "pubsub_advertise", None)

    def _advertise_due(self, key: Any, now_s: float) -> None:
        # (not through _advertise: ``now_s - last`` may fall a rounding error short of the gap and
        # schedule the same deadline again, for ever)
        self._advertise_scheduled = False
        self._last_advertise_s = now_s
        self.core.adverts.set(ADVERT_KIND, self.interest(), now_s)

    # ------------------------------------------------------------------ remote interest
    def _on_interest(self, node_id: str) -> None:
        """``node_id``'s ``subs`` advert may have changed (adverts' watch)."""
        if node_id != self.node_id:
            self._sync(node_id, self.core.adverts.of(ADVERT_KIND).get(node_id))

    def _sync(self, node_id: str, advert: Any) -> None:
        entries = self._parse(node_id, advert)
        before = self._remote_entries.get(node_id, frozenset())
        if entries == before:
            return
        for pattern, queue, members in sorted(before - entries, key=_entry_key):
            self._remote.remove(pattern, (node_id, queue, members))
        for pattern, queue, members in sorted(entries - before, key=_entry_key):
            self._remote.insert(pattern, (node_id, queue, members))
        if entries:
            self._remote_entries[node_id] = entries
        else:
            self._remote_entries.pop(node_id, None)
        self._changed(local=False)
        if self._remote_entries and not self._liveness_scheduled:
            self._liveness_scheduled = True
            self.out.schedule(self.core.now_s + self.config.heartbeat_interval_s, "pubsub_liveness", None)

    def _parse(self, node_id: str, advert: Any) -> frozenset:
        """The valid entries of a peer's advert (anything else is dropped and counted)."""
        if advert is None:
            return frozenset()
        if type(advert) is not list:
            self.counters["interest_invalid"] += 1
            return frozenset()
        entries = set()
        for entry in advert:
            try:
                if type(entry) is not list or len(entry) != 3 or type(entry[2]) is not int or not 0 < entry[2] < 1 << 31:
                    raise InvalidSubjectError("not [pattern, queue, members]")
                entries.add((validate_pattern(entry[0]), validate_queue(entry[1]), entry[2]))
            except InvalidSubjectError:
                self.counters["interest_invalid"] += 1
        return frozenset(entries)

    def _check_liveness(self, key: Any, now_s: float) -> None:
        """Every heartbeat interval while peers are interested: set aside the interest of nodes that
        turned suspect, take back that of nodes heard again."""
        self._liveness_scheduled = False
        offered = self.core.adverts.of(ADVERT_KIND)
        offered.pop(self.node_id, None)
        for node_id in sorted(set(offered) | set(self._remote_entries)):
            self._sync(node_id, offered.get(node_id))
        if self._remote_entries and not self._liveness_scheduled:
            self._liveness_scheduled = True
            self.out.schedule(now_s + self.config.heartbeat_interval_s, "pubsub_liveness", None)

    def synced(self) -> bool:
        """Whether this node knows the interest of every member it knows to be running (a fresh
        node that publishes before it is would miss subscribers it has not heard of yet)."""
        members = self.core.mesh.members
        if members is None:
            return False
        known = self.core.adverts.remote
        return all(node_id in known for node_id, member in members.members.items()
                   if node_id != self.node_id and member.state in ("joining", "alive", "suspect"))

    def interested_nodes(self) -> list[str]:
        """Other nodes with any subscription, as this node routes to them."""
        return sorted(self._remote_entries)

    # ------------------------------------------------------------------ routing
    def _changed(self, local: bool) -> None:
        self.version += 1
        self._routes = {}
        if local:
            self._deliveries = {}

    def _acl_fresh(self) -> None:
        """A keyed node: drop the routes and publish decisions taken with grants or key names since replaced."""
        stamp = self.core.access.stamp()
        if stamp != self._acl_stamp:
            self._acl_stamp = stamp
            self._routes = {}
            self._may_publish = {}

    def route(self, subject: str) -> Route:
        """Where messages to ``subject`` (a valid subject) go; cached until interest (or, keyed, a grant) changes.
        Keyed, only to nodes whose key may ``subscribe`` to ``subject``, and ``refused`` says why this node may
        not publish it when it knows (``Access.refuse_own``)."""
        keyed = bool(self.core.public_key)
        if keyed:
            self._acl_fresh()
        routes = self._routes
        found = routes.get(subject)
        if found is not None:
            return found
        access = self.core.access
        refused = None
        if keyed:
            try:
                access.refuse_own("publish", subject)
            except AuthorizationError as exc:
                refused = str(exc)
        local: list[int] = []
        members: dict[str, list[tuple[str, int]]] = {}
        own = not keyed or access.may_node(self.node_id, "subscribe", subject)
        for sub_id, queue in self._local.match(subject) if own else ():
            if queue is None:
                local.append(sub_id)
            else:
                members.setdefault(queue, []).append((self.node_id, sub_id))
        remote: set[str] = set()
        for node_id, queue, count in self._remote.match(subject):
            if keyed and not access.may_node(node_id, "subscribe", subject):
                continue  # its key may not subscribe to the subject: it gets nothing (docs/protocol.md)
            if queue is None:
                remote.add(node_id)
            else:
                members.setdefault(queue, []).extend([(node_id, -1)] * count)
        groups = []
        for queue in sorted(members):
            chosen = tuple((node, None if sub_id < 0 else sub_id) for node, sub_id in sorted(members[queue]))
            groups.append(Group(queue, chosen, self.core.rng.randrange(len(chosen))))
        found = Route(subject, tuple(sorted(local)), tuple(sorted(remote)), tuple(groups), self.node_id, refused)
        if len(routes) >= _ROUTE_CACHE:
            routes.clear()
        routes[subject] = found
        return found

    def plan(self, subject: str) -> tuple[tuple[int, ...] | list[int], dict[str, list[str]] | tuple[str, ...]]:
        """One publish (the caller serialises publishes): the local subscriptions to deliver to, and
        the nodes to send it to — with, per node, the queue groups it was picked for when the route
        has queue groups (a dict), else a tuple of node ids. Counts it."""
        route = self.route(subject)
        if route.refused is not None:
            raise AuthorizationError(f"{route.refused}; nothing was published")
        self.counters["published"] += 1
        if not route.groups:
            if not (route.local or route.remote):
                self.counters["no_interest"] += 1
            return route.local, route.remote
        return route.targets()

    def peer(self, node_id: str) -> PeerStats:
        """The data-path counters of ``node_id`` (created on first use)."""
        stats = self.peers.get(node_id)
        if stats is None:
            stats = self.peers.setdefault(node_id, PeerStats())
        return stats

    def batch(self, node_id: str, entries: list) -> list[bytes]:
        """The frames carrying ``entries`` (``(subject, queues, headers, data)``, in publish order) to
        ``node_id``, numbered after what was sent to it before (the caller serialises this)."""
        stats = self.peer(node_id)
        frames_out = frames.encode_batch(frames.data_prefix(node_id), stats.next_seq, self.node_id, entries)
        stats.next_seq += len(entries)
        stats.sent += len(entries)
        return frames_out

    def deliveries(self, subject: str, queues: list[str] | None) -> list[int]:
        """The local subscriptions a message to ``subject`` from another node goes to, when this
        node was picked for ``queues``."""
        cache = self._deliveries
        found = cache.get(subject)
        if found is None:
            plain: list[int] = []
            grouped: dict[str, list[tuple[str, int]]] = {}
            for sub_id, queue in self._local.match(subject):
                if queue is None:
                    plain.append(sub_id)
                else:
                    grouped.setdefault(queue, []).append((self.node_id, sub_id))
            groups = {queue: Group(queue, tuple(sorted(m)), self.core.rng.randrange(len(m)))
                      for queue, m in sorted(grouped.items())}
            found = LocalRoute(tuple(sorted(plain)), groups)
            if len(cache) >= _ROUTE_CACHE:
                cache.clear()
            cache[subject] = found
        if not queues:
            return list(found.plain)
        out = list(found.plain)
        for queue in queues:
            group = found.groups.get(queue)
            if group is None:
                self.counters["undeliverable"] += 1  # picked for a group with no member here any more
            else:
                out.append(group.pick()[1])  # type: ignore[arg-type]
        return out

    def received(self, frame: bytes, payloads: bytes, via: str | None = None) -> tuple[str, list]:
        """Decode a batch addressed to this node and count it for its sender (gaps: dropped on the
        way); ``(source, entries)``, each entry ``(subject, queues, headers, data)``. Raises
        ``ProtocolError`` (counted). ``via`` (keyed): the node whose connection the batch came on, verified
        by its key; a batch claiming another source is refused (``source_forged``), and the messages to
        subjects the source's key may not ``publish`` are dropped (``publish_refused``)."""
        try:
            first_seq, source, entries = frames.decode_batch(frame, len(self.prefix), payloads)
        except MeshqError:
            self.counters["frames_invalid"] += 1
            raise
        if via is not None:
            if source != via:
                self.counters["source_forged"] += 1
                raise ProtocolError(f"a pub/sub batch from node {via} claims to come from {source}; dropped")
            self._acl_fresh()
            may = self._may_publish
            kept = []
            for entry in entries:
                allowed = may.get((source, entry[0]))
                if allowed is None:
                    if len(may) >= _ROUTE_CACHE:
                        may.clear()
                    allowed = may[(source, entry[0])] = self.core.access.may_node(source, "publish", entry[0])
                if allowed:
                    kept.append(entry)
            if len(kept) != len(entries):
                self.counters["publish_refused"] += len(entries) - len(kept)
            entries_all, entries = entries, kept
        else:
            entries_all = entries
        peer = self.peer(source)
        if peer.last_seq and first_seq > peer.last_seq + 1:  # (the first batch heard sets the baseline)
            peer.dropped += first_seq - peer.last_seq - 1
        peer.last_seq = first_seq + len(entries_all) - 1  # (smaller than before: the publisher restarted)
        peer.received += len(entries)
        return source, entries

    # ------------------------------------------------------------------ status
    def report(self) -> dict:
        """This node's part of the ``pubsub`` status section."""
        subscriptions = []
        for sub_id in sorted(self.local):
            sub = self.local[sub_id]
            stats = sub.stats
            subscriptions.append({"id": sub_id, "pattern": sub.pattern, "queue": sub.queue,
                                  "delivered": stats.delivered + stats.delivered_local,
                                  "dropped": stats.dropped + stats.dropped_local})
        peers = [{"node_id": node, "sent": p.sent, "received": p.received, "dropped": p.dropped}
                 for node, p in sorted(list(self.peers.items()))]
        return {"node_id": self.node_id, "subscriptions": subscriptions, "peers": peers,
                "interested_nodes": self.interested_nodes(), **self.counters}


def _entry_key(entry: tuple) -> tuple:
    return entry[0], entry[1] or "", entry[2]
