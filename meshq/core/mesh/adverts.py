"""Adverts: what each node offers the mesh, known by every other node.

Theory of operation
-------------------
A node offers things that other nodes must know about before they send it anything: the
subject patterns it subscribes to (pub/sub interest), the services it serves (request/reply).
Each such thing is one *kind* of advert; a room sets this node's value of a kind with
``set(kind, value)`` (any msgpack value; ``None`` withdraws it) and reads every node's with
``of(kind)``.

Each node keeps one versioned map ``{kind: value}`` of its own. Every change bumps the
version and publishes the whole map on PUB (``advert``), at most once per
``PUBLISH_GAP_S`` (changes made meanwhile go out together, so a loop of ten thousand
subscribes costs a handful of messages). PUB loses messages (a peer not yet connected, a
full queue), so every heartbeat also carries the version (``adverts``); a peer that knows an
older one — or none, after a reconnect or a restart — asks for the map (``advert_get``).
So interest is pushed when it changes and re-synced within a heartbeat interval otherwise.

A node's map is identified by ``(incarnation, version)``: a newer incarnation (the node
restarted) replaces whatever was known. The map of a node that is dead, forgotten or said
goodbye is dropped; ``of`` leaves out suspect nodes too, so a caller choosing a node to
send to stops choosing one within the failure timeout. Rooms that keep derived state (a
routing table) ``watch`` a kind: the bound method is called with the node id whenever that
node's value of the kind may have changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshq.core import wire
from meshq.core.events import Publish
from meshq.core.room import Room
from meshq.errors import MeshqError

log = logging.getLogger("meshq.core")

PUBLISH_GAP_S = 0.01  # at most one ``advert`` publish per this long; later changes are coalesced


@dataclass(slots=True)
class Known:
    """The last map heard from one node."""

    incarnation: int
    version: int
    adverts: dict[str, Any]


class Adverts(Room):
    """This node's adverts, and every other node's (see the module docstring)."""

    SERVES = {"advert_get": "serve_advert_get"}
    EVENTS = {"advert": "on_advert"}
    TIMERS = {"advert_publish": "_publish_due"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.local: dict[str, Any] = {}
        self.version = 0
        self.remote: dict[str, Known] = {}
        self._watchers: dict[str, list[Callable[[str], None]]] = {}
        self._asking: set[str] = set()  # peers an advert_get is in flight to
        self._last_publish_s = float("-inf")
        self._publish_scheduled = False
        self.counters = {"published": 0, "pulled": 0, "stale_dropped": 0}

    # ------------------------------------------------------------------ this node
    def set(self, kind: str, value: Any, now_s: float) -> None:
        """Offer ``value`` as this node's ``kind`` (``None`` withdraws it); peers learn it shortly."""
        if value is None:
            if kind not in self.local:
                return
            del self.local[kind]
        else:
            if self.local.get(kind) == value:
                return
            self.local[kind] = value
        self.version += 1
        if self._publish_scheduled:
            return
        if now_s - self._last_publish_s >= PUBLISH_GAP_S:
            self._publish(now_s)
        else:
            self._publish_scheduled = True
            self.out.schedule(self._last_publish_s + PUBLISH_GAP_S, "advert_publish", None)

    def _publish_due(self, key: Any, now_s: float) -> None:
        self._publish_scheduled = False
        self._publish(now_s)

    def _publish(self, now_s: float) -> None:
        self._last_publish_s = now_s
        self.counters["published"] += 1
        self.out.emit(Publish(wire.encode(self.config.cluster, self.node_id, "advert", 0, self._body())))

    def _body(self) -> dict:
        return {"node_id": self.node_id, "incarnation": self.core.incarnation, "version": self.version,
                "adverts": dict(self.local)}

    # ------------------------------------------------------------------ other nodes
    def of(self, kind: str, include_suspect: bool = False) -> dict[str, Any]:
        """Every live node's value of ``kind`` (this node's too), by node id, in id order."""
        found = {}
        members = self.core.mesh.members
        for node_id in sorted(self.remote):
            value = self.remote[node_id].adverts.get(kind)
            if value is None:
                continue
            member = members.get(node_id) if members is not None else None
            if member is None or member.state not in (("alive", "suspect") if include_suspect else ("alive",)):
                continue
            found[node_id] = value
        if kind in self.local:
            found[self.node_id] = self.local[kind]
        return found

    def one(self, kind: str, node_id: str) -> Any:
        """``node_id``'s value of ``kind`` (None if it offers none), whatever its liveness: for a caller
        that has already chosen a live node (``of`` builds the whole table)."""
        if node_id == self.node_id:
            return self.local.get(kind)
        known = self.remote.get(node_id)
        return known.adverts.get(kind) if known is not None else None

    def knows(self, node_id: str) -> bool:
        """Whether this node has heard ``node_id``'s map (any version)."""
        return node_id in self.remote

    def watch(self, kind: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(node_id)`` whenever ``node_id``'s value of ``kind`` may have changed."""
        self._watchers.setdefault(kind, []).append(callback)

    def on_advert(self, message: wire.Message, now_s: float) -> None:
        body = message.body
        if body["node_id"] != message.sender:
            self.core.count_invalid(message.sender)
            return
        self._absorb(message.sender, body["incarnation"], body["version"], body["adverts"])

    def note_version(self, sender: str, incarnation: int, version: int, now_s: float) -> None:
        """A heartbeat of ``sender`` named its advert version: pull the map if ours is older."""
        known = self.remote.get(sender)
        if known is not None and (known.incarnation, known.version) >= (incarnation, version):
            return
        if (known is None or known.incarnation != incarnation) and version == 0:
            self._forget(sender)  # it restarted and offers nothing (yet)
            self.remote[sender] = Known(incarnation, 0, {})
            return
        if sender in self._asking:
            return
        self._asking.add(sender)

        def answered(reply: wire.Message) -> None:
            self._asking.discard(sender)
            body = reply.body
            if reply.type != "advert_ok" or body["node_id"] != sender:
                self.core.count_invalid(sender)
                return
            self.counters["pulled"] += 1
            self._absorb(sender, body["incarnation"], body["version"], body["adverts"])

        def failed(error: MeshqError) -> None:
            self._asking.discard(sender)  # the next heartbeat asks again

        self.out.request(sender, "advert_get", {}, (), now_s, self.config.request_timeout_s, answered, failed)

    def serve_advert_get(self, route: Any, message: wire.Message, now_s: float) -> None:
        self.out.reply(route, message.request_id, "advert_ok", self._body())

    def forget(self, node_id: str) -> None:
        """``node_id`` is dead, forgotten or gone: drop what it offered."""
        self._forget(node_id)

    def liveness_changed(self, node_id: str) -> None:
        """``node_id`` became alive or suspect: ``of`` shows its values only while it is alive, so whoever
        watches a kind it offers looks again (a call parked for an offer that arrived while its node was
        still joining would otherwise wait out its deadline)."""
        known = self.remote.get(node_id)
        if known is not None:
            self._notify(node_id, {}, known.adverts)

    def _absorb(self, sender: str, incarnation: int, version: int, adverts: dict[str, Any]) -> None:
        known = self.remote.get(sender)
        if known is not None and (known.incarnation, known.version) >= (incarnation, version):
            self.counters["stale_dropped"] += 1
            return
        before = known.adverts if known is not None else {}
        self.remote[sender] = Known(incarnation, version, adverts)
        self._notify(sender, before, adverts)

    def _forget(self, node_id: str) -> None:
        known = self.remote.pop(node_id, None)
        self._asking.discard(node_id)
        if known is not None:
            self._notify(node_id, known.adverts, {})

    def _notify(self, node_id: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        for kind in sorted(set(before) | set(after)):
            if before.get(kind) != after.get(kind):
                for callback in self._watchers.get(kind, ()):
                    callback(node_id)

    def report(self) -> dict:
        """For status: this node's version and kinds, and how many nodes offer each kind."""
        kinds: dict[str, int] = {}
        for known in self.remote.values():
            for kind in known.adverts:
                kinds[kind] = kinds.get(kind, 0) + 1
        return {"version": self.version, "local": sorted(self.local), "remote_nodes": len(self.remote),
                "remote_kinds": dict(sorted(kinds.items())), **self.counters}
